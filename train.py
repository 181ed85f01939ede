"""Train a DiT, or distill a teacher DiT into a student, in one process or under torchrun.

    python train.py --model DiT-Digits-T --max-steps 3000 --results-dir results/teacher
    python train.py --distillation --teacher-model DiT-Digits-T --teacher-ckpt results/teacher/checkpoints/0003000.pt \
        --student-model DiT-Digits-S --warmup-steps 500 --feature-steps 1000 --joint-steps 1500 --results-dir results/kd
    torchrun --nproc_per_node=8 train.py --distillation --teacher-model DiT-XL/2 --teacher-ckpt DiT-XL-2-256x256.pt \
        --student-model DiT-S/2 --latents-path latents/ --results-dir results/xl-to-s
    python train.py --step-distillation consistency --teacher-ckpt results/kd/checkpoints/0003000.pt \
        --sampling-steps 4 --max-steps 1200 --results-dir results/kd-4step

Plain training, size distillation (distill.py) and step distillation (step_distill.py) run through the same loop: each
is a method object with the student, its loss, its per-step state and what a checkpoint keeps.

Rerunning the same command with the same --results-dir resumes from its newest valid checkpoint, exactly.
"""
import argparse
import json
import logging
import os
import sys
import time
import zlib
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from checks import (lock_folder, non_negative_float, non_negative_int, number_in, positive_float, positive_int,
                    probability, read_file, remove_temporaries, run_script)
from diffusion import create_diffusion
from distill import (STAGE_TERMS, STAGES, FeatureProjections, feature_loss, gaussian_kl_loss, init_student_from_teacher,
                     output_loss, softmax_kl_loss, stage_at, teacher_block_indices)
from models import (EPS_SAMPLING, DiT, DiT_models, load_state_dict_strict, model_config, save_checkpoint_atomic,
                    update_ema)
from step_distill import DIFFUSION_STEPS, METHODS as STEP_METHOD_NAMES, STEP_METHODS
from sample import SAMPLERS, check_step_count

# Flags that may change when a run is resumed; any other difference means a different experiment. --results-dir is
# where the run lives, not what it does: a moved or copied run directory resumes.
RESUMABLE_CHANGES = {"max_steps", "ckpt_every", "log_every", "sample_every", "sample_sampler", "sample_steps",
                     "num_workers", "compile", "results_dir"}


#################################################################################
#                             Distributed set-up                                #
#################################################################################

