"""Sample images from an exported DiT denoiser with only torch (.ts, .pt2), or only numpy and onnxruntime or OpenVINO
(.onnx).

    python run_exported.py dit.onnx --num-steps 50 --class-labels 1 2 3 --seed 0 --out samples.npz --png grid.png
    python run_exported.py dit_int8.onnx --runtime openvino --class-labels 1 2 3 --out samples.npz

Standalone on purpose: copy this file and a file written by export.py to the target (a Jetson, a server) and run it;
it imports no project module. It reads the metadata export.py embeds in the file (image size, channels, classes,
learned sigma, folded guidance, pixel or latent, how the model samples), builds DiT's linear beta schedule and runs
in numpy the sampler the model was made for: deterministic DDIM (eta = 0) as sample.py --sampler ddim does, or a
step-distilled student's own (ddim-trailing, consistency, tcd, flow-euler) in its few steps, with the guidance scale
as an input for a guidance-distilled model. Pixel-space models write an ADM-layout .npz: arr_0 uint8 (N, H, W, C)
images, arr_1 int64 labels. Latent models write the raw latents instead (arr_0 float32 (N, C, h, w), in the scaled
latent space): decoding them needs the Stable Diffusion VAE, which this runner does not carry, e.g.
diffusers' AutoencoderKL.decode(latents / latent_scale) on a machine that has it.
TorchScript and ExportedProgram files run on the CPU (the trace records the CPU as the device of the tensors it
creates); ONNX files run on onnxruntime's CUDA provider when it is installed, else on the CPU, or with --runtime
openvino on OpenVINO's CPU plugin (`pip install openvino`), which reads the same fp32, fp16 and Q/DQ INT8 files. OpenVINO runs
each file in the precision written in it: its CPU default of bf16 arithmetic on CPUs with AVX-512 BF16 or AMX is
switched off (INFERENCE_PRECISION_HINT f32), so an fp32 file computes in fp32 and the INT8 file's Linear layers in int8.
"""
import argparse
import contextlib
import json
import math
import os
import struct
import sys
import tempfile
import time
import warnings
import zipfile
import zlib

import numpy as np

METADATA_KEY = "dit_export"  # ONNX metadata_props key holding the metadata as JSON
METADATA_FILE = "dit_export.json"  # the same JSON as an extra file inside TorchScript and .pt2 archives
FORMATS = {".ts": "torchscript", ".onnx": "onnx", ".pt2": "exported"}
WARMUP_RUNS = 3  # untimed runs per file and batch size before timing (first-call allocations, caches)
PROJECT_MODULES = ("models", "diffusion", "data", "export", "train", "sample", "sampling", "distill", "step_distill",
                   "evaluate", "checks")
TEMPORARY_PREFIX = ".tmp-"  # checks.TEMPORARY_PREFIX, so checks.remove_temporaries clears what a killed run left
RUNTIMES = ("onnxruntime", "openvino")  # for ONNX files; TorchScript and .pt2 files run on torch
OPENVINO_MISSING = "--runtime openvino needs OpenVINO, which is not installed here: pip install openvino"
# The CPU features that decide which int8 kernels a runtime has: x86 VNNI / AMX do u8 x s8 (and s8 x s8) dot products
# in int32; AVX2 alone has VPMADDUBSW, whose int16 pair sums saturate; ARM's dot product / i8mm instructions.
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16",
                "asimddp", "i8mm", "sve", "bf16")


