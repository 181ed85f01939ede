"""Train a DiT, or distill a teacher DiT into a student, in one process or under torchrun.

    python train.py --model DiT-Digits-T --max-steps 3000 --results-dir results/teacher
    python train.py --distillation --teacher-model DiT-Digits-T --teacher-ckpt results/teacher/checkpoints/0003000.pt \
        --student-model DiT-Digits-S --warmup-steps 500 --feature-steps 1000 --joint-steps 1500 --results-dir results/kd
    torchrun --nproc_per_node=8 train.py --distillation --teacher-model DiT-XL/2 --teacher-ckpt DiT-XL-2-256x256.pt \
        --student-model DiT-S/2 --latents-path latents/ --results-dir results/xl-to-s
    python train.py --step-distillation consistency --teacher-ckpt results/kd/checkpoints/0003000.pt \
        --sampling-steps 4 --max-steps 1200 --results-dir results/kd-4step

Every recipe is a training method (method.py: the protocol) from METHODS below, owning its networks, updates, draws,
flags and state; this loop gives each DDP and --compile for every network, one backward / clip / finite check / AdamW
step per update, EMA, TensorBoard per loss term and exact resume (the same command and --results-dir continue).
"""
import argparse
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from adversarial import AdversarialDistillation
from checkpoints import check_resumable, checkpoint_contents, checkpoint_dir, latest_checkpoint, load_checkpoint
from checks import (UserError, lock_folder, non_negative_float, non_negative_int, positive_int, probability,
                    remove_temporaries, run_script)
from data import build_dataset, rank_batches
from distributed import cleanup, create_logger, exit_after_ddp, setup_distributed
from distill import SizeDistillation
from dmd2 import DMD2
from method import PlainTraining, derived_seed
from models import DiT, DiT_models, save_checkpoint_atomic, update_ema
from qat import QuantizationAwareDistillation
from rectified_flow import InstaFlowDistillation, ReflowDistillation
from sampling import SAMPLERS, check_step_count
from step_distill import (ConsistencyDistillation, GuidanceDistillation, ProgressiveDistillation,
                          TrajectoryConsistencyDistillation)

# The training methods, by name: --model trains "plain", --distillation runs "distillation", --step-distillation NAME
# runs NAME. A new method is one module and one line here.
METHODS = {"plain": PlainTraining, "distillation": SizeDistillation, "progressive": ProgressiveDistillation,
           "consistency": ConsistencyDistillation, "tcd": TrajectoryConsistencyDistillation,
           "guidance": GuidanceDistillation, "dmd2": DMD2, "adversarial": AdversarialDistillation,
           "reflow": ReflowDistillation, "instaflow": InstaFlowDistillation, "qat": QuantizationAwareDistillation}


#################################################################################
#                                 Training step                                 #
#################################################################################

def step_draws(method, args, data, step, rank, world_size, device):
    """The method's random tensors of this step, drawn for the whole global batch from (seed, step): every rank draws
    the same tensors and keeps its slice, so a run on N processes matches one process and a resume continues."""
    generator = torch.Generator().manual_seed(derived_seed(args.seed, "step", step))
    shape = (data["in_channels"], data["input_size"], data["input_size"])
    draws = method.randomness(generator, args.global_batch_size, shape)
    local = args.global_batch_size // world_size
    return {k: v[rank * local: (rank + 1) * local].to(device) for k, v in draws.items()}


@dataclass
class Run:
    """What the loop drives: the method, its updates and optimizers, the networks as the losses call them."""
    method: object
    updates: list
    trained: dict  # name -> the network as its own update calls it (DDP, --compile)
    called: dict  # name -> the network as other updates and the frozen calls see it (--compile)
    params: dict  # name -> its trainable parameters
    optimizers: dict  # update name -> AdamW
    ema: torch.nn.Module
    autocast: object
    args: argparse.Namespace