def setup_distributed():
    """torchrun's env vars -> DDP (nccl on CUDA, gloo on CPU); none -> one process on cuda if there, else cpu."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def create_logger(results_dir, rank):
    """Rank 0 logs to the console and results_dir/log.txt; other ranks log nothing."""
    logger = logging.getLogger("train")
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(os.path.join(results_dir, "log.txt"))):
            handler.setFormatter(formatter)
            logger.addHandler(handler)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def derived_seed(*parts):
    """A 63-bit seed from (seed, purpose, step, rank, ...): the same parts give the same stream after a resume."""
    words = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]  # str hash() is salted
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


#################################################################################
#                                    Data                                       #
#################################################################################

def build_dataset(args, device):
    """The training set and a plain description of what the model denoises.

    Returns (dataset, data, vae): data = {"image_size", "latent", "vae", "in_channels", "input_size",
    "num_classes"}; vae is the encoder to run on every batch (image folders) or None.
    """
    from data import (DIGITS_CLASSES, DIGITS_SIZE, DigitsDataset, ImageFolderDataset, LatentsDataset, load_vae)
    from models import VAE_DOWNSAMPLE
    vae = None
    if args.data_path:
        image_size = args.image_size or 256
        dataset = ImageFolderDataset(args.data_path, image_size)
        vae = load_vae(args.vae, device)
        data = dict(image_size=image_size, latent=True, vae=args.vae, in_channels=4,
                    input_size=image_size // VAE_DOWNSAMPLE, num_classes=len(dataset.class_names))
    elif args.latents_path:
        dataset = LatentsDataset(args.latents_path)
        latent_shape = dataset[0][0].shape
        data = dict(image_size=dataset.meta["image_size"], latent=True, vae=args.vae or dataset.meta.get("vae"),
                    in_channels=latent_shape[0], input_size=latent_shape[-1], num_classes=len(dataset.class_names))
    else:
        image_size = args.image_size or DIGITS_SIZE
        dataset = DigitsDataset("train", image_size)
        data = dict(image_size=image_size, latent=False, vae=None, in_channels=1, input_size=image_size,
                    num_classes=DIGITS_CLASSES)
    return dataset, data, vae


def rank_batches(dataset, args, rank, world_size, start_step, pin_memory):
    """Endless batches for this rank, starting at global step start_step.

    Each epoch is one permutation from (seed, epoch); global batch b is its b-th slice of --global-batch-size, and
    rank r takes the r-th part of that. So the data order depends only on the step (a resumed run continues where it
    stopped) and N processes together see exactly the batches one process would.
    """
    global_batch = args.global_batch_size
    local_batch = global_batch // world_size
    steps_per_epoch = len(dataset) // global_batch
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(derived_seed(args.seed, "epoch",
                                                                                                  epoch)))
        batches = [order[b * global_batch + rank * local_batch: b * global_batch + (rank + 1) * local_batch].tolist()
                   for b in range(offset, steps_per_epoch)]
        yield from DataLoader(dataset, batch_sampler=batches, num_workers=args.num_workers, pin_memory=pin_memory)
        epoch, offset = epoch + 1, 0


def step_randomness(args, data, step, rank, world_size, num_timesteps, class_dropout_prob):
    """Timesteps, noise, label drops and two uniforms of this step, drawn for the whole global batch from (seed, step).

    Every rank draws the same global tensors and keeps its slice, so a run on N processes matches one process.
    Returns {"t", "noise", "drop", "uniform" (a step-distillation grid point), "w_uniform" (a guidance scale)}.
    """
    generator = torch.Generator().manual_seed(derived_seed(args.seed, "step", step))
    global_batch, local_batch = args.global_batch_size, args.global_batch_size // world_size
    t = torch.randint(0, num_timesteps, (global_batch,), generator=generator)
    noise = torch.randn(global_batch, data["in_channels"], data["input_size"], data["input_size"], generator=generator)
    drop = (torch.rand(global_batch, generator=generator) < class_dropout_prob).long()
    uniform, w_uniform = torch.rand(2, global_batch, generator=generator)
    part = slice(rank * local_batch, (rank + 1) * local_batch)
    return {"t": t[part], "noise": noise[part], "drop": drop[part], "uniform": uniform[part],
            "w_uniform": w_uniform[part]}


#################################################################################
#                                   Models                                      #
#################################################################################

def load_teacher(args, data, device):
    """The frozen teacher: --teacher-model filled with --teacher-ckpt (raw state_dict or training checkpoint)."""
    teacher = DiT_models[args.teacher_model](input_size=data["input_size"], in_channels=data["in_channels"],
                                             num_classes=data["num_classes"])
    checkpoint = read_file(args.teacher_ckpt, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                           "truncated, or not a DiT checkpoint: pass a complete --teacher-ckpt")
    if "ema" in checkpoint or "model" in checkpoint:  # a training checkpoint: its EMA weights
        checkpoint = checkpoint.get("ema", checkpoint.get("model"))
    load_state_dict_strict(teacher, checkpoint, f"--teacher-ckpt {args.teacher_ckpt} (for --teacher-model "
                                                f"{args.teacher_model})")
    teacher.requires_grad_(False)  # frozen three ways: no grads, eval mode, and no_grad around its call
    teacher.eval()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return teacher.to(device=device, dtype=dtype)


def build_student(args, data, teacher):
    name = args.student_model if args.distillation else args.model
    overrides = dict(input_size=data["input_size"], in_channels=data["in_channels"], num_classes=data["num_classes"])
    if args.student_depth:
        overrides["depth"] = args.student_depth
    student = DiT(**model_config(name, **overrides))
    if args.student_init_from_teacher:
        init_student_from_teacher(student, teacher)
    return student


def load_step_teacher(args, data, device):
    """The frozen teacher of step distillation and its sampling entry: any DiT checkpoint this project writes (config
    read from it: a plain, size-distilled or step-distilled model) or a raw state_dict with --teacher-model."""
    from models import load_dit_checkpoint
    raw = dict(model_name=args.teacher_model, image_size=data["image_size"], num_classes=data["num_classes"]) \
        if args.teacher_model else {}
    teacher, teacher_data = load_dit_checkpoint(args.teacher_ckpt, **raw)  # a UserError names the file
    shape = {k: teacher.config[k] for k in ("input_size", "in_channels", "num_classes")}
    if shape != {k: data[k] for k in shape} or teacher_data["latent"] != data["latent"]:
        raise SystemExit(f"error: the teacher {args.teacher_ckpt} denoises {shape} "
                         f"({'latents' if teacher_data['latent'] else 'pixels'}), the training data is "
                         f"{ {k: data[k] for k in shape} } ({'latents' if data['latent'] else 'pixels'}): train on "
                         f"the teacher's own data")
    teacher.requires_grad_(False)  # frozen three ways: no grads, eval mode, and no_grad around its call
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return teacher.eval().to(device=device, dtype=dtype), teacher_data["sampling"]


class DiffusionTraining:
    """Plain training (stage None) and size distillation (warmup -> feature -> joint): compute_losses at each step's
    stage. The same interface as step_distill.StepDistillation, so train()'s loop is one loop for every method."""

    def __init__(self, args, data, device):
        self.args = args
        self.teacher = load_teacher(args, data, device) if args.distillation else None
        torch.manual_seed(derived_seed(args.seed, "init"))  # the same initial student (and projections) everywhere
        self.student = build_student(args, data, self.teacher)
        self.block_map, self.projections = [], torch.nn.Module()
        if args.distillation:
            self.block_map = teacher_block_indices(self.student.config["depth"], self.teacher.config["depth"])
            self.projections = FeatureProjections(self.student.config["hidden_size"],
                                                  self.teacher.config["hidden_size"],
                                                  self.student.config["depth"]).to(device)
        self.diffusion = create_diffusion(timestep_respacing="", learn_sigma=self.student.config["learn_sigma"])
        self.stage = None

    def stage_at(self, step):
        args = self.args
        return stage_at(step, args.warmup_steps, args.feature_steps, args.joint_steps) if args.distillation else None

    def label(self, step):
        return self.stage_at(step) or "plain"

    def begin_step(self, step, student, ema):
        stage, previous = self.stage_at(step), self.stage
        self.stage = stage
        if stage == previous:  # plain training stays None; a resumed run logs the stage it resumes in
            return None
        return f"step {step}: stage {stage} (loss = diffusion" + "".join(
            f" + {getattr(self.args, f'kd_{term}_weight')} * kd_{term}" for term in STAGE_TERMS[stage]) + ")"

    def losses(self, model, x0, y, randomness, autocast):
        return compute_losses(model, self.teacher, self.projections, self.block_map, self.diffusion, x0, y,
                              randomness["t"], randomness["noise"], randomness["drop"], self.stage, self.args,
                              autocast)

    def end_step(self, student):
        pass

    def state_dict(self):
        return {"projections": self.projections.state_dict(), "stage": self.stage}

    def load_state_dict(self, checkpoint):
        self.projections.load_state_dict(checkpoint.get("projections", {}))

    def sampling(self):
        return dict(EPS_SAMPLING, method="size-distillation" if self.args.distillation else "plain")


