"""Sample many images for FID into one ADM-layout .npz, in parallel under torchrun, resumable in chunks.

    python sample_ddp.py --ckpt results/digits/checkpoints/0002000.pt --num-samples 10000 --sample-dir samples/digits
    torchrun --nproc_per_node=8 sample_ddp.py --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 \
        --vae /path/to/sd-vae-ft-ema --sample-dir samples/xl2-cfg1.5

Sample i has class label i % num_classes: class-balanced (50,000 images of 1,000 classes are 50 per class) and the
same for any number of processes. --sample-dir holds
    meta.json          the settings of the run; a rerun with other settings is refused
    chunk_00000.npz    samples [k * chunk_size, (k + 1) * chunk_size) of chunk k in the ADM layout (arr_0 uint8
    chunk_00001.npz    (n, H, W, C), arr_1 int64 labels (n,)), from noise seeded by (seed, k) alone, so neither the
    ...                number of processes nor the order of the chunks changes them; each written atomically
    samples_N.npz      every chunk in order, written by rank 0 at the end (--out puts it elsewhere)
Rerunning the same command skips finished chunks (and samples again those that do not load or hold other samples): a
job that stops loses only the chunks in flight. One run at a time per --sample-dir (a lock, held by rank 0).
"""
import argparse
import json
import math
import os
import zipfile
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from checks import (UserError, check_output_path, file_sha256, lock_folder, non_negative_float, non_negative_int,
                    positive_float, positive_int, read_file, remove_temporaries, run_script, write_atomically)
from distributed import cleanup, setup_distributed
from method import derived_seed
from models import load_dit_checkpoint
from sample import add_checkpoint_args, generate, save_npz
from sampling import SAMPLERS, resolve_sampling


def print_rank0(rank, message):
    if rank == 0:
        print(message, flush=True)


def chunk_path(sample_dir, chunk):
    return os.path.join(sample_dir, f"chunk_{chunk:05d}.npz")


def chunk_indices(chunk, chunk_size, num_samples):
    """The sample indices of one chunk: chunk_size consecutive ones (fewer in the last chunk)."""
    return range(chunk * chunk_size, min((chunk + 1) * chunk_size, num_samples))


#################################################################################
#                        The sample folder and its meta.json                    #
#################################################################################

def run_settings(args, vae_name):
    """Everything that decides which images a chunk holds. --per-proc-batch-size is left out: it may change between
    reruns (with DDPM it reorders the per-step noise draws, not their distribution; DDIM with eta 0 is unaffected)."""
    return dict(ckpt_sha256=file_sha256(args.ckpt), model=args.model, image_size=args.image_size,
                num_classes=args.num_classes, sampler=args.sampler, num_sampling_steps=args.num_sampling_steps,
                eta=args.eta, cfg_scale=args.cfg_scale, temperature=args.temperature, seed=args.seed, vae=vae_name,
                num_samples=args.num_samples, chunk_size=args.chunk_size)


def prepare_sample_dir(sample_dir, settings, num_classes, num_chunks):
    """Create sample_dir with its meta.json, or check that the run already there has the same settings (rank 0)."""
    meta_path = os.path.join(sample_dir, "meta.json")
    os.makedirs(sample_dir, exist_ok=True)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            saved = json.load(f)["settings"]
        changed = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
        if changed:
            def flag(key):
                return "--ckpt (file contents, sha256)" if key == "ckpt_sha256" else "--" + key.replace("_", "-")
            details = ", ".join(f"{flag(k)}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise UserError(f"{sample_dir} holds chunks of a run with other settings ({details}) - rerun with "
                            f"that run's settings to resume it, or choose a new --sample-dir")
        return
    if any(name.startswith("chunk_") for name in os.listdir(sample_dir)):
        raise UserError(f"{sample_dir} holds chunk files but no meta.json, so their settings are unknown - choose "
                        f"a new --sample-dir (or empty this one)")
    meta = dict(settings=settings, num_classes=num_classes, num_chunks=num_chunks,
                labels="sample i has label i % num_classes")

    def save(temporary):
        with open(temporary, "w") as f:
            json.dump(meta, f, indent=2)

    write_atomically(meta_path, save)


