"""Sample images from a DiT checkpoint: a PNG grid, and optionally an ADM-layout .npz for evaluation.

    python sample.py --ckpt results/digits/checkpoints/0002000.pt --npz samples.npz
    python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --vae /path/to/sd-vae-ft-ema

--ckpt takes the project's training checkpoints (config read from it, EMA weights) or an official raw state_dict
(then --model and --image-size, as the original sample.py).
"""
import argparse
import functools
import math
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from checks import (UserError, check_output_path, non_negative_float, non_negative_int, positive_float,
                    positive_int, run_script, write_atomically)
from diffusion import create_diffusion
from diffusion.respace import space_timesteps
from models import EPS_SAMPLING, DiT_models, load_dit_checkpoint
from step_distill import DIFFUSION_STEPS, consistency_sample, ddim_trailing_sample, model_output

IMAGENET_DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the original sample.py's classes


def sample_batch(model, diffusion, noise, labels, cfg_scale=1.0, sampler="ddpm", temperature=1.0, eta=0.0,
                 progress=False, clip_denoised=False):
    """DDPM or DDIM through `diffusion` (respaced): denoise `noise` (N, C, H, W) into samples for class `labels` (N,);
    returns (N, C, H, W) model-space samples.

    clip_denoised clamps each step's x_0 estimate to [-1, 1]: right for pixels, off for latents (as the original).
    A guidance-distilled model takes cfg_scale as its input w: one forward per step instead of two.
    """
    check_guidance(model, cfg_scale)
    if model.w_embedder is not None:
        w = torch.full((len(noise),), float(cfg_scale), device=noise.device)
        z, model_kwargs, denoiser = noise, dict(y=labels, w=w), model.forward
    elif cfg_scale != 1.0:
        # Classifier-free guidance (Ho & Salimans 2022): the batch is doubled with null labels.
        null = torch.full_like(labels, model.config["num_classes"])
        z = torch.cat([noise, noise], dim=0)  # (2N, C, H, W)
        model_kwargs = dict(y=torch.cat([labels, null], dim=0), cfg_scale=cfg_scale)
        denoiser = model.forward_with_cfg
    else:  # cfg_scale 1 is the conditional model: skip the wasted unconditional half
        z, model_kwargs, denoiser = noise, dict(y=labels), model.forward
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    extra = dict(eta=eta) if sampler == "ddim" else {}
    samples = loop(denoiser, z.shape, z, clip_denoised=clip_denoised, model_kwargs=model_kwargs, progress=progress,
                   device=z.device, temperature=temperature, **extra)
    return samples[: len(noise)]


def check_guidance(model, cfg_scale):
    """A ValueError for guidance asked of a model without a null label (trained without label dropout)."""
    if cfg_scale != 1.0 and model.w_embedder is None and model.config["class_dropout_prob"] == 0:
        raise UserError("this model was trained without label dropout, so it has no null label to guide against: "
                         "use --cfg-scale 1")


#################################################################################
#         Samplers, chosen by name: (model, sampling, noise, labels, ...)        #
#################################################################################