def build_method(args, data, device):
    """The training method of this run: plain, size distillation, or one of step_distill's."""
    if not args.step_distillation:
        return DiffusionTraining(args, data, device)
    teacher, teacher_sampling = load_step_teacher(args, data, device)
    torch.manual_seed(derived_seed(args.seed, "init"))  # the same new weights (a w-embedding) in every run
    try:
        return STEP_METHODS[args.step_distillation](args, teacher, teacher_sampling, clip=not data["latent"])
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


#################################################################################
#                                 Checkpoints                                   #
#################################################################################

def checkpoint_dir(args):
    return os.path.join(args.results_dir, "checkpoints")


def latest_checkpoint(args, logger):
    """The newest checkpoint in --results-dir that loads, or None; unreadable files are reported and skipped."""
    folder = checkpoint_dir(args)
    names = sorted((n for n in os.listdir(folder) if n.endswith(".pt") and n[:-3].isdigit()), reverse=True) \
        if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: fall back to the one before
            logger.info(f"skipping unreadable checkpoint {path}: {type(error).__name__}: {error}")
    return None, None


def check_resumable(saved_args, args):
    # Progressive rounds split --max-steps evenly, so there it fixes where each round starts.
    resumable = RESUMABLE_CHANGES - {"max_steps"} if args.step_distillation == "progressive" else RESUMABLE_CHANGES
    parser = build_parser()  # a flag newer than the saved run counts as given at its default
    saved_args = {k: saved_args.get(k, parser.get_default(k)) for k in vars(args)}
    changed = {k: (saved_args[k], v) for k, v in vars(args).items() if k not in resumable and saved_args[k] != v}
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise SystemExit(f"error: {args.results_dir} holds a run with other options ({details}); rerun the same "
                         f"command to resume it, or choose a new --results-dir")


#################################################################################
#                                 Training step                                 #
#################################################################################