def load_chunk(path, indices, labels, fix):
    """(images (n, H, W, C) uint8, None), or (None, why the chunk cannot be used, then `fix`): it must load and hold
    the count and labels of samples `indices` of this run."""
    def load(p):
        with np.load(p) as npz:
            return npz["arr_0"], npz["arr_1"]  # (n, H, W, C), (n,)
    try:
        images, chunk_labels = read_file(path, load, fix)
    except UserError as error:
        return None, str(error)
    if images.dtype != np.uint8 or len(images) != len(indices) or \
            not np.array_equal(chunk_labels, labels[indices.start:indices.stop]):
        return None, (f"{path}: holds {len(images)} images ({images.dtype}) with other labels than samples "
                      f"{indices.start}..{indices.stop - 1} of this run - {fix}")
    return images, None


def read_chunk(path, indices, labels):
    """A finished chunk's images (n, H, W, C) uint8, after checking its count and labels against the run's."""
    images, problem = load_chunk(path, indices, labels, "delete it and rerun the same command to sample it again")
    if problem:
        raise UserError(problem)
    return images


def remove_broken_chunks(args, num_chunks, num_classes):
    """Delete finished chunks that cannot be used (a disk error, a copy cut short), so this run samples them again."""
    labels = np.arange(args.num_samples, dtype=np.int64) % num_classes  # (N,)
    for chunk in range(num_chunks):
        path = chunk_path(args.sample_dir, chunk)
        if os.path.isfile(path):
            problem = load_chunk(path, chunk_indices(chunk, args.chunk_size, args.num_samples), labels,
                                 "sampling it again")[1]
            if problem:
                print(problem, flush=True)
                os.remove(path)


