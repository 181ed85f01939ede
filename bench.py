"""Speed and memory of a teacher and a student DiT, side by side: sampling, training, distillation, the input pipeline.

    python bench.py --quick                                 # CPU smoke run of the cpu-small preset (under a minute)
    python bench.py --preset cpu-small --out results/bench  # DiT-Digits-T vs DiT-Digits-S on 64 px latents
    python bench.py --preset gpu-full --out results/bench   # DiT-XL/2 vs DiT-S/2 at 256 px, bf16 (the GPU default)

Everything runs through the project's own code: sampling.sample_batch for sampling; train.build_run and
train.train_step for training (the loop's own step: size distillation's joint stage with the teacher's features, and
with every KD weight 0 the student's plain step); data.encode_images, data.LatentsDataset and
train.rank_batches for the input pipeline. Weights are random (DiT's initialisation); speed does not depend on them.

Sampling: a denoiser step is timed by running sample_batch over --timed-steps respaced steps; the time of 250 DDPM steps
and of --ddim-steps DDIM steps is that per-step time times the step count (every step makes the same model call), or,
with --full, the whole loop. Classifier-free guidance doubles the model's batch.
Options: each is measured on and off against the base row (--precision, eager, the default SDPA kernel): the other
precision (autocast as train.py), torch.compile (as train.py), each SDPA backend, CUDA graphs for batch-1 sampling.
Timed calls of one group go round-robin after warm-up (experiments.time_side_by_side), so load from other jobs hits
them alike; the median is kept.
"""
import argparse
import ctypes
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from contextlib import nullcontext
from functools import partial
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from checks import non_negative_float, positive_float, run_script
from data import LATENT_SCALE, LatentsDataset, encode_images, latents_shard_path, load_vae
from diffusion import create_diffusion
from diffusion.respace import space_timesteps
from distill import teacher_block_indices
from experiments import synchronize, time_side_by_side
from models import (VAE_DOWNSAMPLE, DiT, DiT_models, flops_per_forward, model_config, multiply_adds_per_forward,
                    projection_flops)
from sampling import sample_batch
import train

PRESETS = {
    # Tiny models on 64 px latents (8x8x4, 16 tokens): runs in minutes on a laptop CPU.
    "cpu-small": dict(teacher_model="DiT-Digits-T", student_model="DiT-Digits-S", image_size=64, in_channels=4,
                      num_classes=10, precision="fp32", sample_batch=16, train_batch=16, timed_steps=5, warmup=3,
                      repeats=20, num_workers=2),
    # The paper's setting: 256 px images, 32x32x4 latents, ImageNet's 1000 classes.
    "gpu-full": dict(teacher_model="DiT-XL/2", student_model="DiT-S/2", image_size=256, in_channels=4,
                     num_classes=1000, precision="bf16", sample_batch=256, train_batch=64, timed_steps=10, warmup=2,
                     repeats=5, num_workers=4),
}
QUICK = dict(sample_batch=4, train_batch=4, timed_steps=2, warmup=1, repeats=2, num_workers=0)
OPTIONS = ("precision", "compile", "sdpa-math", "sdpa-flash", "sdpa-efficient", "cuda-graphs")
SDPA_BACKENDS = {"sdpa-math": SDPBackend.MATH, "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
DDPM_STEPS = 250  # the original sample.py's DDPM step count
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched in order against torch.cuda.get_device_name.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0))
# Randomly initialised diffusers AutoencoderKL architectures: four encoder blocks, three of them downsampling (x8).
VAE_ARCHITECTURES = {
    "tiny": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
    "sd-arch": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),  # the Stable Diffusion VAE's shape
}
COLUMNS = (("option", "option"), ("measurement", "measurement"), ("model", "model"), ("batch", "batch"),
           ("ms_per_step", "ms/step"), ("ms_per_image", "ms/image"), ("images_per_s", "images/s"),
           ("peak_mib", "peak MiB"), ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("spread_pct", "spread %"),
           ("note", "note"))


#################################################################################
#                           Peak FLOP/s of the device                           #
#################################################################################