def compute_losses(student, teacher, projections, block_map, diffusion, x0, y, t, noise, drop, stage, args, autocast):
    """Per-example loss terms of one step: the student's diffusion loss and the KD terms its stage adds.

    `stage` is None for plain training. Returns (total (N,), {name: (N,)}). Teacher and student see the same x_t, t,
    labels and label drops.
    """
    # The stage's KD terms; a term weighted 0 is not computed (no teacher forward at all when none is left).
    kd_terms = [] if stage is None else [term for term in STAGE_TERMS[stage] if getattr(args, f"kd_{term}_weight") > 0]
    need_features = "feature" in kd_terms
    x_t = diffusion.q_sample(x0, t, noise=noise)  # (N, C, H, W)
    with autocast:
        out = student(x_t, t, y, return_features=need_features, force_drop_ids=drop)
    student_out, student_features = out if need_features else (out, None)
    student_out = student_out.float()  # (N, C_out, H, W)
    terms = diffusion.hybrid_loss_terms(student_out, x0, x_t, t, noise)
    terms = {"diffusion": terms.pop("loss"), **terms}
    total = terms["diffusion"]
    if not kd_terms:
        return total, terms

    with torch.no_grad(), autocast:
        teacher_out, teacher_features = teacher(x_t, t, y, return_features=True, force_drop_ids=drop)
    teacher_out = teacher_out.float()
    if "feature" in kd_terms:
        aligned = [teacher_features[i] for i in block_map]
        with autocast:  # the projections are matmuls too: bf16 under --precision bf16; the loss stays fp32
            projected = projections(student_features)
        terms["kd_feature"] = feature_loss(projected, aligned)
        total = total + args.kd_feature_weight * terms["kd_feature"]
    if "output" in kd_terms:
        terms["kd_output"] = output_loss(student_out, teacher_out, x0.shape[1])
        total = total + args.kd_output_weight * terms["kd_output"]
    if "kl" in kd_terms:
        if args.kd_kl_type == "softmax":
            terms["kd_kl"] = softmax_kl_loss(student_out, teacher_out, args.kd_temperature)
        else:
            terms["kd_kl"] = gaussian_kl_loss(diffusion, student_out, teacher_out, x_t, t, args.kd_temperature)
        total = total + args.kd_kl_weight * terms["kd_kl"]
    return total, terms


def all_reduce_grads(parameters, world_size):
    """Average the gradients of modules outside DDP (the feature projections)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if world_size == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


#################################################################################
#                                     Main                                      #
#################################################################################

def save_sample_grid(ema, data, sampling, vae, path, step, writer, sampler, num_steps):
    """EMA samples, unguided: `sampler` in num_steps for a diffusion model, the distilled sampler and steps for a
    few-step one."""
    from torchvision.utils import save_image
    from sample import generate
    labels = [i % data["num_classes"] for i in range(min(4 * data["num_classes"], 32))]
    few_step = sampling["sampler"] is not None
    images = generate(ema, dict(data, sampling=sampling), labels, seed=0,
                      num_sampling_steps=None if few_step else num_steps, sampler=None if few_step else sampler,
                      cfg_scale=1.0, vae=vae, progress=False)
    save_image(images, path, nrow=min(data["num_classes"], 8), normalize=True, value_range=(-1, 1))
    writer.add_images("samples/ema", (images.clamp(-1, 1) + 1) / 2, step)


def main(args):
    rank, world_size, device = setup_distributed()
    try:
        # One run per --results-dir: rank 0 holds its lock for the run's life (a second run stops at once).
        with lock_folder(args.results_dir, "--results-dir") if rank == 0 else nullcontext():
            train(args, rank, world_size, device)
    finally:
        cleanup()
    if world_size > 1:
        # Constructing DDP leaves a reference to the process group that destroy_process_group cannot drop (torch
        # 2.14), so gloo's threads outlive it and meet the interpreter's teardown, which has aborted finished runs
        # (SIGABRT, "terminate called without an active exception"). Everything is written and closed by now: flush
        # and leave without that teardown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def checkpoint_contents(args, method, student, ema, opt, data, step):
    """One plain-data checkpoint: weights, optimizer, the method's state, options, config, data and how it samples."""
    return {"model": student.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step,
            **method.state_dict(), "args": vars(args), "config": student.config,
            "data": {k: data[k] for k in ("image_size", "latent", "vae")}, "sampling": method.sampling()}


