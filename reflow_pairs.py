"""Write a teacher's ODE pairs (noise z, its deterministic sample x) for rectified flow, resumably, under torchrun.

    python reflow_pairs.py --ckpt results/digits/teacher/checkpoints/0002000.pt --out results/pairs --num-pairs 10000
    torchrun --nproc_per_node=8 reflow_pairs.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \
        --out pairs/xl2 --num-pairs 1000000
    python train.py --step-distillation reflow --teacher-ckpt results/digits/teacher/checkpoints/0002000.pt \
        --reflow-pairs results/pairs --max-steps 1000 --results-dir results/reflow

--out holds
    meta.json          the teacher (checkpoint path, sha256, step, config, method) and the settings; a rerun with
                       another teacher or other settings is refused, train.py refuses pairs of another teacher
    pairs_00000.npz    pairs [k * chunk_size, (k + 1) * chunk_size) of chunk k: z and x float32 (n, C, H, W) in the
    pairs_00001.npz    model's space (pixels or scaled latents, not decoded), y int64 (n,) (pair i has label i %
    ...                num_classes), seconds (what the chunk cost); z comes from (seed, k) alone, so neither the
                       number of processes nor the order of the chunks changes a chunk; each written atomically
Rerunning the same command skips finished chunks: a job that stops loses only the chunks in flight. One run at a time
per --out (a lock, held by rank 0). The sampler must be deterministic (an ODE solver): the teacher's own for a
few-step or reflowed checkpoint (flow-euler for a reflowed one: InstaFlow's pairs), else --sampler (default dpm++2m
at 20 steps, which reaches DDIM 50's Frechet distance on digits: README's samplers table).
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from checks import (UserError, file_sha256, lock_folder, non_negative_int, positive_int, remove_temporaries,
                    run_script, write_atomically)
from distributed import cleanup, setup_distributed
from method import derived_seed
from models import load_dit_checkpoint
from rectified_flow import PAIRS_META, pair_chunk_path
from sample import add_checkpoint_args
from sampling import SAMPLERS, SamplingSpec, forwards_per_step, resolve_sampling

STOCHASTIC_SAMPLERS = ("ddpm", "consistency", "tcd")  # not an ODE: no deterministic pair


def teacher_identity(path, data, model):
    """What names the teacher in meta.json: its file (path and sha256), the training step and what it is."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    step = checkpoint.get("step") if isinstance(checkpoint, dict) else None
    return dict(path=os.path.abspath(path), sha256=file_sha256(path), step=step, config=model.config,
                method=data["sampling"]["method"])


def without_path(entry):
    """A meta.json entry as compared on resume: the teacher is its file's content (sha256, step, config, method),
    not where it lies, so a copied or moved checkpoint resumes its pairs."""
    return {k: v for k, v in entry.items() if k != "path"} if isinstance(entry, dict) else entry


def prepare_folder(out, meta):
    """Create out with meta.json, or check that the pairs already there were made by the same teacher and settings."""
    path = os.path.join(out, PAIRS_META)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        changed = [f"{key}: {saved.get(key)!r} -> {meta[key]!r}" for key in ("teacher", "settings")
                   if without_path(saved.get(key)) != without_path(meta[key])]
        if changed:
            raise UserError(f"{out} holds pairs of another teacher or settings ({'; '.join(changed)}) - rerun with "
                            f"that run's --ckpt and settings to resume it, or choose a new --out")
        return
    if any(name.startswith("pairs_") for name in os.listdir(out)):
        raise UserError(f"{out} holds pair chunks but no {PAIRS_META}, so their teacher is unknown - choose a new "
                        f"--out (or empty this one)")
    write_atomically(path, lambda temporary: json.dump(meta, open(temporary, "w"), indent=2))


def write_chunk(model, spec, sampler, steps, clip, chunk, args, num_classes, device):
    """Sample chunk k's pairs and write them atomically; returns the seconds it took."""
    start = time.perf_counter()
    indices = range(chunk * args.chunk_size, min((chunk + 1) * args.chunk_size, args.num_pairs))
    labels = torch.tensor([i % num_classes for i in indices])
    cfg = model.config
    generator = torch.Generator().manual_seed(derived_seed(args.seed, "pairs", chunk))
    z = torch.randn(len(indices), cfg["in_channels"], cfg["input_size"], cfg["input_size"], generator=generator)
    with torch.no_grad():
        x = torch.cat([SAMPLERS[sampler].sample(model, spec, z[i:i + args.batch_size].to(device),
                                                labels[i:i + args.batch_size].to(device), steps, 1.0, 1.0, 0.0,
                                                clip, None, False).float().cpu()
                       for i in range(0, len(z), args.batch_size)])  # (n, C, H, W)
    seconds = time.perf_counter() - start
    arrays = dict(z=z.numpy(), x=x.numpy(), y=labels.numpy().astype(np.int64), seconds=np.float64(seconds))
    write_atomically(pair_chunk_path(args.out, chunk), lambda temporary: np.savez(temporary, **arrays))
    return seconds