def ddpm(model, sampling, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    """Ancestral sampling (DDPM, Ho et al. 2020) on num_steps respaced steps, the original's default (250)."""
    diffusion = create_diffusion(str(num_steps), learn_sigma=model.config["learn_sigma"])
    return sample_batch(model, diffusion, noise, labels, cfg_scale, "ddpm", temperature, progress=progress,
                        clip_denoised=clip)


def ddim(model, sampling, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    """DDIM (Song et al. 2021) on the original's "ddimN" grid (stride 1000 // N, from t = 0 up: leading spacing)."""
    diffusion = create_diffusion(f"ddim{num_steps}", learn_sigma=model.config["learn_sigma"])
    return sample_batch(model, diffusion, noise, labels, cfg_scale, "ddim", temperature, eta, progress, clip)


def ddim_trailing(model, sampling, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise,
                  progress):
    """Deterministic DDIM on the trailing grid (999 first; Lin et al. 2024): any step count from 1, for few steps."""
    w = None if cfg_scale == 1 and model.w_embedder is None else torch.full((len(noise),), float(cfg_scale),
                                                                            device=noise.device)
    return ddim_trailing_sample(model, sampling["parametrisation"], noise, labels, num_steps, w, clip, temperature)


def consistency(model, sampling, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    """Multistep consistency sampling (Song et al. 2023; LCM): denoise, re-noise to the next grid point."""
    w = None if model.w_embedder is None else torch.full((len(noise),), float(cfg_scale), device=noise.device)
    return consistency_sample(model, noise, step_noise, labels, num_steps, sampling["consistency_skip"], w, clip)


# DiT's training schedule in diffusers' terms (diffusion.get_named_beta_schedule("linear", 1000)).
DIT_SCHEDULE = dict(num_train_timesteps=DIFFUSION_STEPS, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
# diffusers' solvers, on the trailing grid (999 first, as ddim-trailing): name -> (scheduler class, its options).
SOLVERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),  # Lu et al. 2022
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),  # Zhao et al. 2023, bh2, predictor-corrector
    "euler": ("EulerDiscreteScheduler", {}),  # Karras et al. 2022, Algorithm 1 without churn
}
SOLVER_DEFAULT_STEPS = 20


def solver_scheduler(name, clip=False):
    """The diffusers scheduler of solver `name`, set up for DiT's schedule. clip (pixel models): each x_0 estimate
    is clamped to [-1, 1], through diffusers' dynamic thresholding with sample_max_value 1, whose threshold
    clamp(quantile, 1, sample_max_value) is then always 1. Euler has no x_0 to clamp and runs unclipped."""
    import diffusers
    class_name, options = SOLVERS[name]
    scheduler_class = getattr(diffusers, class_name)
    clipping = dict(thresholding=True, sample_max_value=1.0) if clip and name != "euler" else {}
    return scheduler_class(**DIT_SCHEDULE, timestep_spacing="trailing", **options, **clipping)


def solver(name, model, sampling, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise,
           progress):
    """A diffusers solver (SOLVERS[name]) on the DiT's eps: the first C output channels, guided as model_output
    guides them (the original's first 3 channels; a w input for a guidance-distilled model), over temperature."""
    scheduler = solver_scheduler(name, clip)
    scheduler.set_timesteps(num_steps, device=noise.device)
    w = None if cfg_scale == 1 and model.w_embedder is None else torch.full((len(noise),), float(cfg_scale),
                                                                            device=noise.device)
    x = noise * scheduler.init_noise_sigma  # Euler works in sigma space: x_T = sigma_max eps
    for t in tqdm(scheduler.timesteps, desc=name, disable=not progress):
        model_input = scheduler.scale_model_input(x, t)  # back to the DiT's x_t (identity but for Euler)
        eps = model_output(model, model_input, t.expand(len(x)), labels, w, temperature=temperature)
        x = scheduler.step(eps[:, :noise.shape[1]].float(), t, x).prev_sample
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "ddim-trailing": ddim_trailing, "consistency": consistency,
            **{name: functools.partial(solver, name) for name in SOLVERS}}


SAMPLER_HELP = ("ddpm: ancestral; ddim: the original's grid; ddim-trailing: DDIM from t = 999, for few steps; "
                "dpm++2m, unipc, euler: diffusers' DPM-Solver++ 2M, UniPC and Euler solvers (the fastest at 10-20 "
                "steps, README); consistency: multistep consistency sampling (consistency students). Default: the "
                "checkpoint's own (a step-distilled student's), else ddpm")


def resolve_sampling(sampling, sampler=None, num_steps=None, cfg_scale=None, temperature=1.0, default_cfg_scale=1.0):
    """(sampler, steps, cfg_scale) for a checkpoint's sampling entry: its own defaults for what is None, and a
    ValueError that says what the model supports when a request does not fit it. default_cfg_scale: the scale for a
    model that takes guidance, clamped into a guidance-distilled model's range (a few-step student distilled without
    guidance samples at 1)."""
    own = sampling["sampler"]
    sampler = sampler or own or "ddpm"
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if own and sampler != own:
        raise UserError(f"this checkpoint is a {sampling['method']}-distilled student made for the {own} sampler; "
                         f"drop --sampler (or pass --sampler {own})")
    if not own and sampler == "consistency":
        raise UserError("consistency sampling needs a consistency-distilled checkpoint; this model predicts noise: "
                         "use ddpm, ddim or ddim-trailing")
    num_steps = num_steps or sampling["default_steps"] or (SOLVER_DEFAULT_STEPS if sampler in SOLVERS else 250)
    check_step_count(sampler, num_steps)
    if sampling["steps"] and num_steps not in sampling["steps"]:
        supported = sampling["steps"]
        listed = f"{supported[0]}..{supported[-1]}" if len(supported) > 4 else ", ".join(map(str, supported))
        raise UserError(f"this {sampling['method']}-distilled student samples in {listed} steps, not {num_steps}: "
                         f"drop --num-sampling-steps (default {sampling['default_steps']})")
    guidance_range = sampling["guidance_range"]
    if cfg_scale is None:
        cfg_scale = 1.0 if own and not guidance_range else default_cfg_scale
        cfg_scale = min(max(cfg_scale, guidance_range[0]), guidance_range[1]) if guidance_range else cfg_scale
    if guidance_range and not guidance_range[0] <= cfg_scale <= guidance_range[1]:
        raise UserError(f"--cfg-scale {cfg_scale} is outside the guidance range this student was distilled for "
                         f"[{guidance_range[0]}, {guidance_range[1]}]")
    if own and not guidance_range and cfg_scale != 1:
        raise UserError(f"this {sampling['method']}-distilled student was distilled without guidance (no "
                         f"--guidance-range), so it samples at --cfg-scale 1 only")
    if temperature != 1 and (sampler == "consistency" or sampling["parametrisation"] != "eps"):
        raise UserError("--temperature applies to noise-predicting models (ddpm, ddim, ddim-trailing), not to a "
                         "few-step student")
    return sampler, num_steps, cfg_scale