def train(args, rank, world_size, device):
    from torch.utils.tensorboard import SummaryWriter
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere+ GPUs, as the original train.py
    torch.backends.cudnn.allow_tf32 = True
    if args.global_batch_size % world_size:
        raise SystemExit(f"error: --global-batch-size {args.global_batch_size} is not divisible by the {world_size} "
                         f"processes")
    os.makedirs(checkpoint_dir(args), exist_ok=True)
    os.makedirs(os.path.join(args.results_dir, "samples"), exist_ok=True)
    if rank == 0:
        remove_temporaries(checkpoint_dir(args))  # of a run killed while it wrote a checkpoint
    logger = create_logger(args.results_dir, rank)
    writer = SummaryWriter(os.path.join(args.results_dir, "tensorboard")) if rank == 0 else None

    # ---------------------------------------------------------------- data, method and models
    try:
        dataset, data, vae = build_dataset(args, device)
    except (FileNotFoundError, ValueError, OSError) as error:  # a missing path, an empty folder, a bad VAE
        raise SystemExit(f"error: {error}") from None
    if len(dataset) < args.global_batch_size:
        raise SystemExit(f"error: the data set has {len(dataset)} examples, fewer than --global-batch-size "
                         f"{args.global_batch_size}")
    method = build_method(args, data, device)  # plain, size distillation or step distillation: the student and loss
    student = method.student.to(device)
    if args.grad_checkpointing:
        student.enable_gradient_checkpointing()
    ema = DiT(**student.config).to(device)
    ema.load_state_dict(student.state_dict())
    ema.requires_grad_(False)
    ema.eval()
    extra = getattr(method, "projections", torch.nn.Module())  # trained beside the student (size distillation)
    trainable = [p for p in student.parameters() if p.requires_grad] + list(extra.parameters())
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=True)  # one kernel per step
    total_steps = args.warmup_steps + args.feature_steps + args.joint_steps if args.distillation else args.max_steps

    # ---------------------------------------------------------------- resume
    path, checkpoint = latest_checkpoint(args, logger)
    if checkpoint is not None:
        check_resumable(checkpoint["args"], args)
        student.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        opt.load_state_dict(checkpoint["opt"])
        method.load_state_dict(checkpoint)
        start_step = checkpoint["step"]
        logger.info(f"resumed from {path} at step {start_step}")
    else:
        start_step = 0
        if rank == 0:
            with open(os.path.join(args.results_dir, "args.json"), "w") as f:
                json.dump(vars(args), f, indent=2)
    del checkpoint

    logger.info(f"data: {data}, {len(dataset):,} examples; device {device}, {world_size} process(es)")
    logger.info(f"student {student.config} with {sum(p.numel() for p in student.parameters()):,} parameters")
    if method.teacher is not None:
        logger.info(f"teacher {method.teacher.config} with {sum(p.numel() for p in method.teacher.parameters()):,} "
                    f"parameters" + (f"; student block i <- teacher block {method.block_map}"
                                     if args.distillation else f"; {args.step_distillation} distillation"))

    model = DDP(student, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else student
    if args.compile:
        model = torch.compile(model)
        method.teacher = torch.compile(method.teacher) if method.teacher is not None else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
    batches = rank_batches(dataset, args, rank, world_size, start_step, pin_memory=device.type == "cuda")

    # ---------------------------------------------------------------- loop
    model.train()
    sums, interval_steps, interval_start = {}, 0, time.time()
    progress = tqdm(total=total_steps, initial=start_step, desc="train", disable=rank != 0, dynamic_ncols=True)
    for step in range(start_step, total_steps):
        message = method.begin_step(step, student, ema)  # a new stage or round
        if message:
            logger.info(message)
        torch.manual_seed(derived_seed(args.seed, "global", step, rank))  # anything else random (VAE sampling)
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if vae is not None:
            from data import encode_images
            x = encode_images(vae, x)
        randomness = step_randomness(args, data, step, rank, world_size, DIFFUSION_STEPS,
                                     student.config["class_dropout_prob"])
        randomness = {k: v.to(device) for k, v in randomness.items()}

        loss, terms = method.losses(model, x, y, randomness, autocast)
        opt.zero_grad(set_to_none=True)
        loss.mean().backward()
        all_reduce_grads(extra.parameters(), world_size)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm or float("inf"))
        if not torch.isfinite(grad_norm):  # identical on every rank after the all-reduce
            finite_terms = {k: v.mean().item() for k, v in terms.items()}
            last = latest_checkpoint(args, logger)[0]
            raise SystemExit(f"error: non-finite loss or gradient at step {step} (terms {finite_terms}); stopped "
                             f"without saving. The last good checkpoint is {last}. Lower --lr, use --precision bf16 "
                             f"rather than fp16, or check the data and the teacher.")
        opt.step()
        update_ema(ema, student, args.ema_decay)
        method.end_step(student)

        # ------------------------------------------------------------ logging
        for name, value in {"total": loss, **terms, "grad_norm": grad_norm}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float().mean()
        interval_steps += 1
        done = step + 1
        progress.update(1)
        if done % args.log_every == 0 or done == total_steps:
            names = sorted(sums)
            means = torch.stack([sums[n] for n in names]) / interval_steps
            if world_size > 1:
                dist.all_reduce(means)
                means /= world_size
            images_per_second = interval_steps * args.global_batch_size / (time.time() - interval_start)
            if rank == 0:
                values = dict(zip(names, means.tolist()))
                for name, value in values.items():
                    writer.add_scalar(f"loss/{name}" if name != "grad_norm" else "train/grad_norm", value, done)
                if args.distillation:
                    writer.add_scalar("train/stage", STAGES.index(method.stage), done)
                writer.add_scalar("train/lr", opt.param_groups[0]["lr"], done)
                writer.add_scalar("train/images_per_second", images_per_second, done)
                progress.set_postfix(loss=f"{values['total']:.4f}", stage=method.label(step))
                logger.info(f"step {done:07d} [{method.label(step)}] "
                            + " ".join(f"{n}={v:.4f}" for n, v in values.items())
                            + f" images/s={images_per_second:.1f}")
            sums, interval_steps, interval_start = {}, 0, time.time()

        if done % args.ckpt_every == 0 or done == total_steps:
            if rank == 0:
                path = os.path.join(checkpoint_dir(args), f"{done:07d}.pt")
                save_checkpoint_atomic(checkpoint_contents(args, method, student, ema, opt, data, done), path)
                logger.info(f"saved {path}")
            if world_size > 1:
                dist.barrier()
        if args.sample_every and (done % args.sample_every == 0 or done == total_steps) and rank == 0:
            if data["latent"] and vae is None and data["vae"] is None:
                logger.info("no sample grid: pass --vae to decode latents")
            else:
                if data["latent"] and vae is None:
                    from data import load_vae
                    vae = load_vae(data["vae"], device)
                save_sample_grid(ema, data, method.sampling(), vae,
                                 os.path.join(args.results_dir, "samples", f"{done:07d}.png"), done, writer,
                                 args.sample_sampler, args.sample_steps)
    progress.close()
    if rank == 0:
        writer.close()
    logger.info("done")


