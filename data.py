"""Datasets: scikit-learn's digits (the embedded default), image folders, pre-extracted latents; the VAE wrapper."""
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from checks import UserError, read_file
from method import derived_seed

DIGITS_SIZE = 8  # native resolution of scikit-learn's digits
DIGITS_CLASSES = 10
DIGITS_TEST_SIZE = 297  # held-out images (of 1,797) for evaluation; the rest (1,500) train models and the scorer


def load_digits_arrays(split):
    """Digits as (images float32 (N, 8, 8) in [0, 1], labels int64 (N,)); split is 'train', 'test' or 'all'.

    The split is a fixed permutation (seed 0), the same on every machine.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"unknown digits split {split!r}; use 'train', 'test' or 'all'")
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    order = np.random.RandomState(0).permutation(len(labels))
    keep = {"test": order[:DIGITS_TEST_SIZE], "train": order[DIGITS_TEST_SIZE:], "all": np.arange(len(labels))}[split]
    return images[keep], labels[keep]


class DigitsDataset(Dataset):
    """Class-conditional digits in pixel space, (1, S, S) in [-1, 1]; resized bilinearly when image_size != 8."""

    def __init__(self, split="train", image_size=DIGITS_SIZE):
        images, labels = load_digits_arrays(split)
        x = torch.from_numpy(images).unsqueeze(1) * 2 - 1  # (N, 1, 8, 8)
        if image_size != DIGITS_SIZE:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.images = x.contiguous()
        self.labels = torch.from_numpy(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


#################################################################################
#                        Image folders (ImageNet layout)                        #
#################################################################################

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def center_crop_arr(pil_image, image_size):
    """ADM / DiT centre crop: PIL image of any size -> PIL image (image_size, image_size), same mode.

    Halve with BOX filtering while the short side is at least 2 * image_size, resize with BICUBIC so the short side
    is image_size, then cut the centre square.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)  # (H, W) or (H, W, C)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def load_rgb_image(path):
    """Open an image file as an RGB PIL image, with an error naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes the whole file, so a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {path}: {e}; remove or replace this file") from e


def list_image_folder(root):
    """ImageFolder layout root/<class>/<image>: returns (class_names sorted, [(path, label), ...] in sorted order)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist (or is not a folder); "
                                f"pass a folder laid out as root/<class>/<image>")
    layout = "root/<class name>/<image>.jpg|.png|... (one subfolder per class, like torchvision ImageFolder)"
    class_names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not class_names:
        raise ValueError(f"{root} has no class subfolders; expected {layout}")
    samples = []
    for label, class_name in enumerate(class_names):
        for dirpath, _, filenames in sorted(os.walk(os.path.join(root, class_name), followlinks=True)):
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, filename), label))
    if not samples:
        raise ValueError(f"{root} has class subfolders {class_names[:5]} but no images in them; expected {layout}")
    return class_names, samples


class ImageFolderDataset(Dataset):
    """ImageNet-style folder -> (x (3, S, S) float in [-1, 1], label int); labels index the sorted class folders.

    Centre crop as in ADM / DiT, then a random horizontal flip when flip=True (training), as in DiT's train.py.
    """

    def __init__(self, root, image_size, flip=True):
        self.root = root
        self.image_size = image_size
        self.flip = flip
        self.class_names, self.samples = list_image_folder(root)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = center_crop_arr(load_rgb_image(path), self.image_size)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, S, S) uint8
        x = x.float() / 127.5 - 1  # (x / 255 - 0.5) / 0.5
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, label


#################################################################################
#                    Pre-extracted VAE latents (extract_latents.py)             #
#################################################################################

# On disk, a latents folder holds
#   meta.json          {"image_size", "vae", "num_images", "shard_size", "num_shards", "class_names", "flip": false,
#                       "mode": "sample" | "mean", "seed", "latent_scale", "data_path"}
#   latents_00000.pt   {"latents": float32 (n, C, h, w), already multiplied by LATENT_SCALE, "labels": int64 (n,)}
#   latents_00001.pt   ... shard k holds images k * shard_size ... in the folder's sorted order
# Images are encoded un-flipped and LatentsDataset does not flip: flipping a latent is not the latent of the flipped
# image, so training on latents goes without the flip augmentation that DiT's train.py applies to pixels.

def read_json(path):
    with open(path) as f:
        return json.load(f)


def latents_shard_path(root, shard):
    return os.path.join(root, f"latents_{shard:05d}.pt")