def write_pairs(args, rank, world_size, device):
    model, data = load_dit_checkpoint(args.ckpt, args.model, args.image_size, args.num_classes)  # or a UserError
    model.to(device)
    spec = SamplingSpec.from_checkpoint_entry(data["sampling"])
    sampler, steps, _ = resolve_sampling(spec, args.sampler or (None if spec.sampler else "dpm++2m"),
                                         args.num_sampling_steps, cfg_scale=1.0)
    if sampler in STOCHASTIC_SAMPLERS:
        raise UserError(f"--sampler {sampler} is stochastic, and a pair needs the teacher's ODE: the deterministic "
                        f"x of its z - choose one of {', '.join(n for n in SAMPLERS if n not in STOCHASTIC_SAMPLERS)}")
    clip = not data["latent"]  # pixels: x_0 clamped to [-1, 1] in each step, as sample.py samples them
    forwards = steps * forwards_per_step(model, 1.0)
    num_chunks = math.ceil(args.num_pairs / args.chunk_size)
    settings = dict(sampler=sampler, num_sampling_steps=steps, cfg_scale=1.0, clip=clip, seed=args.seed,
                    num_pairs=args.num_pairs, chunk_size=args.chunk_size)
    if rank == 0:
        prepare_folder(args.out, dict(teacher=teacher_identity(args.ckpt, data, model), settings=settings,
                                      num_chunks=num_chunks, forwards_per_pair=forwards,
                                      layout="z, x float32 (n, C, H, W) in the model's space; y int64; pair i has "
                                             "label i % num_classes"))
        remove_temporaries(args.out)  # of a run killed while it wrote a chunk
    if dist.is_initialized():
        dist.barrier()
    missing = [k for k in range(num_chunks) if not os.path.isfile(pair_chunk_path(args.out, k))]
    if dist.is_initialized():
        dist.barrier()  # every rank has listed them before any rank writes one
    mine = missing[rank::world_size]
    if rank == 0:
        print(f"{num_chunks - len(missing)} of {num_chunks} chunks of {args.chunk_size} pairs already in {args.out}; "
              f"writing {len(missing)} on {world_size} process(es), device {device}: {sampler} {steps} steps "
              f"({forwards} teacher forwards per pair)", flush=True)
    seconds, pairs = 0.0, 0
    for chunk in tqdm(mine, desc="pairs (rank 0)", unit="chunk", disable=rank != 0):
        seconds += write_chunk(model, spec, sampler, steps, clip, chunk, args, model.config["num_classes"], device)
        pairs += len(range(chunk * args.chunk_size, min((chunk + 1) * args.chunk_size, args.num_pairs)))
    if pairs:
        print(f"rank {rank}: {pairs} pairs in {seconds:.1f} s: {1000 * seconds / pairs:.2f} ms per pair "
              f"({forwards} forwards), device {device}", flush=True)
    if dist.is_initialized():
        dist.barrier()


def main(args):
    rank, world_size, device = setup_distributed()
    try:
        # One run per --out: rank 0 holds its lock for the run's life (a second run stops at once).
        with lock_folder(args.out, "--out") if rank == 0 else nullcontext():
            write_pairs(args, rank, world_size, device)
    finally:
        cleanup()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Write a teacher's ODE pairs (noise, deterministic sample) for "
                                                 "rectified flow; resumable, under torchrun or as one process.")
    add_checkpoint_args(parser)
    group = parser.add_argument_group("pairs")
    group.add_argument("--out", required=True, help="pair folder (meta.json and the chunks); rerunning resumes it")
    group.add_argument("--num-pairs", type=positive_int, default=10_000, help="pairs to write")
    group.add_argument("--chunk-size", type=positive_int, default=1000, help="pairs per chunk file")
    group.add_argument("--batch-size", type=positive_int, default=500, help="pairs per forward pass per process")
    group.add_argument("--sampler", choices=[n for n in SAMPLERS if n not in STOCHASTIC_SAMPLERS], default=None,
                       help="the teacher's ODE solver (default: the checkpoint's own, else dpm++2m)")
    group.add_argument("--num-sampling-steps", type=positive_int, default=None,
                       help="its steps (default: the checkpoint's own, else 20 for a solver)")
    group.add_argument("--seed", type=non_negative_int, default=0, help="chunk k's noise comes from (seed, k)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt} does not exist")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