def new_optimizer(run, update):
    params = [p for name in update.networks for p in run.params[name]]
    return torch.optim.AdamW(params, lr=update.lr, weight_decay=update.weight_decay, fused=True)  # one kernel


def build_run(args, data, device, world_size):
    """The method of args and everything the loop needs to step it, on device."""
    method = METHODS[method_name(args)](args, data, device)  # a UserError for a value it refuses
    for name, net in {**method.trainable, **method.frozen}.items():
        net.to(device).train(name in method.trainable)  # the frozen ones in eval mode
    student = method.trainable["student"]
    if args.grad_checkpointing:
        student.enable_gradient_checkpointing()
    ema = DiT(**student.config).to(device)
    ema.load_state_dict(student.state_dict())
    ema.requires_grad_(False).eval()
    compiled = torch.compile if args.compile else (lambda module: module)
    params = {n: [p for p in net.parameters() if p.requires_grad] for n, net in method.trainable.items()}
    trained, called = {}, {}
    for name, net in method.trainable.items():
        ddp = world_size > 1 and params[name]  # DDP keeps the gradients of every rank in sync
        trained[name] = compiled(DDP(net, device_ids=[device.index] if device.type == "cuda" else None)
                                 if ddp else net)
        called[name] = trained[name] if world_size == 1 else compiled(net)
    called.update({name: compiled(net) for name, net in method.frozen.items()})
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    run = Run(method, method.updates(), trained, called, params, {}, ema, autocast, args)
    run.optimizers = {update.name: new_optimizer(run, update) for update in run.updates}
    return run


def train_step(run, step, x0, y, draws):
    """One iteration: every update due at `step` (its loss, backward, clipping, finite check, AdamW step), then the
    EMA of the student and the method's end of step. Returns {logged name: value}; FloatingPointError names the
    update whose loss or gradient is not finite."""
    values = {}
    for update in run.updates:
        if not update.runs_at(step):
            continue
        if len(run.updates) > 1:  # the networks this update does not train give it no gradients
            for name, params in run.params.items():
                for p in params:
                    p.requires_grad_(name in update.networks)
        nets = {name: run.trained[name] if name in update.networks else run.called[name] for name in run.called}
        loss, terms = run.method.loss(update, nets, x0, y, draws, run.autocast)
        opt = run.optimizers[update.name]
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        params = [p for group in opt.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, run.args.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):  # identical on every rank after DDP's all-reduce
            raise FloatingPointError(f"non-finite loss or gradient in update {update.name} at step {step} (terms "
                                     f"{ {k: v.mean().item() for k, v in terms.items()} })")
        opt.step()
        prefix = "" if update is run.updates[0] else f"{update.name}_"
        values.update({f"{prefix}total": loss.detach().mean(), **{k: v.detach().mean() for k, v in terms.items()},
                       f"{prefix}grad_norm": grad_norm})
        if "student" in update.networks:
            update_ema(run.ema, run.method.trainable["student"], run.args.ema_decay)
    if len(run.updates) > 1:
        for p in (p for params in run.params.values() for p in params):
            p.requires_grad_(True)
    run.method.end_step(step)
    return values


#################################################################################
#                                     Main                                      #
#################################################################################

def main(args):
    rank, world_size, device = setup_distributed()
    try:
        # One run per --results-dir: rank 0 holds its lock for the run's life (a second run stops at once).
        with lock_folder(args.results_dir, "--results-dir") if rank == 0 else nullcontext():
            train(args, rank, world_size, device)
    finally:
        cleanup()
    if world_size > 1:
        exit_after_ddp()