def check_step_count(sampler, num_steps):
    """A ValueError when `sampler` cannot run `num_steps` steps on DiT's 1000-step schedule."""
    if not 1 <= num_steps <= DIFFUSION_STEPS:
        raise UserError(f"--num-sampling-steps must lie in [1, {DIFFUSION_STEPS}] (DiT's schedule has "
                         f"{DIFFUSION_STEPS} steps), got {num_steps}")
    if sampler == "ddim":
        try:
            space_timesteps(DIFFUSION_STEPS, f"ddim{num_steps}")
        except ValueError:
            raise UserError(f"ddim places its steps every 1000 // N timesteps from t = 0 (the original's grid), "
                             f"which cannot give exactly {num_steps} steps: choose a nearby count, or --sampler "
                             f"ddim-trailing, which places any count from 1") from None


def forwards_per_step(model, cfg_scale):
    """Model evaluations per image and step: two under classifier-free guidance, one with a w input or without."""
    return 2 if cfg_scale != 1 and model.w_embedder is None else 1


def to_uint8_nhwc(images):
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C), the rounding of the original sample_ddp.py."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


@torch.no_grad()
def generate(model, data, labels, seed=0, num_sampling_steps=None, sampler=None, cfg_scale=None, temperature=1.0,
             eta=0.0, batch_size=64, vae=None, progress=True, default_cfg_scale=1.0):
    """Images in [-1, 1], (N, C, H, W) on the CPU, for `labels`; the same seed gives the same images.

    sampler, num_sampling_steps and cfg_scale default to what the checkpoint says (data["sampling"]: a few-step
    student's own sampler and steps) and otherwise to DDPM 250 at default_cfg_scale (see resolve_sampling).
    The initial noise of all N samples (and a consistency sampler's re-noising) is drawn at once on the CPU from
    `seed`, so deterministic images do not depend on batch_size or device; DDPM's per-step noise comes from the global
    RNG, reseeded here from `seed`, so its images also depend on batch_size. data: the checkpoint's description
    (load_dit_checkpoint); vae decodes latents.
    """
    if data["latent"] and vae is None:
        raise UserError("this model denoises VAE latents: pass a VAE (--vae ema|mse|PATH) to decode them")
    sampling = data.get("sampling") or EPS_SAMPLING
    sampler, num_steps, cfg_scale = resolve_sampling(sampling, sampler, num_sampling_steps, cfg_scale, temperature,
                                                     default_cfg_scale)
    check_guidance(model, cfg_scale)
    device = next(model.parameters()).device
    cfg = model.config
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    noise = torch.randn(len(labels), *shape, generator=generator)
    step_noise = None
    if sampler == "consistency":  # drawn step by step, as dit_pipeline.FewStepScheduler draws them
        draws = [torch.randn(len(labels), *shape, generator=generator) for _ in range(num_steps - 1)]
        step_noise = torch.stack(draws) if draws else torch.empty(0, len(labels), *shape)
    torch.manual_seed(seed)  # the per-step noise of DDPM
    images = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress or len(starts) == 1):
        part = slice(start, start + batch_size)
        samples = SAMPLERS[sampler](model, sampling, noise[part].to(device), labels[part].to(device), num_steps,
                                    cfg_scale, temperature, eta, not data["latent"],
                                    None if step_noise is None else step_noise[:, part].to(device),
                                    progress and len(starts) == 1)
        if data["latent"]:
            from data import decode_latents
            samples = decode_latents(vae, samples)
        images.append(samples.float().cpu())
    return torch.cat(images)


def default_labels(num_classes, num_samples):
    """The original demo classes for ImageNet; otherwise every class in turn."""
    base = IMAGENET_DEMO_LABELS if num_classes == 1000 else list(range(num_classes))
    count = num_samples or len(base)
    return [base[i % len(base)] for i in range(count)]