@contextlib.contextmanager
def quiet_torchscript_deprecation():
    """Silence only the FutureWarnings that torch.jit.trace / freeze / save / load raise in torch >= 2.10.

    TorchScript is deprecated in favour of torch.export, but it is the format libtorch (e.g. on a Jetson's CPU) loads,
    and its dynamic-int8 Linear layers have no torch.export equivalent; we use it knowingly.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.(trace|freeze|save|load)", category=FutureWarning)
        yield


def model_format(path):
    extension = os.path.splitext(path)[1]
    if extension not in FORMATS:
        raise ValueError(f"{path}: unknown extension {extension!r}; export.py writes .ts (TorchScript), .onnx or "
                         f".pt2 (torch.export) files")
    return FORMATS[extension]


def load_denoiser(path, device="cpu", threads=None, runtime="onnxruntime"):
    """(denoise, metadata) for an exported file; denoise(x float32, t float32, y int32[, w float32]) -> float32 numpy
    array (w: the guidance scales, an input of guidance-distilled models only).

    device is used for onnxruntime only ("cuda" tries its CUDA provider); the others run on the CPU.
    threads: CPU threads of the runtime (None: its default, one per core). runtime: how an ONNX file runs,
    "onnxruntime" or "openvino" (its CPU plugin).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; write it with export.py")
    kind = model_format(path)
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "openvino" and kind != "onnx":
        raise ValueError(f"--runtime openvino runs ONNX files; {path} is a {kind} file, which runs on torch: drop "
                         f"--runtime or pass the .onnx file")
    if runtime == "openvino":
        _, request, metadata = openvino_session(path, threads)

        def denoise(x, t, y, w=None):
            outputs = request.infer({"x": x, "t": t, "y": y, **({} if w is None else {"w": w})})
            return outputs[0].copy()  # the request's own buffer, overwritten by its next call
    elif kind == "onnx":
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0  # 0: onnxruntime's default
        errors = ort.capi.onnxruntime_pybind11_state
        session = read_exported(path, lambda: ort.InferenceSession(path, sess_options=options, providers=providers),
                                (errors.InvalidProtobuf, errors.Fail, errors.InvalidGraph, errors.NoSuchFile))
        metadata = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)

        def denoise(x, t, y, w=None):
            return session.run(None, {"x": x, "t": t, "y": y, **({} if w is None else {"w": w})})[0]
    else:
        import torch

        if threads:
            torch.set_num_threads(threads)
        extra_files = {METADATA_FILE: ""}
        if kind == "torchscript":
            # Loading an int8 file also prints libtorch's C++ notice that quantized tensors are deprecated; it is
            # raised outside Python's warnings machinery, so it cannot be filtered here and is left visible.
            with quiet_torchscript_deprecation():
                module = read_exported(path, lambda: torch.jit.load(path, map_location="cpu",
                                                                    _extra_files=extra_files))
        else:
            module = read_exported(path, lambda: torch.export.load(path, extra_files=extra_files)).module()
        metadata = extra_files[METADATA_FILE]

        def denoise(x, t, y, w=None):
            # TorchScript's optimising executor recompiles at each new batch size (seconds for DiT-S/2, stalls that
            # wreck latency); DiT's time is in its GEMMs, which the plain executor runs just as fast.
            inputs = [torch.from_numpy(v) for v in (x, t, y) + (() if w is None else (w,))]
            with torch.inference_mode(), torch.jit.optimized_execution(False):
                return module(*inputs).numpy()
    if not metadata:
        raise ValueError(f"{path} carries no DiT metadata ({METADATA_KEY}); export it with export.py")
    return denoise, json.loads(metadata)


def openvino_session(path, threads=None, profile=False):
    """(compiled model, infer request, metadata JSON) of an ONNX file on OpenVINO's CPU plugin, one compile for every
    batch size (the file's batch dimension stays dynamic). profile: record per-node timings (PERF_COUNT) for
    openvino_kernels."""
    try:
        import openvino as ov
    except ImportError:
        raise ValueError(OPENVINO_MISSING) from None
    core = ov.Core()
    model = read_exported(path, lambda: core.read_model(path))
    key = ["framework", METADATA_KEY]  # OpenVINO keeps an ONNX file's metadata_props under "framework"
    metadata = model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": profile}  # the file's own precision, not bf16
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    return compiled, compiled.create_infer_request(), metadata


def openvino_kernels(path, feed, threads=None):
    """What OpenVINO's CPU plugin runs for a file, from its own profiling of a run on feed (a dict of inputs) after
    warm-up runs: [{"node": layer type, "kernel": exec_type (implementation and precision, e.g. brgemm_avx512_i8),
    "count", "ms"}], the slowest first."""
    _, request, _ = openvino_session(path, threads, profile=True)
    for _ in range(WARMUP_RUNS + 1):  # the last run's timings: the first ones include one-time allocations
        request.infer(feed)
    kernels = {}
    for node in request.get_profiling_info():
        if node.status.name == "NOT_RUN":
            continue
        entry = kernels.setdefault((node.node_type, node.exec_type), [0, 0.0])
        entry[0] += 1
        entry[1] += node.real_time.total_seconds() * 1e3
    return [{"node": node, "kernel": kernel, "count": count, "ms": round(ms, 3)}
            for (node, kernel), (count, ms) in sorted(kernels.items(), key=lambda item: -item[1][1])]