def prepare(args, rank, world_size, device, logger):
    """Data, the run (method, networks, optimizers) and the step to start from (a resume)."""
    if args.global_batch_size % world_size:
        raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by {world_size} processes")
    dataset, data, vae = build_dataset(args, device)  # or a UserError
    run = build_run(args, data, device, world_size)
    path, checkpoint = latest_checkpoint(args, logger)
    start_step = 0
    if checkpoint is not None:
        check_resumable(checkpoint["args"], args, run.method, vars(build_parser().parse_args([])))
        load_checkpoint(run, checkpoint)
        start_step = checkpoint["step"]
        logger.info(f"resumed from {path} at step {start_step}")
    elif rank == 0:
        with open(os.path.join(args.results_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    logger.info(f"data: {data}, {len(dataset):,} examples; device {device}, {world_size} process(es)")
    for name, net in {**run.method.trainable, **run.method.frozen}.items():
        config = f" {net.config}" if hasattr(net, "config") else ""
        logger.info(f"{name}{config} with {sum(p.numel() for p in net.parameters()):,} parameters")
    if run.method.describe():
        logger.info(run.method.describe())
    return dataset, data, vae, run, start_step


def log_interval(run, sums, counts, steps, started, done, writer, progress, logger, world_size):
    """Average the logged values over the interval (and the ranks), then TensorBoard, tqdm and log.txt."""
    names = sorted(sums)
    means = torch.stack([sums[n] / counts[n] for n in names])
    if world_size > 1:
        dist.all_reduce(means)
        means /= world_size
    if writer is None:
        return
    values = dict(zip(names, means.tolist()))
    for name, value in values.items():
        writer.add_scalar(f"train/{name}" if name.endswith("grad_norm") else f"loss/{name}", value, done)
    for name, value in run.method.scalars().items():
        writer.add_scalar(name, value, done)
    for name, opt in run.optimizers.items():
        writer.add_scalar("train/lr" if name == run.updates[0].name else f"train/lr_{name}",
                          opt.param_groups[0]["lr"], done)
    images_per_second = steps * run.args.global_batch_size / (time.time() - started)
    writer.add_scalar("train/images_per_second", images_per_second, done)
    label = run.method.label(done - 1)
    progress.set_postfix({n: f"{v:.4f}" for n, v in values.items() if n.endswith("total")}, stage=label)
    logger.info(f"step {done:07d} [{label}] " + " ".join(f"{n}={v:.4f}" for n, v in values.items())
                + f" images/s={images_per_second:.1f}")


def train(args, rank, world_size, device):
    from torch.utils.tensorboard import SummaryWriter
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs, as the original train.py
    torch.backends.cudnn.allow_tf32 = True
    os.makedirs(checkpoint_dir(args), exist_ok=True)
    os.makedirs(os.path.join(args.results_dir, "samples"), exist_ok=True)
    if rank == 0:
        remove_temporaries(checkpoint_dir(args))  # of a run killed while it wrote a checkpoint
    logger = create_logger("train", os.path.join(args.results_dir, "log.txt"), rank)
    writer = SummaryWriter(os.path.join(args.results_dir, "tensorboard")) if rank == 0 else None
    dataset, data, vae, run, start_step = prepare(args, rank, world_size, device, logger)
    total_steps = run.method.total_steps(args)
    batches = rank_batches(dataset, args, rank, world_size, start_step, pin_memory=device.type == "cuda")
    sums, counts, interval_steps, interval_start = {}, {}, 0, time.time()
    progress = tqdm(total=total_steps, initial=start_step, desc="train", disable=rank != 0, dynamic_ncols=True)
    for step in range(start_step, total_steps):
        message, restarts = run.method.begin_step(step, run.ema)  # a new stage or round
        if message:
            logger.info(message)
        run.optimizers.update({u.name: new_optimizer(run, u) for u in run.updates if u.name in restarts})
        torch.manual_seed(derived_seed(args.seed, "global", step, rank))  # anything else random (VAE sampling)
        x, y = (v.to(device, non_blocking=True) for v in next(batches))
        if vae is not None:
            from data import encode_images
            x = encode_images(vae, x)
        draws = step_draws(run.method, args, data, step, rank, world_size, device)
        try:
            values = train_step(run, step, x, y, draws)
        except FloatingPointError as error:
            raise UserError(f"{error}; stopped without saving. The last good checkpoint is "
                            f"{latest_checkpoint(args, logger)[0]}. Lower --lr, use --precision bf16 rather than "
                            f"fp16, or check the data and the teacher.") from None
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
            counts[name] = counts.get(name, 0) + 1
        interval_steps, done = interval_steps + 1, step + 1
        progress.update(1)
        if done % args.log_every == 0 or done == total_steps:
            log_interval(run, sums, counts, interval_steps, interval_start, done, writer, progress, logger,
                         world_size)
            sums, counts, interval_steps, interval_start = {}, {}, 0, time.time()
        if done % args.ckpt_every == 0 or done == total_steps:
            if rank == 0:
                path = os.path.join(checkpoint_dir(args), f"{done:07d}.pt")
                save_checkpoint_atomic(checkpoint_contents(args, run, data, done), path)
                logger.info(f"saved {path}")
            if world_size > 1:
                dist.barrier()
        if args.sample_every and (done % args.sample_every == 0 or done == total_steps) and rank == 0:
            vae = sample_grid(args, run, data, vae, done, writer, device, logger)
    progress.close()
    if rank == 0:
        writer.close()
    logger.info("done")


def sample_grid(args, run, data, vae, step, writer, device, logger):
    """EMA samples, unguided, into --results-dir/samples: --sample-sampler in --sample-steps for a diffusion model, its
    own sampler and steps for a few-step one. Latents need a VAE to decode: loaded once, then kept (returned)."""
    from torchvision.utils import save_image
    from sample import generate
    if data["latent"] and vae is None and data["vae"] is None:
        logger.info("no sample grid: pass --vae to decode latents")
        return vae
    if data["latent"] and vae is None:
        from data import load_vae
        vae = load_vae(data["vae"], device)
    labels = [i % data["num_classes"] for i in range(min(4 * data["num_classes"], 32))]
    sampling = run.method.sampling()
    own = sampling.sampler is not None  # a few-step student
    images = generate(run.ema, dict(data, sampling=sampling.to_dict()), labels, 0, None if own else args.sample_steps,
                      None if own else args.sample_sampler, cfg_scale=1.0, vae=vae, progress=False)
    path = os.path.join(args.results_dir, "samples", f"{step:07d}.png")
    save_image(images, path, nrow=min(data["num_classes"], 8), normalize=True, value_range=(-1, 1))
    writer.add_images("samples/ema", (images.clamp(-1, 1) + 1) / 2, step)
    return vae


#################################################################################
#                                   Arguments                                   #
#################################################################################

def method_name(args):
    return args.step_distillation or ("distillation" if args.distillation else "plain")


def describe_method(name):  # as the user names it
    return {"plain": "plain training", "distillation": "--distillation"}.get(name, f"--step-distillation {name}")


def add_method_args(parser):
    """Every method's argparse groups, once per class that defines them; returns the flags (dests) they add."""
    owned, seen = set(), set()
    for method in METHODS.values():
        if method.add_args in seen:  # inherited from a method already added
            continue
        seen.add(method.add_args)
        before = {action.dest for action in parser._actions}
        method.add_args(parser)
        owned |= {action.dest for action in parser._actions} - before
    return owned


def check_args(parser, args):
    name = method_name(args)
    METHODS[name].check_args(parser, args)
    foreign = sorted(k for k in parser.method_flags - set(METHODS[name].flags)
                     if getattr(args, k) != parser.get_default(k))
    if foreign:
        users = sorted({describe_method(n) for n, m in METHODS.items() if set(foreign) & set(m.flags)})
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in foreign)} do(es) not apply to "
                     f"{describe_method(name)} (used by {', '.join(users)})")
    if args.vae and not (args.data_path or args.latents_path):
        parser.error("--vae applies to --data-path or --latents-path, not to the pixel-space digits")
    if args.sample_every:
        try:
            check_step_count(args.sample_sampler, args.sample_steps)
        except ValueError as error:
            parser.error(f"--sample-sampler {args.sample_sampler} --sample-steps {args.sample_steps}: {error}")
    if args.latents_path and args.image_size:
        parser.error("--image-size is read from the latents folder; drop it with --latents-path")
    if args.data_path and not args.vae:
        args.vae = "ema"
    if args.num_workers is None:
        args.num_workers = 0 if not (args.data_path or args.latents_path) else 4


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def build_parser():
    parser = argparse.ArgumentParser(description="Train a DiT, distill a teacher DiT into a smaller student "
                                                 "(--distillation: warmup -> feature -> joint stages), or into a "
                                                 "few-step student (--step-distillation).")
    data = parser.add_argument_group("data (default: the embedded scikit-learn digits)")
    source = data.add_mutually_exclusive_group()
    source.add_argument("--data", choices=["digits"], default=None, help="the embedded digits (the default)")
    source.add_argument("--data-path", default=None, help="ImageNet-style folder of class folders (VAE in the loop)")
    source.add_argument("--latents-path", default=None, help="folder of latents written by extract_latents.py")
    data.add_argument("--image-size", type=positive_int, default=None, help="in pixels (digits 8, folders 256)")
    data.add_argument("--vae", default=None, help="VAE (ema, mse, a local folder or hub id) to encode --data-path "
                                                  "(default ema) or decode --latents-path sample grids")
    data.add_argument("--num-workers", type=non_negative_int, default=None,
                      help="data loader processes (default: 0 for digits, 4 otherwise)")

    method = parser.add_argument_group("method (default: plain training of --model) and teacher")
    method.add_argument("--distillation", action="store_true", help="distill --teacher-model into --student-model")
    step_methods = {name: m for name, m in METHODS.items() if m.step_method}
    method.add_argument("--step-distillation", choices=list(step_methods), default=None,
                        help="; ".join(f"{name}: {m.summary}" for name, m in step_methods.items()))
    method.add_argument("--teacher-model", choices=list(DiT_models), default=None,
                        help="teacher architecture (with --step-distillation only for a raw state_dict)")
    method.add_argument("--teacher-ckpt", default=None,
                        help="teacher weights: an official raw state_dict or a training checkpoint (EMA used)")
    parser.method_flags = add_method_args(parser)

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=positive_int, default=None, help="training steps (not --distillation)")
    optim.add_argument("--global-batch-size", type=positive_int, default=256, help="summed over all processes")
    optim.add_argument("--lr", type=non_negative_float, default=1e-4,
                       help="AdamW learning rate of the student (constant, as the original)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    optim.add_argument("--ema-decay", type=probability, default=0.9999, help="EMA decay of the saved weights")
    optim.add_argument("--max-grad-norm", type=non_negative_float, default=1.0,
                       help="gradient clipping of every update (0: off; the original DiT clips nothing, KD terms "
                            "can spike)")
    optim.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16 autocast (fp16 is not offered: DiT-XL/2 goes NaN in it)")
    optim.add_argument("--compile", action="store_true", help="torch.compile every network")
    optim.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    optim.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data order and every draw")

    run = parser.add_argument_group("run")
    run.add_argument("--results-dir", default="results/run", help="run folder; rerunning resumes from it")
    run.add_argument("--log-every", type=positive_int, default=100, help="steps between logged (averaged) losses")
    run.add_argument("--ckpt-every", type=positive_int, default=50_000, help="steps between checkpoints (and the end)")
    run.add_argument("--sample-every", type=non_negative_int, default=0, help="steps between EMA sample grids (0: no)")
    run.add_argument("--sample-sampler", default="dpm++2m",
                     choices=[name for name, sampler in SAMPLERS.items() if "eps" in sampler.parametrisations],
                     help="sampler of those grids (a step-distilled student always uses its own): sample.py's")
    run.add_argument("--sample-steps", type=positive_int, default=20, help="its steps (dpm++2m 20 ~ ddim 50, README)")
    return parser


if __name__ == "__main__":
    run_script(main, parse_args)