#################################################################################
#                                   Arguments                                   #
#################################################################################

STEP_FLAGS = ("sampling_steps", "progressive_start_steps", "consistency_skip", "consistency_target_decay",
              "guidance_range")


def check_step_distillation_args(parser, args):
    if args.distillation or args.model or args.student_model or args.student_depth or args.student_init_from_teacher:
        parser.error("--step-distillation trains a student of the teacher's own architecture: drop --distillation, "
                     "--model and --student-* (distil the size first, then give that checkpoint as --teacher-ckpt)")
    if not args.teacher_ckpt:
        parser.error("--step-distillation needs --teacher-ckpt")
    if not os.path.isfile(args.teacher_ckpt):
        parser.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    if args.max_steps is None:
        parser.error("--step-distillation needs --max-steps N (N >= 1)")
    method_flags = {"progressive": ("progressive_start_steps", "sampling_steps"),
                    "consistency": ("consistency_skip", "consistency_target_decay", "sampling_steps"),
                    "guidance": ()}
    foreign = [k for k in STEP_FLAGS if k != "guidance_range" and k not in method_flags[args.step_distillation]
               and getattr(args, k) != parser.get_default(k)]
    if foreign:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in foreign)} do(es) not apply to "
                     f"--step-distillation {args.step_distillation}")
    if args.guidance_range is not None:
        low, high = args.guidance_range
        if low > high:
            parser.error(f"--guidance-range {low} {high}: give WMIN <= WMAX (1 is no guidance)")
        args.guidance_range = [low, high]