class LatentsDataset(Dataset):
    """Latents written by extract_latents.py -> (latent float32 (C, h, w), label int64 scalar tensor).

    Shards are memory-mapped, so a folder larger than RAM works; pages are read as samples are drawn.
    """

    def __init__(self, root):
        meta_path = os.path.join(root, "meta.json")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"latents folder {root} does not exist; write it with extract_latents.py --out")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"{meta_path} not found: {root} is not a folder written by extract_latents.py")
        self.meta = read_file(meta_path, read_json, "write the folder again with extract_latents.py")
        lacking = [key for key in ("class_names", "num_shards", "num_images", "image_size")
                   if not isinstance(self.meta, dict) or key not in self.meta]
        if lacking:
            raise UserError(f"{meta_path}: lacks {', '.join(lacking)} - it was not written by extract_latents.py; "
                            f"extract again into an empty folder")
        self.class_names = self.meta["class_names"]
        missing = [k for k in range(self.meta["num_shards"]) if not os.path.isfile(latents_shard_path(root, k))]
        if missing:
            raise FileNotFoundError(f"{root} lacks {len(missing)} of {self.meta['num_shards']} shards "
                                    f"(first: {os.path.basename(latents_shard_path(root, missing[0]))}); "
                                    f"rerun the same extract_latents.py command to finish them")
        self.latents, self.labels = [], []
        for k in range(self.meta["num_shards"]):
            shard = read_file(latents_shard_path(root, k), lambda p: torch.load(p, weights_only=True, mmap=True),
                              "rerun the same extract_latents.py command: it writes broken shards again")
            self.latents.append(shard["latents"])  # (n, C, h, w)
            self.labels.append(shard["labels"])  # (n,)
        # shard k holds dataset indices [offsets[k], offsets[k + 1])
        self.offsets = np.cumsum([0] + [len(labels) for labels in self.labels])
        if self.offsets[-1] != self.meta["num_images"]:
            raise UserError(f"{root} holds {self.offsets[-1]} latents but meta.json says {self.meta['num_images']}; "
                            f"rerun the same extract_latents.py command, or extract again into an empty folder")

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} latents")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.latents[shard][index - self.offsets[shard]], self.labels[shard][index - self.offsets[shard]]


#################################################################################
#                         The Stable Diffusion VAE                              #
#################################################################################

LATENT_SCALE = 0.18215  # Stable Diffusion VAE: scales latents to about unit variance (Rombach et al. 2022)
VAE_HUB_IDS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}  # DiT's --vae ema|mse


def load_vae(name_or_path, device):
    """'ema' | 'mse' | hub id | local folder -> frozen diffusers AutoencoderKL in eval mode on device."""
    from diffusers import AutoencoderKL

    source = VAE_HUB_IDS.get(name_or_path, name_or_path)
    is_local = os.path.isdir(source)
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None
    if not is_local and not looks_like_hub_id:
        raise FileNotFoundError(f"VAE folder {source} does not exist; pass 'ema', 'mse', a Hugging Face hub id such as "
                                f"{VAE_HUB_IDS['ema']}, or a folder written by AutoencoderKL.save_pretrained")
    try:
        # low_cpu_mem_usage=False: the VAE is small, and this keeps diffusers from asking for `accelerate`
        vae = AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False)
    except OSError as e:
        if is_local:
            raise OSError(f"{source} is not a diffusers AutoencoderKL folder (expected config.json and the weights "
                          f"written by save_pretrained): {e}") from e
        raise OSError(f"could not load the VAE {source!r}: there is no local folder of that name and the Hugging Face "
                      f"hub did not provide it ({e}). If this machine is offline, download it where there is internet "
                      f"(huggingface-cli download {source} --local-dir DIR), copy DIR here and pass its path") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_images(vae, x, sample=True, generator=None):
    """Images (N, 3, H, W) in [-1, 1] -> scaled latents float32 (N, C, H/f, W/f); sample=False takes the mean."""
    latent_dist = vae.encode(x.to(vae.device, vae.dtype)).latent_dist
    z = latent_dist.sample(generator=generator) if sample else latent_dist.mode()  # (N, C, h, w)
    return z.float() * LATENT_SCALE


@torch.no_grad()
def decode_latents(vae, z):
    """Scaled latents (N, C, h, w) -> images float32 (N, 3, h*f, w*f), roughly in [-1, 1] (not clamped)."""
    return vae.decode(z.to(vae.device, vae.dtype) / LATENT_SCALE).sample.float()


#################################################################################
#                       What train.py reads, batch by batch                     #
#################################################################################

def build_dataset(args, device):
    """train.py's training set and a plain description of what the model denoises; a UserError for a missing path,
    an empty folder, a bad VAE or fewer examples than --global-batch-size.

    Returns (dataset, data, vae): data = {"image_size", "latent", "vae", "in_channels", "input_size",
    "num_classes"}; vae is the encoder to run on every batch (image folders) or None.
    """
    try:
        dataset, data, vae = read_dataset(args, device)
    except UserError:
        raise
    except (FileNotFoundError, ValueError, OSError) as error:
        raise UserError(str(error)) from None
    if len(dataset) < args.global_batch_size:
        raise UserError(f"the data set has {len(dataset)} examples, fewer than --global-batch-size "
                        f"{args.global_batch_size}")
    return dataset, data, vae


def read_dataset(args, device):
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
