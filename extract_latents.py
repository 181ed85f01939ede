"""Encode an ImageNet-style image folder with the Stable Diffusion VAE, once, so training can skip the encoder.

    python extract_latents.py --data-path /data/imagenet/train --image-size 256 --vae ema --out latents/in256

Writes shards of scaled latents and a meta.json (format described in data.py; read them with data.LatentsDataset).
Images are centre-cropped and not flipped; the order is the folder's sorted order. Shard k draws its latent samples
from a generator seeded with seed + k, so rerunning the same command skips finished shards and writes the rest exactly
as an uninterrupted run would (on the same device and batch size); a finished shard that does not load or holds the
wrong number of latents (a disk error, a copy cut short) is written again. One run at a time per --out (a lock).
"""
import argparse
import json
import os

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from checks import (UserError, lock_folder, non_negative_int, positive_int, read_file, remove_temporaries, run_script,
                    write_atomically)
from data import LATENT_SCALE, ImageFolderDataset, encode_images, latents_shard_path, load_vae
from models import VAE_DOWNSAMPLE


def write_or_check_meta(out_dir, meta):
    """Write meta.json on the first run; on a rerun, refuse to mix shards made with different settings."""
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            old_meta = json.load(f)
        changed = [key for key in meta if key != "data_path" and old_meta.get(key) != meta[key]]
        if changed:
            differences = "; ".join(f"{key}: {old_meta.get(key)!r} there, {meta[key]!r} now" for key in changed)
            raise UserError(f"{out_dir} holds latents made with other settings ({differences}); "
                            f"pass a new --out or empty this one")
        return

    def save(temporary):
        with open(temporary, "w") as f:
            json.dump(meta, f, indent=2)

    write_atomically(meta_path, save)


def shard_batches(start, end, batch_size):
    """Image indices [start, end) -> batches that stay inside the shard: [[start, ..., start+b-1], ...]."""
    return [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]


def shard_problem(path, num_latents):
    """Why the finished shard at `path` cannot be used (it does not load, or does not hold num_latents latents and
    labels), or None."""
    try:
        shard = read_file(path, lambda p: torch.load(p, weights_only=True, mmap=True), "writing it again")
    except UserError as error:
        return str(error)
    if not isinstance(shard, dict) or not {"latents", "labels"} <= set(shard):
        return f"{path}: holds no latents and labels - writing it again"
    if len(shard["latents"]) != num_latents or len(shard["labels"]) != num_latents or shard["latents"].ndim != 4:
        return (f"{path}: holds {tuple(shard['latents'].shape)} latents and {len(shard['labels'])} labels, not "
                f"{num_latents} - writing it again")
    return None


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = ImageFolderDataset(args.data_path, args.image_size, flip=False)
    vae = load_vae(args.vae, device)  # before --out is touched, so a wrong --vae leaves no trace in it
    with lock_folder(args.out, "--out"):  # one run per folder
        extract(args, dataset, vae, device)


def extract(args, dataset, vae, device):
    num_shards = -(-len(dataset) // args.shard_size)
    meta = {
        "image_size": args.image_size, "vae": args.vae, "num_images": len(dataset), "shard_size": args.shard_size,
        "num_shards": num_shards, "class_names": dataset.class_names, "flip": False, "mode": args.mode,
        "seed": args.seed, "latent_scale": LATENT_SCALE, "data_path": os.path.abspath(args.data_path),
    }
    write_or_check_meta(args.out, meta)
    remove_temporaries(args.out)  # of a run killed while it wrote a shard

    todo = []
    for k in range(num_shards):
        path = latents_shard_path(args.out, k)
        problem = os.path.isfile(path) and shard_problem(path, min(args.shard_size, len(dataset) - k * args.shard_size))
        if problem:
            print(problem)
        if problem or not os.path.isfile(path):
            todo.append(k)
    print(f"{len(dataset)} images in {len(dataset.class_names)} classes -> {num_shards} shards in {args.out}; "
          f"{num_shards - len(todo)} already complete, {len(todo)} to write (device: {device})")
    if not todo:
        return

    # Each batch lies inside one shard, so the loader's batches can be matched to shards in order.
    batches = [(k, batch) for k in todo
               for batch in shard_batches(k * args.shard_size, min((k + 1) * args.shard_size, len(dataset)),
                                          args.batch_size)]
    loader = DataLoader(dataset, batch_sampler=[batch for _, batch in batches], num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    shard_latents, shard_labels, generator = [], [], None
    progress = tqdm(total=sum(len(batch) for _, batch in batches), unit="img", desc="encoding")
    for i, ((k, _), (x, y)) in enumerate(zip(batches, loader)):
        if generator is None:  # first batch of shard k
            generator = torch.Generator().manual_seed(args.seed + k)  # CPU generator: same draws on any device
        shard_latents.append(encode_images(vae, x.to(device), sample=args.mode == "sample", generator=generator).cpu())
        shard_labels.append(y)
        progress.update(len(y))
        if i + 1 == len(batches) or batches[i + 1][0] != k:  # last batch of shard k
            shard = {"latents": torch.cat(shard_latents).contiguous(),  # (n, C, h, w), scaled by LATENT_SCALE
                     "labels": torch.cat(shard_labels).long()}  # (n,)
            write_atomically(latents_shard_path(args.out, k), lambda temporary: torch.save(shard, temporary))
            shard_latents, shard_labels, generator = [], [], None
    progress.close()
    print(f"done: {len(dataset)} latents of shape {tuple(shard['latents'].shape[1:])} in {args.out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Encode an image folder into VAE latent shards for training.")
    parser.add_argument("--data-path", type=str, required=True,
                        help="image folder laid out as root/<class>/<image> (like ImageNet's train folder)")
    parser.add_argument("--image-size", type=positive_int, default=256,
                        help="centre-crop size in pixels before encoding (a multiple of the VAE's 8)")
    parser.add_argument("--vae", type=str, default="ema",
                        help="'ema' or 'mse' (stabilityai/sd-vae-ft-*), another hub id, or a local VAE folder")
    parser.add_argument("--out", type=str, required=True,
                        help="output folder for meta.json and latents_*.pt; rerun with the same one to resume")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per VAE forward pass")
    parser.add_argument("--shard-size", type=positive_int, default=10000, help="images per latents_*.pt file")
    parser.add_argument("--mode", type=str, choices=["sample", "mean"], default="sample",
                        help="store a sample of each latent distribution (as DiT trains) or its mean")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="shard k samples latents with seed + k")
    parser.add_argument("--num-workers", type=non_negative_int, default=4,
                        help="DataLoader worker processes that decode images")
    args = parser.parse_args(argv)
    if args.image_size % VAE_DOWNSAMPLE:
        parser.error(f"--image-size {args.image_size} must be a multiple of the VAE's {VAE_DOWNSAMPLE}")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