def cpu_description():
    """The CPU's name and the instruction sets that decide its int8 kernels (CPU_FEATURES, from /proc/cpuinfo), and
    OpenVINO's OPTIMIZATION_CAPABILITIES where OpenVINO is installed: {"name", "features", "openvino"}."""
    name, flags = None, set()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Hardware") and name is None:
                    name = value.strip()
                elif key in ("flags", "Features"):
                    flags |= set(value.split())
    capabilities = None
    try:
        import openvino as ov
        core = ov.Core()
        capabilities = list(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
        name = name or core.get_property("CPU", "FULL_DEVICE_NAME")
    except ImportError:
        pass
    return {"name": name or "unknown", "features": [f for f in CPU_FEATURES if f in flags], "openvino": capabilities}


def describe_cpu(cpu):
    """One line for a table header, from cpu_description()."""
    x86 = "avx2" in cpu["features"]
    missing = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f not in cpu["features"]] if x86 else []
    return (f"CPU {cpu['name']}: {' '.join(cpu['features']) or 'none of ' + ' '.join(CPU_FEATURES)}"
            + (f" (no {', '.join(missing)})" if missing else "")
            + (f"; OpenVINO capabilities {' '.join(cpu['openvino'])}" if cpu["openvino"] else ""))


def read_exported(path, load, runtime_errors=()):
    """load(), with a file that cannot be read (truncated, corrupt, another format) reported as a ValueError that
    names it. (This file imports no project module, so it cannot use checks.read_file; the same idea.)"""
    try:
        return load()
    except (RuntimeError, OSError, ValueError, EOFError, zipfile.BadZipFile, *runtime_errors) as error:
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else "no detail"
        raise ValueError(f"{path}: cannot be read ({type(error).__name__}: {detail}) - it is truncated or not a "
                         f"file export.py wrote: export it again") from error


#################################################################################
#                                DDIM in numpy                                  #
#################################################################################

def alphas_cumprod(metadata):
    """alpha_bar_t for t = 0 .. T - 1 of DDPM's linear beta schedule (float64), as DiT trains with."""
    schedule = metadata["diffusion"]
    if schedule["schedule"] != "linear":
        raise ValueError(f"this runner knows DiT's linear beta schedule only, not {schedule['schedule']!r}")
    betas = np.linspace(schedule["beta_start"], schedule["beta_end"], schedule["num_timesteps"], dtype=np.float64)
    return np.cumprod(1.0 - betas)


def ddim_timesteps(num_timesteps, num_steps):
    """The kept timesteps, ascending: DDIM's fixed integer stride giving exactly num_steps (respacing "ddimN")."""
    for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == num_steps:
            return np.arange(0, num_timesteps, stride)
    raise ValueError(f"no integer stride gives exactly {num_steps} of {num_timesteps} steps; try 25, 50, 100 or 250")


def ddim_sample(denoise, noise, labels, metadata, num_steps):
    """Deterministic DDIM (Song et al. 2021, Eq. 12 with sigma = 0) from noise (N, C, H, W) to x_0 (float32).

    With a learned sigma the model outputs 2C channels; the first C are the noise prediction eps. For pixel-space
    models each step's x_0 estimate is clamped to [-1, 1] and eps re-derived from it, as sample.py does (DiT's
    clip_denoised); latents are not clamped.
    """
    channels = metadata["in_channels"]
    timesteps = ddim_timesteps(metadata["diffusion"]["num_timesteps"], num_steps)
    alpha_bar = alphas_cumprod(metadata)[timesteps]  # (S,)
    alpha_bar_prev = np.append(1.0, alpha_bar[:-1])  # of the next, less noisy kept step (1 after t = 0)
    x = noise.astype(np.float64)
    y = labels.astype(np.int32)
    for i in reversed(range(len(timesteps))):
        t = np.full(len(x), timesteps[i], dtype=np.float32)
        eps = denoise(x.astype(np.float32), t, y)[:, :channels].astype(np.float64)  # (N, C, H, W)
        recip, recip_minus_one = np.sqrt(1.0 / alpha_bar[i]), np.sqrt(1.0 / alpha_bar[i] - 1)
        x0 = recip * x - recip_minus_one * eps  # DDIM Eq. 12, predicted x_0
        if not metadata["latent"]:
            x0 = np.clip(x0, -1.0, 1.0)
            eps = (recip * x - x0) / recip_minus_one
        x = np.sqrt(alpha_bar_prev[i]) * x0 + np.sqrt(1 - alpha_bar_prev[i]) * eps  # the direction to x_t
    return x.astype(np.float32)


# Step-distilled students (sampling.py holds the torch originals; tests hold the two equal). Their files say how
# they sample in metadata["sampling"]: the x-eps parametrisation, the sampler, its step counts and guidance range.
EPS_SAMPLING = {"method": "plain", "parametrisation": "eps", "sampler": None, "steps": None, "default_steps": None,
                "guidance_range": None, "consistency_skip": None}