def peak_tflops(device, override):
    """(dense bf16 peak TFLOP/s or None, where it came from)."""
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "n/a (no CUDA; pass --peak-tflops for a CPU peak)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops, f"{name}: dense bf16 peak of {key}"
    return None, f"{name} is not in the table of peaks; pass --peak-tflops"


#################################################################################
#                              Timing and memory                                #
#################################################################################

LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
CPU_PEAK_RESETTABLE = os.access("/proc/self/clear_refs", os.W_OK)
MEMORY_METHODS = {
    "cuda": "resident weights/optimizer state of the measured models + growth of torch.cuda.max_memory_allocated "
            "over one extra call",
    "cpu": "resident weights/optimizer state of the measured models + growth of the process's peak resident set "
           "(VmHWM, reset through /proc/self/clear_refs after malloc_trim) over one extra call",
}


def proc_status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise KeyError(key)


def start_memory_window(device):
    """Begin a peak-memory window; returns the bytes in use at its start (None where it cannot be measured)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    if not CPU_PEAK_RESETTABLE:
        return None
    if hasattr(LIBC, "malloc_trim"):
        LIBC.malloc_trim(0)  # give freed heap pages back, so that the window's allocations show in the resident set
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set, to the current resident set
    return proc_status_bytes("VmRSS")


def peak_memory_growth(fn, device):
    """Peak bytes that one call of fn adds to what is already in use (None where it cannot be measured)."""
    start = start_memory_window(device)
    fn()
    synchronize(device)
    if start is None:
        return None
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status_bytes("VmHWM")
    return max(peak - start, 0)


def state_bytes(*things):
    """Bytes of the parameters and buffers of modules, and of the tensors in optimizers' state."""
    total = 0
    for thing in things:
        if isinstance(thing, torch.optim.Optimizer):
            total += sum(v.numel() * v.element_size() for state in thing.state.values() for v in state.values()
                         if torch.is_tensor(v))
        else:
            total += sum(t.numel() * t.element_size() for t in [*thing.parameters(), *thing.buffers()])
    return total


def make_row(option, measurement, model, batch, seconds=None, spread=None, calls_per_image=None, steps=1,
             flops=None, resident=None, growth=None, peak=None, note=""):
    """One table row. seconds: median time of a call of `steps` steps; calls_per_image: the calls one image needs
    (e.g. 250 / steps for DDPM, 1 / batch for training); flops: per call; resident + growth: peak memory."""
    row = dict(option=option, measurement=measurement, model=model, batch=batch, ms_per_step=None,
               ms_per_image=None, images_per_s=None, peak_mib=None, tflops=None, mfu=None, spread_pct=None, note=note)
    if seconds is not None:
        row["ms_per_step"] = 1000 * seconds / steps
        row["ms_per_image"] = 1000 * seconds * calls_per_image
        row["images_per_s"] = 1 / (seconds * calls_per_image)
        row["spread_pct"] = 100 * spread
    if flops is not None and seconds is not None:
        row["tflops"] = flops / seconds / 1e12
        row["mfu"] = row["tflops"] / peak if peak else None
    if resident is not None and growth is not None:
        row["peak_mib"] = (resident + growth) / 2 ** 20
    return row


#################################################################################
#                     The objects train.py and sample.py use                    #
#################################################################################

def train_arguments(args, teacher_ckpt, precision, compile=False, kd=True):
    """train.py's own argument namespace (its defaults for the KD weights, EMA, clipping, ...) for this benchmark;
    kd=False weighs every KD term 0, which leaves the student's plain diffusion-loss step (no teacher forward)."""
    argv = ["--distillation", "--teacher-model", args.teacher_model, "--teacher-ckpt", teacher_ckpt,
            "--student-model", args.student_model, "--precision", precision, "--global-batch-size",
            str(args.train_batch), "--num-workers", str(args.num_workers), "--seed", str(args.seed),
            "--warmup-steps", "0", "--feature-steps", "0", "--joint-steps", "1"]  # the joint stage: every KD term
    argv += ["--student-depth", str(args.student_depth)] if args.student_depth else []
    argv += ["--compile"] if compile else []
    argv += [] if kd else ["--kd-output-weight", "0", "--kd-feature-weight", "0", "--kd-kl-weight", "0"]
    return train.parse_args(argv)