def save_npz(path, images, labels):
    """ADM layout: arr_0 uint8 (N, H, W, C), arr_1 int64 labels (N,); written atomically."""
    arrays = dict(arr_0=to_uint8_nhwc(images), arr_1=np.asarray(labels, dtype=np.int64))
    write_atomically(path, lambda temporary: np.savez(temporary, **arrays))


def add_checkpoint_args(parser):
    """--ckpt and the flags a raw state_dict needs, shared by the scripts that load a model (sample, export)."""
    parser.add_argument("--ckpt", required=True, help="training checkpoint of this project, or an official raw "
                                                      "state_dict (then also --model and --image-size)")
    raw = parser.add_argument_group("raw state_dicts (official DiT checkpoints)")
    raw.add_argument("--model", choices=list(DiT_models), default=None, help="architecture of a raw state_dict")
    raw.add_argument("--image-size", type=positive_int, default=None,
                     help="image size in pixels of a raw state_dict (256 or 512 for the official ones)")
    raw.add_argument("--num-classes", type=positive_int, default=None,
                     help="classes of a raw state_dict (default 1000)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sample a DiT checkpoint into a PNG grid (and an ADM .npz).")
    add_checkpoint_args(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--sampler", choices=list(SAMPLERS), default=None, help=SAMPLER_HELP)
    sampling.add_argument("--num-sampling-steps", type=positive_int, default=None,
                          help=f"number of steps (default: the steps a few-step student was distilled for, else "
                               f"{SOLVER_DEFAULT_STEPS} for diffusers' solvers and 250 for ddpm and ddim)")
    sampling.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM noise (0: deterministic)")
    sampling.add_argument("--cfg-scale", type=non_negative_float, default=None,
                          help="classifier-free guidance scale (1: none). Default 4, or 1 for a few-step student "
                               "distilled without guidance; a guidance-distilled model takes it as input (one "
                               "forward per step) within its trained range")
    sampling.add_argument("--temperature", type=positive_float, default=1.0,
                          help="divide the model output by this before forming each step's mean and variance")
    sampling.add_argument("--seed", type=non_negative_int, default=0,
                          help="random seed: the same seed gives the same images")
    sampling.add_argument("--class-labels", type=non_negative_int, nargs="+", default=None,
                          help="classes to sample (default: the original demo classes for 1000 classes, else all)")
    sampling.add_argument("--num-samples", type=positive_int, default=None,
                          help="number of images; --class-labels (or the defaults) repeat to fill it")
    sampling.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    sampling.add_argument("--vae", default=None, help="VAE to decode latents: ema, mse, a local folder or a hub id "
                                                      "(default: the checkpoint's, else ema)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default="sample.png", help="PNG grid path")
    output.add_argument("--npz", default=None, help="also write the samples as an ADM-layout .npz here")
    output.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt} does not exist")
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path is not None:
            check_output_path(parser, flag, path)
    return args


def main(args):
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ GPUs, as the original sample.py
    torch.backends.cudnn.allow_tf32 = True
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, data = load_dit_checkpoint(args.ckpt, args.model, args.image_size, args.num_classes)  # or a UserError
    if args.vae and not data["latent"]:
        raise UserError(f"{args.ckpt}: this model denoises pixels, not VAE latents - drop --vae")
    model.to(device)
    num_classes = model.config["num_classes"]
    labels = args.class_labels
    if labels is not None and args.num_samples:
        labels = [labels[i % len(labels)] for i in range(args.num_samples)]
    labels = labels if labels is not None else default_labels(num_classes, args.num_samples)
    if min(labels) < 0 or max(labels) >= num_classes:
        raise UserError(f"{args.ckpt}: --class-labels must lie in [0, {num_classes - 1}] for this model")
    vae = None
    if data["latent"]:
        from data import load_vae
        try:
            vae = load_vae(args.vae or data["vae"] or "ema", device)
        except (OSError, ValueError) as error:
            raise UserError(f"--vae: {error}") from error
    images = generate(model, data, labels, seed=args.seed, num_sampling_steps=args.num_sampling_steps,
                      sampler=args.sampler, cfg_scale=args.cfg_scale, temperature=args.temperature, eta=args.eta,
                      batch_size=args.batch_size, vae=vae, default_cfg_scale=4.0)  # the original's default
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(images, args.out, nrow=max(1, int(math.sqrt(len(images)))), normalize=True, value_range=(-1, 1))
    print(f"wrote {args.out} ({len(images)} images)")
    if args.npz:
        save_npz(args.npz, images, labels)
        print(f"wrote {args.npz}")


if __name__ == "__main__":
    run_script(main, parse_args)