def check_image_size(parser, args):
    """--image-size must give the model a whole number of patches: pixels for the digits, latents (image / 8) for
    image folders. (A step-distilled student's size is its teacher's, checked against the data when loaded.)"""
    name = args.student_model if args.distillation else args.model
    if args.image_size is None or name is None:
        return
    from models import VAE_DOWNSAMPLE
    patch = model_config(name)["patch_size"]
    multiple = patch * (VAE_DOWNSAMPLE if args.data_path else 1)
    if args.image_size % multiple:
        grid = f"latents of image-size / {VAE_DOWNSAMPLE} in patches of {patch}" if args.data_path else \
            f"patches of {patch}"
        parser.error(f"--image-size {args.image_size} must be a multiple of {multiple} for {name} ({grid})")


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
    data.add_argument("--image-size", type=positive_int, default=None,
                      help="image size in pixels (digits 8, folders 256)")
    data.add_argument("--vae", default=None, help="VAE (ema, mse, a local folder or hub id) to encode --data-path "
                                                  "(default ema) or decode --latents-path sample grids")
    data.add_argument("--num-workers", type=non_negative_int, default=None,
                      help="data loader processes (default: 0 for digits, 4 otherwise)")

    model = parser.add_argument_group("model (plain training)")
    model.add_argument("--model", choices=list(DiT_models), default=None, help="architecture to train from scratch")

    teacher = parser.add_argument_group("teacher (with --distillation or --step-distillation)")
    teacher.add_argument("--distillation", action="store_true", help="distill --teacher-model into --student-model")
    teacher.add_argument("--teacher-model", choices=list(DiT_models), default=None,
                         help="teacher architecture (with --step-distillation only for a raw state_dict)")
    teacher.add_argument("--teacher-ckpt", default=None,
                         help="teacher weights: an official raw state_dict or a training checkpoint (EMA used)")

    student = parser.add_argument_group("student")
    student.add_argument("--student-model", choices=list(DiT_models), default=None,
                         help="student architecture (with --distillation)")
    student.add_argument("--student-depth", type=positive_int, default=None,
                         help="override the student's number of blocks (e.g. 14 for a half-depth DiT-XL/2)")
    student.add_argument("--student-init-from-teacher", action="store_true",
                         help="start from the teacher's embedders, final layer and evenly spaced blocks "
                              "(needs the teacher's width)")

    kd = parser.add_argument_group("knowledge distillation losses")
    kd.add_argument("--kd-output-weight", type=non_negative_float, default=1.0,
                    help="weight of the predicted-noise MSE")
    kd.add_argument("--kd-feature-weight", type=non_negative_float, default=0.1,
                    help="weight of the per-block feature MSE")
    kd.add_argument("--kd-kl-weight", type=non_negative_float, default=0.5, help="weight of the output-distribution KL")
    kd.add_argument("--kd-kl-type", choices=["softmax", "gaussian"], default="softmax",
                    help="softmax: KL of channel softmaxes at temperature T, times T^2 (the method's formula); "
                         "gaussian: KL between the tempered Gaussians p(x_{t-1}|x_t) of teacher and student")
    kd.add_argument("--kd-temperature", type=positive_float, default=2.0, help="distillation temperature T")

    stages = parser.add_argument_group("stages (with --distillation)")
    stages.add_argument("--warmup-steps", type=non_negative_int, default=100_000,
                        help="steps of diffusion loss + per-block feature distillation")
    stages.add_argument("--feature-steps", type=non_negative_int, default=200_000,
                        help="steps adding output (noise) MSE distillation")
    stages.add_argument("--joint-steps", type=non_negative_int, default=300_000,
                        help="steps adding the tempered output-distribution KL")

    steps = parser.add_argument_group(
        "step distillation (--step-distillation): a student of the teacher's own architecture, started from its "
        "weights, that samples in a few steps (--teacher-ckpt: any checkpoint of this project, or a raw state_dict "
        "with --teacher-model); runs --max-steps steps")
    steps.add_argument("--step-distillation", choices=list(STEP_METHOD_NAMES), default=None,
                       help="progressive: rounds halving the DDIM steps (Salimans & Ho 2022); consistency: "
                            "consistency distillation with multistep sampling (Song et al. 2023, LCM); guidance: "
                            "the student takes the guidance scale as an input (Meng et al. 2023)")
    steps.add_argument("--sampling-steps", type=positive_int, default=4,
                       help="steps the student samples in: progressive distils down to it; consistency records it "
                            "as the checkpoint's default (any count up to 1000 / --consistency-skip works)")
    steps.add_argument("--progressive-start-steps", type=number_in(int, 2), default=64,
                       help="DDIM steps of the teacher in the first progressive round (--sampling-steps times a "
                            "power of two); --max-steps is split evenly over the rounds")
    steps.add_argument("--consistency-skip", type=positive_int, default=20,
                       help="skipping interval k: the teacher's DDIM step goes from t to t - k (LCM's 20)")
    steps.add_argument("--consistency-target-decay", type=number_in(float, 0, 1, high_open=True), default=0.95,
                       help="EMA decay of the consistency target network (LCM's 0.95)")
    steps.add_argument("--guidance-range", type=non_negative_float, nargs=2, metavar=("WMIN", "WMAX"), default=None,
                       help="guidance scales the student learns to take as input (w drawn uniformly; 1 = no "
                            "guidance): required for guidance, optional with progressive or consistency (then the "
                            "teacher's steps are guided, as LCM)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max-steps", type=positive_int, default=None,
                       help="training steps (plain training and step distillation)")
    optim.add_argument("--global-batch-size", type=positive_int, default=256,
                       help="batch size summed over all processes")
    optim.add_argument("--lr", type=non_negative_float, default=1e-4,
                       help="AdamW learning rate (constant, as the original)")
    optim.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="AdamW weight decay")
    optim.add_argument("--ema-decay", type=probability, default=0.9999, help="EMA decay of the saved weights")
    optim.add_argument("--max-grad-norm", type=non_negative_float, default=1.0,
                       help="gradient clipping (0: off; the original DiT clips nothing, KD terms can spike)")
    optim.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                       help="bf16 autocast (fp16 is not offered: DiT-XL/2 goes NaN in it)")
    optim.add_argument("--compile", action="store_true", help="torch.compile the student (and teacher)")
    optim.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    optim.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of the data order, noise, timesteps and drops")

    run = parser.add_argument_group("run")
    run.add_argument("--results-dir", default="results/run", help="run folder; rerunning resumes from it")
    run.add_argument("--log-every", type=positive_int, default=100, help="steps between logged (averaged) losses")
    run.add_argument("--ckpt-every", type=positive_int, default=50_000,
                     help="steps between checkpoints (and at the end)")
    run.add_argument("--sample-every", type=non_negative_int, default=0,
                     help="steps between EMA sample grids (0: none)")
    run.add_argument("--sample-sampler", choices=[name for name in SAMPLERS if name != "consistency"],
                     default="dpm++2m",
                     help="sampler of those grids (a step-distilled student always uses its own): sample.py's")
    run.add_argument("--sample-steps", type=positive_int, default=20,
                     help="its steps (dpm++2m 20 matches ddim 50, README)")

    return parser