def training_setup(args, data, teacher_ckpt, precision, device, compile=False):
    """train.py's own runs (train.build_run: method, networks as the loop wraps them, optimizers, EMA): the
    distillation step and the student's plain step; the teacher and EMA student for the sampling rows."""
    runs = {}
    for name, kd in (("student step", False), ("distill step", True)):
        targs = train_arguments(args, teacher_ckpt, precision, compile, kd)
        runs[name] = train.build_run(targs, data, device, world_size=1)
        runs[name].method.begin_step(0, runs[name].ema)  # enters the joint stage
    run = runs["distill step"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    return SimpleNamespace(args=run.args, runs=runs, teacher=run.method.teacher, student=run.method.student,
                           ema=run.ema, projections=run.method.trainable["projections"], opt=run.optimizers["student"],
                           autocast=autocast, precision=precision, teacher_ckpt=teacher_ckpt)


def build_vae(name, device):
    """A randomly initialised AutoencoderKL of a named architecture, or data.load_vae for ema / mse / a path."""
    if name not in VAE_ARCHITECTURES:
        return load_vae(name, device)
    from diffusers import AutoencoderKL
    blocks = len(VAE_ARCHITECTURES[name]["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks,
                        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, norm_num_groups=32,
                        **VAE_ARCHITECTURES[name])
    return vae.to(device).eval().requires_grad_(False)


def write_latents(folder, num_images, data):
    """A one-shard latents folder in extract_latents.py's format (meta.json + latents_00000.pt), random values."""
    shape = (num_images, data["in_channels"], data["input_size"], data["input_size"])
    meta = dict(image_size=data["image_size"], vae=None, num_images=num_images, shard_size=num_images, num_shards=1,
                class_names=[str(c) for c in range(data["num_classes"])], flip=False, mode="sample", seed=0,
                latent_scale=LATENT_SCALE, data_path=None)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    torch.save({"latents": torch.randn(shape), "labels": torch.randint(0, data["num_classes"], (num_images,))},
               latents_shard_path(folder, 0))


def cuda_graph_denoiser(model, batch, precision, device):
    """model.forward at one batch size captured in a CUDA graph, as an object sample_batch takes for the model.

    Static input buffers are refilled in place and the graph replayed; its output buffer is cloned, since the next
    replay overwrites it. Autocast runs without its weight-cast cache, which graph capture does not allow.
    """
    config = model.config
    static_x = torch.randn(batch, config["in_channels"], config["input_size"], config["input_size"], device=device)
    static_t = torch.zeros(batch, dtype=torch.long, device=device)
    static_y = torch.zeros(batch, dtype=torch.long, device=device)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16" \
            else nullcontext()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad(), autocast():
        for _ in range(3):  # warm up on a side stream before capture, as torch.cuda.graph's documentation asks
            model(static_x, static_t, static_y)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), autocast():
        static_out = model(static_x, static_t, static_y)  # (N, C_out, H, W)

    def forward(x, t, y):
        static_x.copy_(x)
        static_t.copy_(t)
        static_y.copy_(y)
        graph.replay()
        return static_out.clone()
    return SimpleNamespace(config=config, forward=forward)


#################################################################################
#                                 Measurements                                  #
#################################################################################

def sampling_rows(option, label, model, cases, setup, args, device, peak, timed_model=None):
    """One row per (batch, cfg, sampler) case: sampling.sample_batch on `timed_model` (default: model itself)."""
    timed_model = model if timed_model is None else timed_model
    config = model.config
    functions, plans = {}, {}
    for batch, cfg, sampler in cases:
        target_steps = DDPM_STEPS if sampler == "ddpm" else args.ddim_steps
        run_steps = target_steps if args.full else args.timed_steps
        diffusion = create_diffusion(f"ddim{run_steps}" if sampler == "ddim" else str(run_steps),
                                     learn_sigma=config["learn_sigma"])
        noise = torch.randn(batch, config["in_channels"], config["input_size"], config["input_size"], device=device)
        labels = torch.randint(0, config["num_classes"], (batch,), device=device)

        def sample(diffusion=diffusion, noise=noise, labels=labels, cfg=cfg, sampler=sampler):
            with torch.no_grad(), setup.autocast:  # sample.generate runs under no_grad
                sample_batch(timed_model, diffusion, noise, labels, args.cfg_scale if cfg else 1.0, sampler)
        functions[(batch, cfg, sampler)] = sample
        plans[(batch, cfg, sampler)] = (target_steps, run_steps)
    timings = time_side_by_side(functions, device, args.warmup, args.repeats)
    rows = []
    for (batch, cfg, sampler), (seconds, spread, warmup_seconds) in timings.items():
        target_steps, run_steps = plans[(batch, cfg, sampler)]
        model_batch = 2 * batch if cfg else batch  # guidance runs the conditional and the unconditional half
        note = f"full {target_steps}-step loop" if args.full else \
            f"{run_steps} timed steps x {target_steps}/{run_steps}"
        if cfg:
            note += f"; model batch {model_batch}"
        if timed_model is not model:
            note += f"; warm-up {warmup_seconds:.1f} s"
        growth = peak_memory_growth(functions[(batch, cfg, sampler)], device)
        measurement = f"sample {sampler.upper()}-{target_steps}" + (f", cfg {args.cfg_scale:g}" if cfg else "")
        rows.append(make_row(option, measurement, label, batch, seconds, spread, steps=run_steps,
                             calls_per_image=target_steps / run_steps / batch,
                             flops=flops_per_forward(config) * model_batch * run_steps, resident=state_bytes(model),
                             growth=growth, peak=peak, note=note))
    return rows


def sampling_for_option(option, setup, args, device, peak, base):
    """Sampling rows of teacher and student (the student's EMA weights, which sample.py loads) for one option."""
    rows = []
    batches = sorted({1, args.sample_batch})
    for label, model in ((args.teacher_model, setup.teacher), (args.student_label, setup.ema)):
        if option["graphs"]:
            graphed = cuda_graph_denoiser(model, 1, setup.precision, device)
            rows += sampling_rows(option["name"], label, model, [(1, False, "ddim")], setup, args, device, peak,
                                  timed_model=graphed)
            continue
        cases = [(b, cfg, s) for b in batches for cfg in (False, True) for s in ("ddpm", "ddim")] if base \
            else [(b, False, "ddim") for b in batches]
        timed = None
        if option["compile"]:
            # Static shapes per batch size; forward_with_cfg (guidance) would bypass the compiled forward anyway.
            torch._dynamo.reset()
            timed = torch.compile(model, dynamic=False)
        rows += sampling_rows(option["name"], label, model, cases, setup, args, device, peak, timed_model=timed)
    return rows


def training_rows(option, setup, args, data, device, peak):
    """Teacher forward, student step (plain training) and distillation step, timed side by side: the steps are
    train.train_step on train.build_run's runs, the loop's own code."""
    if option["compile"]:
        torch._dynamo.reset()  # a fresh compile, as train.py starts with
        setup = training_setup(args, data, setup.teacher_ckpt, setup.precision, device, compile=True)
    student, teacher, opt = setup.student, setup.teacher, setup.opt
    batch, run = args.train_batch, setup.runs["distill step"]
    x0 = torch.randn(batch, data["in_channels"], data["input_size"], data["input_size"], device=device)
    y = torch.randint(0, data["num_classes"], (batch,), device=device)
    draws = train.step_draws(run.method, run.args, data, 0, 0, 1, device)
    x_t = run.method.diffusion.q_sample(x0, draws["t"], noise=draws["noise"])

    def teacher_forward():
        with torch.no_grad(), setup.autocast:  # the teacher's call inside distill.compute_losses
            run.called["teacher"](x_t, draws["t"], y, return_features=True, force_drop_ids=draws["drop"])

    def training_step(name):  # the body of train.py's loop, less its logging
        train.train_step(setup.runs[name], 0, x0, y, draws)

    functions = {"teacher forward": teacher_forward, "student step": partial(training_step, "student step"),
                 "distill step": partial(training_step, "distill step")}
    timings = time_side_by_side(functions, device, args.warmup, args.repeats)
    student_flops = 3 * flops_per_forward(student.config) * batch  # forward + backward (twice the forward)
    teacher_flops = flops_per_forward(teacher.config) * batch
    plain = setup.runs["student step"]
    plans = {
        "teacher forward": (args.teacher_model, teacher_flops, (teacher,)),
        "student step": (args.student_label, student_flops, (plain.method.student, plain.ema,
                                                             plain.optimizers["student"])),
        "distill step": (f"{args.teacher_model} -> {args.student_label}", teacher_flops + student_flops + 3 * batch
                         * projection_flops(student.config, teacher.config),
                         (teacher, student, setup.ema, setup.projections, opt)),
    }
    ratio = timings["distill step"][0] / (timings["teacher forward"][0] + timings["student step"][0])
    rows = []
    for name, (seconds, spread, warmup_seconds) in timings.items():
        label, flops, resident = plans[name]
        for each in setup.runs.values():  # gradients count as growth, not as resident state
            each.optimizers["student"].zero_grad(set_to_none=True)
        growth = peak_memory_growth(functions[name], device)
        note = f"distill / (teacher forward + student step) = {ratio:.3f}" if name == "distill step" else ""
        if option["compile"]:
            note = "; ".join(filter(None, [note, f"warm-up {warmup_seconds:.1f} s"]))
        rows.append(make_row(option["name"], name, label, batch, seconds, spread, calls_per_image=1 / batch,
                             flops=flops, resident=state_bytes(*resident), growth=growth, peak=peak, note=note))
    opt.zero_grad(set_to_none=True)
    return rows, ratio


def data_rows(args, targs, data, vae, device):
    """The VAE in the loop (data.encode_images on a batch of images) vs reading pre-extracted latents."""
    if vae is None:
        return [make_row("base", "input pipeline", "-", args.train_batch,
                         note="n/a (pixel-space models read images directly, no VAE)")]
    batch = args.train_batch
    images = torch.rand(batch, 3, data["image_size"], data["image_size"], device=device) * 2 - 1
    with tempfile.TemporaryDirectory() as folder:
        write_latents(folder, batch * (args.warmup + args.repeats + 2), data)  # one epoch covers every call
        batches = train.rank_batches(LatentsDataset(folder), targs, 0, 1, 0, pin_memory=device.type == "cuda")

        def read_latents():  # as train.py's loop fetches a batch
            x, y = next(batches)
            x.to(device, non_blocking=True)
            y.to(device, non_blocking=True)
        functions = {"vae": partial(encode_images, vae, images), "latents": read_latents}
        timings = time_side_by_side(functions, device, args.warmup, args.repeats)
        growth = {name: peak_memory_growth(fn, device) for name, fn in functions.items()}
        batches.close()  # stops the loader's workers
    vae_name = f"random '{args.vae}' AutoencoderKL" if args.vae in VAE_ARCHITECTURES else args.vae
    seconds, spread, _ = timings["vae"]
    rows = [make_row("base", "VAE encode (data.encode_images)", vae_name, batch, seconds, spread, 1 / batch,
                     resident=state_bytes(vae), growth=growth["vae"],
                     note=f"{data['image_size']} px images; image decoding and cropping not included")]
    seconds, spread, _ = timings["latents"]
    rows.append(make_row("base", "read latents (LatentsDataset)", "-", batch, seconds, spread, 1 / batch,
                         resident=0, growth=growth["latents"],
                         note=f"train.rank_batches, {targs.num_workers} workers, memory-mapped shard in page cache"))
    return rows


def sdpa_unavailable(backend, configs, precision, device):
    """None if the SDPA backend runs the models' attention shapes at this precision, else the reason."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for config in configs:
        heads, tokens = config["num_heads"], (config["input_size"] // config["patch_size"]) ** 2
        q = torch.randn(2, heads, tokens, config["hidden_size"] // heads, device=device, dtype=dtype,
                        requires_grad=True)
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, q, q).sum().backward()
        except RuntimeError as error:
            return f"n/a on {device.type} at {precision}: {str(error).splitlines()[0]}"
    return None


def option_rows(option, setup, args, data, device, peak, base):
    """All rows of one option; a single n/a row where the option does not exist on this device."""
    name = option["name"]
    if option["graphs"] and device.type != "cuda":
        return [make_row(name, "sample DDIM, batch 1", "both", 1, note="n/a (no CUDA)")], None
    sdpa = SDPA_BACKENDS.get(option["key"])
    if sdpa is not None:
        reason = sdpa_unavailable(sdpa, [setup.teacher.config, setup.ema.config], setup.precision, device)
        if reason:
            return [make_row(name, "all", "both", None, note=reason)], None
    with sdpa_kernel(sdpa) if sdpa is not None else nullcontext():
        rows = sampling_for_option(option, setup, args, device, peak, base)
        if option["graphs"]:
            return rows, None
        more, ratio = training_rows(option, setup, args, data, device, peak)
    return rows + more, ratio


def option_list(args):
    """The base option first, the other options at the base precision, the other precision last (one setup at a
    time is alive)."""
    other = "bf16" if args.precision == "fp32" else "fp32"
    names = {"precision": other, "compile": "torch.compile", "sdpa-math": "SDPA math", "sdpa-flash": "SDPA flash",
             "sdpa-efficient": "SDPA efficient", "cuda-graphs": "CUDA graphs"}
    options = [dict(key="base", name=f"base ({args.precision})", precision=args.precision, compile=False,
                    graphs=False)]
    for key in sorted(args.options, key=lambda k: (k == "precision", OPTIONS.index(k))):
        options.append(dict(key=key, name=names[key], precision=other if key == "precision" else args.precision,
                            compile=key == "compile", graphs=key == "cuda-graphs"))
    return options


#################################################################################
#                                    Report                                     #
#################################################################################

def format_value(key, value):
    if value is None:
        return "n/a" if key not in ("note", "batch") else ""
    if isinstance(value, float):
        if key == "mfu":
            return f"{100 * value:.1f}%"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(rows):
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(format_value(key, row[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def write_report(report, out_dir):
    """report.json and report.md in out_dir; returns the markdown text."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    settings = "\n".join(f"- {key}: {value}" for key, value in report["settings"].items())
    ratios = "\n".join(f"- {name}: {ratio:.3f}" for name, ratio in report["distill_ratio"].items())
    text = (f"# DiT benchmark: {report['settings']['teacher']} teacher, {report['settings']['student']} student\n\n"
            f"{settings}\n\n{markdown_table(report['rows'])}\n\n"
            f"distill step / (teacher forward + student step), the goal being under 1.10:\n{ratios}\n")
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if models:
            return f"CPU: {models[0]}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def settings(args, data, device, peak_source):
    teacher = model_config(args.teacher_model, input_size=data["input_size"], in_channels=data["in_channels"],
                           num_classes=data["num_classes"])
    student = model_config(args.student_model, **student_overrides(args, data))
    with torch.device("meta"):
        counts = [sum(p.numel() for p in DiT(**c).parameters()) for c in (teacher, student)]
    space = f"{data['input_size']}x{data['input_size']}x{data['in_channels']} " + \
        ("latents" if data["latent"] else "pixels")
    return {
        "device": device_name(device), "torch": torch.__version__, "preset": args.preset,
        "teacher": args.teacher_model, "student": args.student_label,
        "models": f"teacher {counts[0]:,} parameters, {multiply_adds_per_forward(teacher) / 1e9:.3g} GMACs/forward; "
                  f"student {counts[1]:,} parameters, {multiply_adds_per_forward(student) / 1e9:.3g} GMACs/forward",
        "input": f"{data['image_size']} px images as {space}, {data['num_classes']} classes; random weights",
        "base": f"--precision {args.precision}, eager, default SDPA kernel; TF32 matmuls on (as train.py)",
        "batches": f"sampling 1 and {args.sample_batch}, training {args.train_batch}",
        "sampling": ("full loops" if args.full else f"{args.timed_steps} timed steps extrapolated") +
                    f" to DDPM-{DDPM_STEPS} and DDIM-{args.ddim_steps}; cfg scale {args.cfg_scale:g}",
        "timing": f"{args.warmup} warm-up calls, median of {args.repeats} side-by-side calls",
        "options": ", ".join(args.options) or "none",
        "memory": MEMORY_METHODS[device.type] if device.type == "cuda" or CPU_PEAK_RESETTABLE else "n/a on this OS",
        "flops": "matmul multiply-adds from the architecture x 2; training step = 3 x forward",
        "peak": peak_source,
        "vae": args.vae if data["latent"] else "none (pixel space)",
    }


#################################################################################
#                                     Main                                      #
#################################################################################

def student_overrides(args, data):
    overrides = dict(input_size=data["input_size"], in_channels=data["in_channels"], num_classes=data["num_classes"])
    return overrides | ({"depth": args.student_depth} if args.student_depth else {})


def main(args):
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py and sample.py
    torch.backends.cudnn.allow_tf32 = True
    torch._dynamo.config.recompile_limit = 64  # one compiled graph per model, batch size and mode
    torch.manual_seed(args.seed)
    input_size = args.image_size if args.pixel_space else args.image_size // VAE_DOWNSAMPLE
    data = dict(image_size=args.image_size, latent=not args.pixel_space, vae=None, in_channels=args.in_channels,
                input_size=input_size, num_classes=args.num_classes)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    try:  # before any measurement, so that a wrong --vae fails at once
        vae = build_vae(args.vae, device) if data["latent"] else None
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --vae {args.vae}: {error}") from None
    rows, ratios, setup = [], {}, None
    with tempfile.TemporaryDirectory() as folder:
        teacher_ckpt = os.path.join(folder, "teacher.pt")  # random weights, read back by train.load_teacher
        torch.save(DiT_models[args.teacher_model](input_size=input_size, in_channels=args.in_channels,
                                                  num_classes=args.num_classes).state_dict(), teacher_ckpt)
        for option in option_list(args):
            print(f"measuring {option['name']} ...", flush=True)
            if setup is None or setup.precision != option["precision"]:
                setup = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                setup = training_setup(args, data, teacher_ckpt, option["precision"], device)
            try:
                option_result, ratio = option_rows(option, setup, args, data, device, peak, option["key"] == "base")
            except (RuntimeError, FloatingPointError) as error:  # one failing option must not lose the others
                traceback.print_exc()
                option_result, ratio = [make_row(option["name"], "all", "both", None,
                                                 note=f"failed: {type(error).__name__}: {error}".splitlines()[0])], None
            rows += option_result
            if ratio is not None:
                ratios[option["name"]] = ratio
            if option["key"] == "base":
                rows += data_rows(args, setup.args, data, vae, device)
    report = dict(settings=settings(args, data, device, peak_source), rows=rows, distill_ratio=ratios,
                  seconds=time.perf_counter() - start)
    print(write_report(report, args.out))
    print(f"wrote {os.path.join(args.out, 'report.json')} and report.md ({report['seconds']:.0f} s)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                        help="defaults for the flags below: gpu-full (DiT-XL/2 vs DiT-S/2, 256 px, bf16) or cpu-small "
                             "(DiT-Digits-T vs DiT-Digits-S, 64 px, fp32); auto: gpu-full when CUDA is there")
    parser.add_argument("--quick", action="store_true",
                        help="a fast smoke run: batches of 4, 2 timed steps, 1 warm-up, 2 repeats, no torch.compile "
                             "unless --options names it")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")

    models = parser.add_argument_group("models and data")
    models.add_argument("--teacher-model", choices=list(DiT_models), default=None, help="teacher architecture")
    models.add_argument("--student-model", choices=list(DiT_models), default=None, help="student architecture")
    models.add_argument("--student-depth", type=int, default=None, help="override the student's number of blocks")
    models.add_argument("--image-size", type=int, default=None, help="image size in pixels")
    models.add_argument("--in-channels", type=int, default=None, help="channels the models denoise (4 for latents)")
    models.add_argument("--num-classes", type=int, default=None, help="number of class labels")
    models.add_argument("--pixel-space", action="store_true",
                        help="the models denoise pixels (input = image size, no VAE), like the digits default; "
                             "otherwise VAE latents of image size / 8")
    models.add_argument("--vae", default=None,
                        help="VAE for the encode-vs-latents rows (default tiny): 'tiny' or 'sd-arch' (randomly "
                             "initialised AutoencoderKL, downsampling x8; sd-arch has the Stable Diffusion VAE's "
                             "size), or ema / mse / a path for data.load_vae")

    measure = parser.add_argument_group("measurements")
    measure.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                         help="base precision (autocast as train.py); the other one is the 'precision' option")
    measure.add_argument("--options", nargs="*", choices=OPTIONS, default=None,
                         help="speed options to measure against the base row (default: all; --quick leaves out "
                              "compile)")
    measure.add_argument("--sample-batch", type=int, default=None, help="the large sampling batch (besides batch 1)")
    measure.add_argument("--train-batch", type=int, default=None, help="training batch (one process)")
    measure.add_argument("--timed-steps", type=int, default=None,
                         help="denoiser steps each sampling call runs; times are scaled to the full step counts")
    measure.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps the time per image is given for")
    measure.add_argument("--full", action="store_true",
                         help="run the whole 250-step DDPM and --ddim-steps DDIM loops instead of extrapolating")
    measure.add_argument("--cfg-scale", type=non_negative_float, default=1.5,
                         help="classifier-free guidance scale (not 1)")
    measure.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    measure.add_argument("--repeats", type=int, default=None, help="timed calls; the median is reported")
    measure.add_argument("--num-workers", type=int, default=None,
                         help="data loader processes for the latents row (train.py's default for latents is 4)")
    measure.add_argument("--peak-tflops", type=positive_float, default=None,
                         help="device peak TFLOP/s for MFU (default: the dense bf16 peak of a known GPU)")
    measure.add_argument("--threads", type=int, default=None,
                         help="CPU threads for torch (default: torch's choice; 1 is steadier on a shared machine)")
    measure.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    measure.add_argument("--out", default="results/bench", help="folder for report.json and report.md")

    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available")
    if args.preset == "auto":
        args.preset = "gpu-full" if args.device == "cuda" else "cpu-small"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key, value) if args.quick else value)
    if args.options is None:
        args.options = [o for o in OPTIONS if not (args.quick and o == "compile")]
    check_args(parser, args)
    return args