def concatenate_chunks(args, num_chunks, num_classes, out):
    """Every chunk in order -> out in the ADM layout, streamed into the .npz one chunk at a time, so that 50K images
    (10 GB at 256px, 39 GB at 512px) never sit in memory at once; written atomically."""
    labels = np.arange(args.num_samples, dtype=np.int64) % num_classes  # (N,)
    image_shape = read_chunk(chunk_path(args.sample_dir, 0), chunk_indices(0, args.chunk_size, args.num_samples),
                             labels).shape[1:]  # (H, W, C)
    header = {"descr": np.dtype(np.uint8).str, "fortran_order": False, "shape": (args.num_samples, *image_shape)}

    def write(temporary):
        # The layout np.savez writes: an uncompressed zip of arr_0.npy and arr_1.npy.
        with zipfile.ZipFile(temporary, "w", allowZip64=True) as npz:
            with npz.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                for chunk in tqdm(range(num_chunks), desc="concatenating", unit="chunk"):
                    path, indices = chunk_path(args.sample_dir, chunk), chunk_indices(chunk, args.chunk_size,
                                                                                      args.num_samples)
                    images = read_chunk(path, indices, labels)
                    if images.shape[1:] != image_shape:
                        raise UserError(f"{path}: holds {images.shape[1:]} images, not {image_shape} as chunk 0 - "
                                        f"delete it and rerun the same command")
                    f.write(np.ascontiguousarray(images).tobytes())
            with npz.open("arr_1.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, labels)

    write_atomically(out, write)
    per_class = np.bincount(labels, minlength=num_classes)
    print(f"wrote {out}: arr_0 {header['shape']} uint8, arr_1 labels i % {num_classes} "
          f"({per_class.min()} to {per_class.max()} images per class)", flush=True)


#################################################################################
#                                     Main                                      #
#################################################################################

def main(args):
    rank, world_size, device = setup_distributed()
    try:
        # One run per --sample-dir: rank 0 holds its lock for the run's life (a second run stops at once).
        with lock_folder(args.sample_dir, "--sample-dir") if rank == 0 else nullcontext():
            sample(args, rank, world_size, device)
    finally:
        cleanup()


def sample(args, rank, world_size, device):
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ GPUs, as the original sample_ddp.py
    torch.backends.cudnn.allow_tf32 = True
    model, data = load_dit_checkpoint(args.ckpt, args.model, args.image_size, args.num_classes)  # or a UserError
    model.to(device)
    # the checkpoint's own sampler and steps where not given (a few-step student's), written into meta.json
    args.sampler, args.num_sampling_steps, args.cfg_scale = resolve_sampling(
        data["sampling"], args.sampler, args.num_sampling_steps, args.cfg_scale, args.temperature,
        default_cfg_scale=1.5)  # 1.5 as the original sample_ddp.py
    num_classes = model.config["num_classes"]
    if args.vae and not data["latent"]:
        raise UserError(f"{args.ckpt}: this model denoises pixels, not VAE latents - drop --vae")
    vae_name = (args.vae or data["vae"] or "ema") if data["latent"] else None
    num_chunks = math.ceil(args.num_samples / args.chunk_size)
    out = args.out or os.path.join(args.sample_dir, f"samples_{args.num_samples}.npz")

    if rank == 0:
        prepare_sample_dir(args.sample_dir, run_settings(args, vae_name), num_classes, num_chunks)
        remove_temporaries(args.sample_dir)  # of a run killed while it wrote a chunk
        remove_broken_chunks(args, num_chunks, num_classes)
    if dist.is_initialized():
        dist.barrier()  # nobody writes a chunk before this, so every rank sees the same missing chunks
    missing = [k for k in range(num_chunks) if not os.path.isfile(chunk_path(args.sample_dir, k))]
    if dist.is_initialized():
        dist.barrier()  # every rank has listed them before any rank writes one
    mine = missing[rank::world_size]  # round-robin over what is left, so a resumed run stays balanced
    print_rank0(rank, f"{num_chunks - len(missing)} of {num_chunks} chunks of {args.chunk_size} already in "
                      f"{args.sample_dir}; sampling {len(missing)} on {world_size} process(es), device {device}")

    vae = None
    if data["latent"] and mine:
        from data import load_vae
        try:
            vae = load_vae(vae_name, device)
        except OSError as error:  # FileNotFoundError included
            raise UserError(f"--vae: {error}") from error
    for chunk in tqdm(mine, desc=f"sampling (rank 0 of {world_size})", unit="chunk", disable=rank != 0):
        indices = chunk_indices(chunk, args.chunk_size, args.num_samples)
        labels = [i % num_classes for i in indices]
        images = generate(model, data, labels, seed=derived_seed(args.seed, "chunk", chunk),
                          num_sampling_steps=args.num_sampling_steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                          temperature=args.temperature, eta=args.eta, batch_size=args.per_proc_batch_size, vae=vae,
                          progress=False)  # (n, C, H, W) in [-1, 1]
        save_npz(chunk_path(args.sample_dir, chunk), images, labels)

    if dist.is_initialized():
        dist.barrier()  # ranks finish within about one chunk of each other
    if rank == 0:
        concatenate_chunks(args, num_chunks, num_classes, out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sample a DiT checkpoint into an ADM-layout .npz for FID, under "
                                                 "torchrun or as one process; rerun the same command to resume.")
    add_checkpoint_args(parser)
    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--num-samples", type=positive_int, default=50_000,
                          help="number of images; sample i has class label i %% num_classes")
    sampling.add_argument("--per-proc-batch-size", type=positive_int, default=32,
                          help="images per forward pass per process")
    sampling.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                          help="as sample.py's --sampler (default: the checkpoint's own, else ddpm)")
    sampling.add_argument("--num-sampling-steps", type=positive_int, default=None,
                          help="number of steps (default: the steps a few-step student was distilled for, else 250)")
    sampling.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM noise (0: deterministic)")
    sampling.add_argument("--cfg-scale", type=non_negative_float, default=None,
                          help="classifier-free guidance scale (1: none; default 1.5 as the original sample_ddp.py, "
                               "1 for a few-step student distilled without guidance); one forward per step for a "
                               "guidance-distilled model")
    sampling.add_argument("--temperature", type=positive_float, default=1.0,
                          help="divide the model output by this before forming each step's mean and variance")
    sampling.add_argument("--seed", type=non_negative_int, default=0,
                          help="random seed; chunk k's noise comes from (seed, k)")
    sampling.add_argument("--vae", default=None, help="VAE to decode latents: ema, mse, a local folder or a hub id "
                                                      "(default: the checkpoint's, else ema)")
    output = parser.add_argument_group("output")
    output.add_argument("--sample-dir", required=True,
                        help="folder for meta.json and the chunks (shared by all nodes of a multi-node run)")
    output.add_argument("--chunk-size", type=positive_int, default=256,
                        help="consecutive samples per chunk file; a stopped job loses the chunks in flight. A "
                             "multiple of --per-proc-batch-size keeps every batch full")
    output.add_argument("--out", default=None, help="the final .npz (default: SAMPLE_DIR/samples_NUM_SAMPLES.npz)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt} does not exist")
    if args.out is not None:
        check_output_path(parser, "--out", args.out)
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