def check_args(parser, args):
    if args.step_distillation:
        check_step_distillation_args(parser, args)
    elif args.distillation:
        if not (args.teacher_model and args.teacher_ckpt and args.student_model):
            parser.error("--distillation needs --teacher-model, --teacher-ckpt and --student-model")
        if args.model:
            parser.error("--model is for plain training; with --distillation name the student with --student-model")
        if args.max_steps is not None:
            parser.error("with --distillation the run lasts --warmup-steps + --feature-steps + --joint-steps; "
                         "drop --max-steps")
        if args.warmup_steps + args.feature_steps + args.joint_steps < 1:
            parser.error("the stages add up to no steps")
        if args.teacher_ckpt and not os.path.isfile(args.teacher_ckpt):
            parser.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    else:
        given = [f for f in ("teacher_model", "teacher_ckpt", "student_model") if getattr(args, f)]
        if given or args.student_init_from_teacher:
            parser.error("--teacher-*, --student-model and --student-init-from-teacher need --distillation or "
                         "--step-distillation")
        if not args.model:
            parser.error("plain training needs --model (or pass --distillation)")
        if args.max_steps is None:
            parser.error("plain training needs --max-steps N (N >= 1)")
    if args.step_distillation is None and any(getattr(args, k) != parser.get_default(k) for k in STEP_FLAGS):
        parser.error("--sampling-steps, --progressive-*, --consistency-* and --guidance-range need "
                     "--step-distillation")
    if args.student_init_from_teacher and args.teacher_model and args.student_model and (
            model_config(args.student_model)["hidden_size"] != model_config(args.teacher_model)["hidden_size"]):
        parser.error("--student-init-from-teacher copies teacher blocks, so the student needs the teacher's width: "
                     "use --student-model of the teacher's size with a smaller --student-depth")
    if args.vae and not (args.data_path or args.latents_path):
        parser.error("--vae applies to --data-path or --latents-path, not to the pixel-space digits")
    if args.sample_every:
        try:
            check_step_count(args.sample_sampler, args.sample_steps)
        except ValueError as error:
            parser.error(f"--sample-sampler {args.sample_sampler} --sample-steps {args.sample_steps}: {error}")
    if args.latents_path and args.image_size:
        parser.error("--image-size is read from the latents folder; drop it with --latents-path")
    check_image_size(parser, args)
    if args.data_path and not args.vae:
        args.vae = "ema"
    if args.num_workers is None:
        args.num_workers = 0 if not (args.data_path or args.latents_path) else 4


if __name__ == "__main__":
    run_script(main, parse_args)