def check_args(parser, args):
    positive = ("image_size", "in_channels", "num_classes", "sample_batch", "train_batch", "timed_steps",
                "ddim_steps", "repeats")
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    if args.warmup < 0 or args.num_workers < 0:
        parser.error("--warmup and --num-workers must be non-negative")
    if args.cfg_scale == 1.0:
        parser.error("--cfg-scale 1 is sampling without guidance; give the scale of the guided rows")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error("--peak-tflops must be positive")
    if not args.pixel_space and args.image_size % VAE_DOWNSAMPLE:
        parser.error(f"--image-size {args.image_size} is not a multiple of the VAE's {VAE_DOWNSAMPLE} "
                     f"(or pass --pixel-space)")
    if args.pixel_space and args.vae:
        parser.error("--vae applies to latent models, not with --pixel-space")
    if not args.pixel_space and args.vae is None:
        args.vae = "tiny"
    for steps in {args.timed_steps, args.ddim_steps}:
        try:
            space_timesteps(1000, f"ddim{steps}")
        except ValueError:
            parser.error(f"{steps} DDIM steps need an integer stride through 1000 steps (e.g. 2, 5, 10, 25, 50, 100)")
    input_size = args.image_size if args.pixel_space else args.image_size // VAE_DOWNSAMPLE
    try:
        teacher = model_config(args.teacher_model, input_size=input_size, in_channels=args.in_channels)
        student = model_config(args.student_model, input_size=input_size, in_channels=args.in_channels,
                               **({"depth": args.student_depth} if args.student_depth else {}))
        teacher_block_indices(student["depth"], teacher["depth"])
    except ValueError as error:
        parser.error(str(error))
    args.student_label = args.student_model + (f" (depth {args.student_depth})" if args.student_depth else "")


if __name__ == "__main__":
    run_script(main, parse_args)