CONSISTENCY_SIGMA_DATA, CONSISTENCY_TIMESTEP_SCALE = 0.5, 10.0  # LCM's boundary scalings, as sampling.py
TCD_GAMMA = 0.3  # TCD's default stochasticity, as sampling.py


def sampling_entry(metadata):
    """metadata["sampling"] with the eps defaults for what a file lacks (sampling.SamplingSpec's reader, in dicts)."""
    return dict(EPS_SAMPLING, **(metadata.get("sampling") or {}))


def trailing_timesteps(num_steps, stride=1, num_timesteps=1000):
    """num_steps timesteps from the last one down (trailing spacing), on the grid of every stride-th timestep."""
    points = num_timesteps // stride
    if not 1 <= num_steps <= points:
        raise ValueError(f"cannot place {num_steps} steps on a grid of {points} timesteps")
    return [stride * ((points * (num_steps - i) + num_steps // 2) // num_steps) - 1 for i in range(num_steps)]


def x0_and_eps(output, x, alpha, sigma, parametrisation, clip):
    """(x_0, eps) from a model output: eps, or x-eps (x_0 = sigma^2 x~ + alpha (x - sigma eps~)); clip re-derives
    eps from the clamped x_0."""
    channels = x.shape[1]
    output = output.astype(np.float64)
    if parametrisation == "eps":
        eps = output[:, :channels]
        x0 = (x - sigma * eps) / alpha
    else:
        x0 = sigma ** 2 * output[:, channels:2 * channels] + alpha * (x - sigma * output[:, :channels])
        eps = None
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
    if clip or eps is None:
        eps = (x - alpha * x0) / sigma
    return x0, eps


def tcd_s(t_next, gamma):
    """TCD's jump target floor((1 - gamma) t_next), rounded in float32 as sampling.tcd_s (and diffusers) round it."""
    return int(np.floor(np.float32(1 - gamma) * np.float32(t_next)))


def few_step_sample(denoise, noise, step_noise, labels, metadata, num_steps, w=None):
    """ddim-trailing (deterministic DDIM from t = 999, ending at x_0), multistep consistency sampling (x_0 = f(x, t),
    re-noised to the next grid point with step_noise[i]) or TCD's strategic stochastic sampling (the jump to s =
    floor((1 - gamma) t_next) with x_0 = f(x, t), forward-noised to t_next with step_noise[i]; the last step returns
    x at s = 0), as metadata["sampling"]["sampler"] says."""
    sampling = sampling_entry(metadata)
    alpha_bar = np.concatenate([[1.0], alphas_cumprod(metadata)])  # index t + 1: t = -1 is the clean end
    clip = not metadata["latent"]
    x, y = noise.astype(np.float64), labels.astype(np.int32)
    extra = () if w is None else (np.full(len(x), w, dtype=np.float32),)

    def predict(x, t):
        alpha, sigma = np.sqrt(alpha_bar[t + 1]), np.sqrt(1 - alpha_bar[t + 1])
        output = denoise(x.astype(np.float32), np.full(len(x), t, dtype=np.float32), y, *extra)
        return x0_and_eps(output, x, alpha, sigma, sampling["parametrisation"], clip) + (alpha, sigma)

    def consistency_function(x, t):  # c_skip x + c_out x_0, clamped for pixels
        x0, _, alpha, sigma = predict(x, t)
        scaled = CONSISTENCY_TIMESTEP_SCALE * t
        c_skip = CONSISTENCY_SIGMA_DATA ** 2 / (scaled ** 2 + CONSISTENCY_SIGMA_DATA ** 2)
        c_out = scaled / np.sqrt(scaled ** 2 + CONSISTENCY_SIGMA_DATA ** 2)
        x0 = np.float32(c_skip) * x + np.float32(c_out) * x0
        return (np.clip(x0, -1.0, 1.0) if clip else x0), alpha, sigma

    if sampling["sampler"] == "consistency":
        grid = trailing_timesteps(num_steps, sampling["consistency_skip"])
        for i, t in enumerate(grid):
            x0, _, _ = consistency_function(x, t)
            if i + 1 < num_steps:
                x = np.sqrt(alpha_bar[grid[i + 1] + 1]) * x0 + np.sqrt(1 - alpha_bar[grid[i + 1] + 1]) * step_noise[i]
        return x0.astype(np.float32)
    if sampling["sampler"] == "tcd":
        grid = trailing_timesteps(num_steps, sampling["consistency_skip"])
        gamma = TCD_GAMMA if sampling.get("gamma") is None else sampling["gamma"]
        for i, t in enumerate(grid):
            f, alpha, sigma = consistency_function(x, t)
            t_next = grid[i + 1] if i + 1 < num_steps else 0
            s = tcd_s(t_next, gamma)
            ratio = np.sqrt(1 - alpha_bar[s + 1]) / sigma  # the first-order TCF: s = t gives x
            x = ratio * x + (np.sqrt(alpha_bar[s + 1]) - alpha * ratio) * f
            if i + 1 < num_steps:
                keep = np.sqrt(alpha_bar[t_next + 1] / alpha_bar[s + 1])
                x = keep * x + np.sqrt(max(1 - keep ** 2, 0.0)) * step_noise[i]
        return x.astype(np.float32)
    if sampling["sampler"] == "flow-euler":
        return flow_euler_sample(denoise, x, y, alpha_bar, sampling["parametrisation"], clip, num_steps, extra)
    grid = trailing_timesteps(num_steps) + [-1]
    for t, s in zip(grid[:-1], grid[1:]):
        x0, eps, _, _ = predict(x, t)
        x = np.sqrt(alpha_bar[s + 1]) * x0 + np.sqrt(1 - alpha_bar[s + 1]) * eps
    return x.astype(np.float32)


def flow_euler_sample(denoise, x, y, alpha_bar, parametrisation, clip, num_steps, extra=()):
    """sampling.flow_euler_sample: Euler on rectified flow's straight path x_s = s x + (1 - s) z, s = i / N, with the
    velocity x_0 - eps of the DiT at the VP point x_t = x_s / r, r = sqrt(s^2 + (1 - s)^2), alpha = s / r, sigma =
    (1 - s) / r, t(s) linear between DiT's timesteps; s clamped to DiT's range [s(999), s(0)]."""
    flow_s = np.sqrt(alpha_bar) / (np.sqrt(alpha_bar) + np.sqrt(1 - alpha_bar))  # t = -1 .. 999, decreasing
    timesteps = np.arange(-1, len(alpha_bar) - 1, dtype=np.float64)
    for i in range(num_steps):
        s = min(max(i / num_steps, flow_s[-1]), flow_s[1])
        t = np.interp(s, flow_s[::-1], timesteps[::-1])
        r = np.sqrt(s ** 2 + (1 - s) ** 2)
        x_t = x / r
        output = denoise(x_t.astype(np.float32), np.full(len(x), t, dtype=np.float32), y, *extra)
        x0, eps = x0_and_eps(output, x_t, s / r, (1 - s) / r, parametrisation, clip)
        x = x + ((i + 1) / num_steps - i / num_steps) * (x0 - eps)
    return x.astype(np.float32)


def sampling_plan(metadata, num_steps=None, cfg_scale=None, sampler=None):
    """(sampler, steps, w) for a file: its own sampler and step count by default (DDIM 50 for a noise-predicting
    model); w for a guidance-distilled one (default 1 if its range holds it, else the range's low end). Errors say
    what the file supports."""
    sampling = sampling_entry(metadata)
    own = sampling["sampler"]
    if sampler is not None and own is not None and sampler != own:
        raise ValueError(f"this {sampling['method']}-distilled model samples with its own {own} sampler: drop "
                         f"--sampler")
    sampler = own or sampler or "ddim"
    num_steps = num_steps or sampling["default_steps"] or (SOLVER_DEFAULT_STEPS if sampler in SOLVERS else 50)
    if sampling["steps"] and num_steps not in sampling["steps"]:
        raise ValueError(f"this {sampling['method']}-distilled model samples in {sampling['steps'][0]}"
                         f"{'..' + str(sampling['steps'][-1]) if len(sampling['steps']) > 1 else ''} steps, not "
                         f"{num_steps}: drop --num-steps")
    if not 1 <= num_steps <= 1000:
        raise ValueError(f"--num-steps must lie in [1, 1000] (DiT's schedule has 1000 steps), got {num_steps}")
    guidance_range = sampling["guidance_range"]
    if guidance_range is None:
        if cfg_scale is not None:
            raise ValueError("this file takes no guidance scale (guidance is folded in at export time with "
                             "export.py --cfg-scale, or absent): drop --cfg-scale")
        return sampler, num_steps, None
    w = cfg_scale if cfg_scale is not None else min(max(1.0, guidance_range[0]), guidance_range[1])
    if not guidance_range[0] <= w <= guidance_range[1]:
        raise ValueError(f"--cfg-scale {w} is outside the guidance range this model was distilled for "
                         f"[{guidance_range[0]}, {guidance_range[1]}]")
    return sampler, num_steps, w


# diffusers' solvers, as sampling.py's SOLVERS and DIT_SCHEDULE (a test holds the copies equal): they run through
# diffusers itself, which a target without it lacks; DDIM and the few-step samplers above need numpy only.
SOLVERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),
    "euler": ("EulerDiscreteScheduler", {}),
}
DIT_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
SOLVER_DEFAULT_STEPS = 20


def solver_sample(denoise, noise, labels, metadata, num_steps, name, w=None):
    """diffusers' solver `name` on the file's eps (its first C output channels), as sampling.py's solver samplers:
    trailing grid, x_0 clamped to [-1, 1] for pixel models (thresholding with sample_max_value 1; Euler: none)."""
    try:
        import diffusers
        import torch
    except ImportError:
        raise ValueError(f"--sampler {name} runs diffusers' {SOLVERS[name][0]}, and diffusers (with torch) is not "
                         f"installed here: pip install diffusers, or use --sampler ddim, which needs numpy only") \
            from None
    class_name, options = SOLVERS[name]
    clipping = dict(thresholding=True, sample_max_value=1.0) if not metadata["latent"] and name != "euler" else {}
    scheduler = getattr(diffusers, class_name)(**DIT_SCHEDULE, timestep_spacing="trailing", **options, **clipping)
    scheduler.set_timesteps(num_steps)
    extra = () if w is None else (np.full(len(noise), w, dtype=np.float32),)
    y = labels.astype(np.int32)
    x = torch.from_numpy(noise) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t).numpy().astype(np.float32)
        output = denoise(model_input, np.full(len(x), float(t), dtype=np.float32), y, *extra)
        x = scheduler.step(torch.from_numpy(np.ascontiguousarray(output[:, :noise.shape[1]], dtype=np.float32)), t,
                           x).prev_sample
    return x.numpy().astype(np.float32)


