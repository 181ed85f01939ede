"""Sample images from a DiT checkpoint: a PNG grid, and optionally an ADM-layout .npz for evaluation.

    python sample.py --ckpt results/digits/checkpoints/0002000.pt --npz samples.npz
    python sample.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --vae /path/to/sd-vae-ft-ema

--ckpt takes the project's training checkpoints (config read from it, EMA weights) or an official raw state_dict
(then --model and --image-size, as the original sample.py).
"""
import argparse
import dataclasses
import math
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from checks import (UserError, check_output_path, non_negative_float, non_negative_int, number_in, positive_float,
                    positive_int, run_script, write_atomically)
from models import DiT_models, load_dit_checkpoint
from sampling import SAMPLERS, SOLVER_DEFAULT_STEPS, SamplingSpec, check_guidance, resolve_sampling

IMAGENET_DEMO_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the original sample.py's classes
SAMPLER_HELP = ("ddpm: ancestral; ddim: the original's grid; ddim-trailing: DDIM from t = 999, for few steps; "
                "dpm++2m, unipc, euler: diffusers' DPM-Solver++ 2M, UniPC and Euler solvers (the fastest at 10-20 "
                "steps, README); consistency: multistep consistency sampling (consistency students); tcd: TCD's "
                "strategic stochastic sampling (tcd students, --gamma). Default: the checkpoint's own (a "
                "step-distilled student's), else ddpm")


def to_uint8_nhwc(images):
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C), the rounding of the original sample_ddp.py."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8).numpy()


@torch.no_grad()
def generate(model, data, labels, seed=0, num_sampling_steps=None, sampler=None, cfg_scale=None, temperature=1.0,
             eta=0.0, batch_size=64, vae=None, progress=True, default_cfg_scale=1.0, gamma=None):
    """Images in [-1, 1], (N, C, H, W) on the CPU, for `labels`; the same seed gives the same images.

    sampler, num_sampling_steps and cfg_scale default to what the checkpoint says (data["sampling"]: a few-step
    student's own sampler and steps) and otherwise to DDPM 250 at default_cfg_scale (see resolve_sampling).
    The initial noise of all N samples (and a consistency sampler's re-noising) is drawn at once on the CPU from
    `seed`, so deterministic images do not depend on batch_size or device; DDPM's per-step noise comes from the global
    RNG, reseeded here from `seed`, so its images also depend on batch_size. data: the checkpoint's description
    (load_dit_checkpoint); vae decodes latents. gamma: a TCD student's stochasticity (default: the checkpoint's).
    """
    if data["latent"] and vae is None:
        raise UserError("this model denoises VAE latents: pass a VAE (--vae ema|mse|PATH) to decode them")
    spec = SamplingSpec.from_checkpoint_entry(data.get("sampling"))
    sampler, num_steps, cfg_scale = resolve_sampling(spec, sampler, num_sampling_steps, cfg_scale, temperature,
                                                     default_cfg_scale, gamma)
    spec = spec if gamma is None else dataclasses.replace(spec, gamma=gamma)
    check_guidance(model, cfg_scale)
    device = next(model.parameters()).device
    cfg = model.config
    labels = torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    shape = (cfg["in_channels"], cfg["input_size"], cfg["input_size"])
    noise = torch.randn(len(labels), *shape, generator=generator)
    step_noise = None
    if SAMPLERS[sampler].renoises:  # drawn step by step, as dit_pipeline.FewStepScheduler draws them
        draws = [torch.randn(len(labels), *shape, generator=generator) for _ in range(num_steps - 1)]
        step_noise = torch.stack(draws) if draws else torch.empty(0, len(labels), *shape)
    torch.manual_seed(seed)  # the per-step noise of DDPM
    images = []
    starts = range(0, len(labels), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress or len(starts) == 1):
        part = slice(start, start + batch_size)
        samples = SAMPLERS[sampler].sample(model, spec, noise[part].to(device), labels[part].to(device), num_steps,
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
    sampling.add_argument("--gamma", type=number_in(float, 0, 1), default=None,
                          help="stochasticity of TCD's sampler, tcd-distilled students only (0: deterministic, 1: "
                               "multistep consistency; default: the checkpoint's, diffusers' 0.3 unless trained "
                               "with another --tcd-gamma)")
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
                      batch_size=args.batch_size, vae=vae, default_cfg_scale=4.0,  # the original's default
                      gamma=args.gamma)
    from torchvision.utils import save_image
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_image(images, args.out, nrow=max(1, int(math.sqrt(len(images)))), normalize=True, value_range=(-1, 1))
    print(f"wrote {args.out} ({len(images)} images)")
    if args.npz:
        save_npz(args.npz, images, labels)
        print(f"wrote {args.npz}")


if __name__ == "__main__":
    run_script(main, parse_args)