def write_atomically(path, write):
    """checks.write_atomically, written out because this file imports no project module (a test holds the two alike):
    write(temporary) into a temporary file beside `path`, fsync it, rename it onto `path`, fsync the folder; a crash
    leaves the old file or the new one, never part of one."""
    folder = os.path.dirname(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=os.path.splitext(path)[1])
    os.close(descriptor)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes the file private; give it open()'s usual permissions
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def batched(denoise, batch_size):
    """A denoiser that feeds denoise chunks of exactly batch_size rows (padding the last), for fixed-batch files."""
    def run(x, t, y, *w):
        outputs = []
        for start in range(0, len(x), batch_size):
            count = min(batch_size, len(x) - start)
            rows = np.minimum(np.arange(start, start + batch_size), start + count - 1)  # repeat the last row
            outputs.append(denoise(x[rows], t[rows], y[rows], *(v[rows] for v in w))[:count])
        return np.concatenate(outputs)
    return run


def to_uint8_nhwc(images):
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C) with sample.py's rounding (127.5 x + 128, truncated)."""
    return np.clip(127.5 * images + 128.0, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def write_png(path, images, min_side=64):
    """A grid of uint8 (N, H, W, C) images as an 8-bit PNG, with zlib only; small images are enlarged (nearest)."""
    n, h, w, c = images.shape
    scale = max(1, -(-min_side // h))
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, sH, sW, C)
    columns = int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    pad, side_h, side_w = 2, h * scale, w * scale
    grid = np.zeros((rows * (side_h + pad) + pad, columns * (side_w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = pad + (i // columns) * (side_h + pad), pad + (i % columns) * (side_w + pad)
        grid[top:top + side_h, left:left + side_w] = image
    if c == 1:
        grid = grid.repeat(3, axis=2)
    raw = b"".join(b"\x00" + row.tobytes() for row in grid)  # filter type 0 on every scanline

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", grid.shape[1], grid.shape[0], 8, 2, 0, 0, 0)  # 8-bit RGB
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                + chunk(b"IEND", b""))


def sample(denoise, metadata, labels, num_steps=None, seed=0, batch_size=None, cfg_scale=None, sampler=None):
    """Samples float32 (N, C, H, W) for labels, from load_denoiser's pair, with the file's own sampler (DDIM for a
    noise-predicting model, default 50 steps, or `sampler`: one of diffusers' SOLVERS; a step-distilled student's
    sampler and steps); the noise is numpy's, from seed. cfg_scale: the w input of a guidance-distilled model (one
    forward per step)."""
    sampler, num_steps, w = sampling_plan(metadata, num_steps, cfg_scale, sampler)
    labels = np.asarray(labels, dtype=np.int64)
    if labels.ndim != 1 or len(labels) == 0 or labels.min() < 0 or labels.max() >= metadata["num_classes"]:
        raise ValueError(f"class labels must be integers in [0, {metadata['num_classes']}), got {labels.tolist()}")
    fixed = metadata["batch_size"]
    if fixed is not None and batch_size not in (None, fixed):
        raise ValueError(f"the model was exported for batch size {fixed} only; drop --batch-size")
    denoise = batched(denoise, fixed or batch_size or len(labels))
    size, channels = metadata["input_size"], metadata["in_channels"]
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((len(labels), channels, size, size), dtype=np.float32)
    if sampler in SOLVERS:
        return solver_sample(denoise, noise, labels, metadata, num_steps, sampler, w)
    if sampler == "ddim" and w is None:
        return ddim_sample(denoise, noise, labels, metadata, num_steps)
    if sampler == "ddim":  # a guidance-distilled eps model: DDIM with its w input
        return ddim_sample(lambda x, t, y: denoise(x, t, y, np.full(len(x), w, dtype=np.float32)), noise, labels,
                           metadata, num_steps)
    step_noise = rng.standard_normal((max(num_steps - 1, 0), len(labels), channels, size, size), dtype=np.float32) \
        if sampler in ("consistency", "tcd") else None
    return few_step_sample(denoise, noise, step_noise, labels, metadata, num_steps, w)


#################################################################################
#           Checking and timing exported files (called by export.py)            #
#################################################################################

def run_files(paths, inputs_path, outputs_folder, repeats=0, threads=None, runtimes=None):
    """Run exported files on the batches in inputs_path (x_<B>, t_<B>, y_<B>[, w_<B>]); outputs go to
    outputs_folder/<i>.npz.

    export.py calls this in a fresh Python process holding a copy of this file only, so nothing of the project is
    importable. With repeats > 0 every batch is also timed on the CPU, the files interleaved run by run so that load
    from other processes hits them alike. runtimes: per file, how an ONNX file runs (see load_denoiser; default
    onnxruntime); a path may come twice, with two runtimes. Returns {"latency_s": [{B: median seconds}, ...] per file,
    "kernels": per file, openvino_kernels at the largest batch for OpenVINO runs (None for the others), "cpu":
    cpu_description(), "modules": the project modules (and, for ONNX, torch) this process imported, which must be
    none}. threads: see load_denoiser.
    """
    runtimes = runtimes or ["onnxruntime"] * len(paths)
    denoisers = [load_denoiser(path, "cpu", threads, runtime)[0] for path, runtime in zip(paths, runtimes)]
    inputs = np.load(inputs_path)
    batches = sorted((key[2:] for key in inputs.files if key.startswith("x_")), key=int)
    feeds = {b: tuple(inputs[f"{k}_{b}"] for k in "xtyw" if f"{k}_{b}" in inputs.files) for b in batches}
    for i, denoise in enumerate(denoisers):
        np.savez(os.path.join(outputs_folder, f"{i}.npz"), **{f"out_{b}": denoise(*feeds[b]) for b in batches})
    latency = [{} for _ in paths]
    for b in batches if repeats else ():
        for denoise in denoisers:
            for _ in range(WARMUP_RUNS):
                denoise(*feeds[b])
        times = [[] for _ in paths]
        for _ in range(repeats):
            for i, denoise in enumerate(denoisers):
                start = time.perf_counter()
                denoise(*feeds[b])
                times[i].append(time.perf_counter() - start)
        for i in range(len(paths)):
            latency[i][b] = float(np.median(times[i]))
    largest = feeds[batches[-1]]
    names = ["x", "t", "y", "w"][:len(largest)]
    kernels = [openvino_kernels(path, dict(zip(names, largest)), threads) if runtime == "openvino" else None
               for path, runtime in zip(paths, runtimes)]
    unwanted = [name for name in PROJECT_MODULES if name in sys.modules]
    if any(model_format(path) == "onnx" for path in paths) and "torch" in sys.modules:
        unwanted.append("torch")
    return {"latency_s": latency, "kernels": kernels, "cpu": cpu_description(), "modules": unwanted}


def main(args):
    denoise, metadata = load_denoiser(args.model, "cpu" if args.cpu else "cuda", args.threads, args.runtime)
    if metadata["latent"] and args.png:
        raise ValueError("--png needs images, but this model denoises VAE latents; decode them first (see --help)")
    if args.class_labels is not None:
        labels = args.class_labels
    elif args.num_samples is not None:
        labels = [i % metadata["num_classes"] for i in range(args.num_samples)]
    else:
        labels = range(min(10, metadata["num_classes"]))
    labels = np.asarray(list(labels), dtype=np.int64)
    if labels.max() >= metadata["num_classes"]:
        raise ValueError(f"{args.model}: has {metadata['num_classes']} classes - give --class-labels in "
                         f"[0, {metadata['num_classes'] - 1}]")
    start = time.perf_counter()
    samples = sample(denoise, metadata, labels, args.num_steps, args.seed, args.batch_size, args.cfg_scale,
                     args.sampler)
    seconds = time.perf_counter() - start
    if metadata["latent"]:
        write_atomically(args.out, lambda temporary: np.savez(temporary, arr_0=samples, arr_1=labels))
        vae = metadata["vae"] or "not recorded in the checkpoint; DiT used stabilityai/sd-vae-ft-ema"
        print(f"wrote {len(samples)} latents {samples.shape[1:]} to {args.out} ({seconds:.1f} s). They are VAE "
              f"latents, not images: decode them with the Stable Diffusion VAE ({vae}), e.g. diffusers "
              f"AutoencoderKL.decode(arr_0 / {metadata['latent_scale']}).sample, on a machine that has it.")
        return
    images = to_uint8_nhwc(samples)
    write_atomically(args.out, lambda temporary: np.savez(temporary, arr_0=images, arr_1=labels))
    print(f"wrote {len(images)} images {images.shape[1:]} to {args.out} ({seconds:.1f} s)")
    if args.png:
        write_png(args.png, images)
        print(f"wrote {args.png}")


def at_least(kind, low):
    """An argparse type: a finite int or float >= low (checks.number_in's idea; this file imports no project module)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text} is not {'an integer' if kind is int else 'a finite number'} "
                                             f">= {low:g}")
        return value
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a file written by export.py: .ts (TorchScript), .onnx or .pt2 (torch.export)")
    parser.add_argument("--sampler", choices=["ddim", *SOLVERS], default=None,
                        help="ddim (numpy, the default for a noise-predicting file) or one of diffusers' solvers "
                             "(needs diffusers and torch here); a step-distilled file always uses its own sampler")
    parser.add_argument("--num-steps", type=at_least(int, 1), default=None,
                        help=f"sampling steps (default: a step-distilled model's own, else 50 DDIM steps or "
                             f"{SOLVER_DEFAULT_STEPS} solver steps; for DDIM an integer stride of 1000 must give "
                             f"exactly this many: 25, 50, 100, 250, ...)")
    parser.add_argument("--cfg-scale", type=at_least(float, 0), default=None,
                        help="guidance scale w of a guidance-distilled model, an input of its file (one forward per "
                             "step; default 1, or the low end of its range); other files fold guidance at export")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--class-labels", type=at_least(int, 0), nargs="+", default=None,
                        help="one sample per label (default: the first min(10, num_classes) classes)")
    labels.add_argument("--num-samples", type=at_least(int, 1), default=None,
                        help="this many samples, their labels cycling through the classes 0, 1, 2, ...")
    parser.add_argument("--seed", type=at_least(int, 0), default=0,
                        help="seed of the initial noise (numpy), so the same seed "
                        "gives the same samples with every runtime")
    parser.add_argument("--batch-size", type=at_least(int, 1), default=None,
                        help="samples denoised together (default: all); "
                        "a fixed-batch export always uses its own batch size")
    parser.add_argument("--out", default="samples.npz", help="output .npz: arr_0 uint8 (N, H, W, C) images (or "
                        "float32 latents for latent models), arr_1 labels")
    parser.add_argument("--png", default=None, help="also write a PNG grid of the images (pixel-space models only)")
    parser.add_argument("--cpu", action="store_true", help="keep ONNX files on onnxruntime's CPU provider even "
                        "when its CUDA provider is installed")
    parser.add_argument("--runtime", choices=RUNTIMES, default="onnxruntime",
                        help="what runs an ONNX file: onnxruntime (default; its CUDA provider when installed) or "
                             "openvino (its CPU plugin; pip install openvino)")
    parser.add_argument("--threads", type=at_least(int, 1), default=None,
                        help="CPU threads of torch / onnxruntime / OpenVINO (default: one "
                        "per core)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".npz"):
        parser.error(f"--out {args.out} must end in .npz")
    for flag, path in (("--out", args.out), ("--png", args.png)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            parser.error(f"{flag} {path}: {folder} is not a writable folder")
    return args


if __name__ == "__main__":
    # checks.run_script's behaviour, written out because this file imports no project module: a user's error is one
    # `error:` line (DIT_DEBUG=1 shows the traceback), a bug keeps its traceback.
    arguments = parse_args()
    try:
        main(arguments)
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("DIT_DEBUG", "0") not in ("", "0"):
            raise
        sys.exit(f"error: {error}")
