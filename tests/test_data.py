"""Datasets, centre crop, VAE wrapper and extract_latents.py, on tiny inputs made here (nothing is downloaded)."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import extract_latents
from checks import UserError, lock_folder
from data import (LATENT_SCALE, DigitsDataset, ImageFolderDataset, LatentsDataset, center_crop_arr, decode_latents,
                  encode_images, latents_shard_path, load_digits_arrays, load_vae)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_script(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **HUB_OFFLINE_ENV, **(env or {})})


def write_image_folder(root, sizes_per_class, seed=0):
    """root/<class>/<i>.png with random RGB images of the given (width, height)s."""
    rng = np.random.RandomState(seed)
    for class_name, sizes in sizes_per_class.items():
        os.makedirs(root / class_name, exist_ok=True)
        for i, (width, height) in enumerate(sizes):
            pixels = rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / class_name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_vae_path(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                        latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=16)
    path = tmp_path_factory.mktemp("tiny_vae")
    vae.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------- digits

def test_digits_splits():
    train_images, train_labels = load_digits_arrays("train")
    test_images, test_labels = load_digits_arrays("test")
    all_images, _ = load_digits_arrays("all")
    assert train_images.shape == (1500, 8, 8) and test_images.shape == (297, 8, 8)
    assert set(train_labels.tolist()) == set(range(10)) and set(test_labels.tolist()) == set(range(10))
    # disjoint: the two splits together are a permutation of all images
    rows = lambda images: sorted(map(bytes, images.reshape(len(images), -1)))
    assert rows(np.concatenate([train_images, test_images])) == rows(all_images)
    np.testing.assert_array_equal(load_digits_arrays("train")[0], train_images)  # the same split every time
    dataset = DigitsDataset("train")
    x, y = dataset[0]
    assert len(dataset) == 1500 and x.shape == (1, 8, 8)
    assert dataset.images.min() >= -1 and dataset.images.max() <= 1 and dataset.images.min() == -1
    assert DigitsDataset("test", image_size=16).images.shape == (297, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown digits split"):
        load_digits_arrays("val")


# ---------------------------------------------------------------- centre crop

def test_center_crop_sizes():
    rng = np.random.RandomState(0)
    for width, height, size in [(40, 24, 8), (24, 40, 8), (17, 9, 8), (5, 7, 16), (64, 64, 16), (300, 200, 32)]:
        image = Image.fromarray(rng.randint(0, 256, size=(height, width, 3), dtype=np.uint8))
        out = center_crop_arr(image, size)
        assert out.size == (size, size) and out.mode == "RGB"


def test_center_crop_cuts_the_middle_without_resampling():
    # short side == image_size: no halving, scale 1, so the result is exactly the centre columns
    pixels = np.random.RandomState(1).randint(0, 256, size=(8, 30, 3), dtype=np.uint8)
    out = np.array(center_crop_arr(Image.fromarray(pixels), 8))
    np.testing.assert_array_equal(out, pixels[:, 11:19])  # crop_x = (30 - 8) // 2


def test_center_crop_box_halving_matches_block_means():
    # 32x32 -> 8x8 is two BOX halvings (2x2 means), then scale 1 and no crop. Pillow's fixed-point BOX filter lands
    # within one level of the exact mean at each halving, so within 2 of the 4x4 means; one bicubic or bilinear
    # resize from 32 to 8 would be off by about 30 on this noise.
    pixels = np.random.RandomState(2).randint(0, 256, size=(32, 32, 3), dtype=np.uint8)
    out = np.array(center_crop_arr(Image.fromarray(pixels), 8)).astype(np.float64)
    block_means = pixels.astype(np.float64).reshape(8, 4, 8, 4, 3).mean(axis=(1, 3))
    assert np.abs(out - block_means).max() <= 2.0


# ---------------------------------------------------------------- image folders

def test_image_folder_dataset(tmp_path):
    root = write_image_folder(tmp_path / "images", {"cat": [(20, 12), (12, 20)], "ant": [(16, 16)], "dog": [(9, 30)]})
    (root / "cat" / "notes.txt").write_text("not an image")
    Image.new("L", (10, 14), color=200).save(root / "dog" / "gray.png")  # grayscale becomes RGB
    dataset = ImageFolderDataset(str(root), image_size=8, flip=False)
    assert dataset.class_names == ["ant", "cat", "dog"] and len(dataset) == 5
    assert [label for _, label in dataset.samples] == [0, 1, 1, 2, 2]
    gray, _ = dataset[4]
    assert gray.shape == (3, 8, 8) and torch.allclose(gray, torch.full_like(gray, 200 / 127.5 - 1))
    x, label = dataset[1]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and label == 1
    assert x.min() >= -1 and x.max() <= 1
    expected = np.array(center_crop_arr(Image.open(dataset.samples[1][0]).convert("RGB"), 8))
    torch.testing.assert_close(x, torch.from_numpy(expected).permute(2, 0, 1).float() / 255 * 2 - 1)

    flipping = ImageFolderDataset(str(root), image_size=8)  # flip on by default
    torch.manual_seed(0)
    views = [flipping[1][0] for _ in range(20)]
    assert all(torch.equal(v, x) or torch.equal(v, x.flip(-1)) for v in views)
    assert any(torch.equal(v, x.flip(-1)) for v in views) and any(torch.equal(v, x) for v in views)


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ImageFolderDataset(str(tmp_path / "does-not-exist"), 8)
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "image.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(str(tmp_path / "flat"), 8)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"), 8)
    root = write_image_folder(tmp_path / "corrupt", {"cat": [(8, 8)]})
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    dataset = ImageFolderDataset(str(root), 8)
    broken = [i for i, (path, _) in enumerate(dataset.samples) if path.endswith("broken.png")][0]
    with pytest.raises(OSError, match="broken.png"):
        dataset[broken]


# ---------------------------------------------------------------- VAE

def test_vae_encode_decode(tiny_vae_path):
    vae = load_vae(tiny_vae_path, "cpu")
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = encode_images(vae, x, sample=False)  # (2, 4, 8, 8): two encoder blocks halve once
    assert z.shape == (2, 4, 8, 8)
    torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * 0.18215)
    z1 = encode_images(vae, x, generator=torch.Generator().manual_seed(3))
    z2 = encode_images(vae, x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z1, z2) and not torch.equal(z1, z)
    images = decode_latents(vae, z)
    assert images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images, vae.decode(z / 0.18215).sample)


def test_load_vae_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no/such/vae"):
        load_vae(str(tmp_path / "no/such/vae"), "cpu")
    with pytest.raises(OSError, match="not a diffusers AutoencoderKL folder"):
        load_vae(str(tmp_path), "cpu")
    # A hub id that is not in the cache, with the hub switched off: the message says how to work offline.
    code = ("from data import load_vae\n"
            "try:\n    load_vae('nobody-here/no-such-vae', 'cpu')\n"
            "except OSError as e:\n    print('ERROR:', e)\n")
    result = run_script("-c", code)
    assert "ERROR:" in result.stdout and "offline" in result.stdout and "--local-dir" in result.stdout, result.stderr


# ---------------------------------------------------------------- extract_latents.py and LatentsDataset

def test_extract_latents_end_to_end_and_resume(tmp_path, tiny_vae_path):
    images = write_image_folder(tmp_path / "images", {"a": [(20, 16)] * 3, "b": [(16, 24)] * 2})
    out = tmp_path / "latents"
    command = ["extract_latents.py", "--data-path", str(images), "--image-size", "16", "--vae", tiny_vae_path,
               "--out", str(out), "--batch-size", "1", "--shard-size", "2", "--num-workers", "0"]
    first = run_script(*command)
    assert first.returncode == 0, first.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["num_images"] == 5 and meta["num_shards"] == 3 and meta["class_names"] == ["a", "b"]
    assert meta["latent_scale"] == LATENT_SCALE and meta["flip"] is False
    assert sorted(os.listdir(out)) == [".lock", "latents_00000.pt", "latents_00001.pt", "latents_00002.pt", "meta.json"]

    dataset = LatentsDataset(str(out))
    assert len(dataset) == 5 and dataset.class_names == ["a", "b"]
    assert [int(dataset[i][1]) for i in range(5)] == [0, 0, 0, 1, 1]
    latents = torch.stack([dataset[i][0] for i in range(5)])  # (5, 4, 8, 8)
    assert latents.shape == (5, 4, 8, 8) and latents.dtype == torch.float32

    # The stored latents are the scaled VAE latents of the centre-cropped, unflipped images: the mean is the same
    # through a second path, and the stored samples sit around it at the VAE's scaled standard deviation.
    vae = load_vae(tiny_vae_path, "cpu")
    pixels = torch.stack([x for x, _ in ImageFolderDataset(str(images), 16, flip=False)])  # (5, 3, 16, 16)
    latent_dist = vae.encode(pixels).latent_dist
    standardized = (latents - latent_dist.mean * 0.18215) / (latent_dist.std * 0.18215)
    assert abs(standardized.mean()) < 0.2 and 0.8 < standardized.std() < 1.2

    # Resume: remove the middle shard and truncate the first (a disk error, a copy cut short); a rerun writes only
    # those two, identical to before.
    stamp = os.stat(latents_shard_path(out, 2)).st_mtime_ns
    before = [torch.load(latents_shard_path(out, k), weights_only=True) for k in (0, 1)]
    os.remove(latents_shard_path(out, 1))
    with pytest.raises(FileNotFoundError, match="rerun"):
        LatentsDataset(str(out))
    with open(latents_shard_path(out, 0), "r+b") as f:
        f.truncate(400)
    (out / ".tmp-killed.pt").write_bytes(b"what a killed writer leaves")
    second = run_script(*command)
    assert second.returncode == 0, second.stderr
    assert f"{latents_shard_path(out, 0)}: cannot be read" in second.stdout
    assert "1 already complete, 2 to write" in second.stdout
    assert os.stat(latents_shard_path(out, 2)).st_mtime_ns == stamp
    for k in (0, 1):
        again = torch.load(latents_shard_path(out, k), weights_only=True)
        assert torch.equal(again["latents"], before[k]["latents"]) and torch.equal(again["labels"], before[k]["labels"])
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]

    # Other settings into the same folder are refused instead of mixing shards.
    third = run_script(*command[:-4], "--shard-size", "3", "--num-workers", "0")
    assert third.returncode != 0 and "shard_size" in third.stderr


def test_extract_latents_mean_mode_matches_encoder(tmp_path, tiny_vae_path):
    images = write_image_folder(tmp_path / "images", {"a": [(16, 16)], "b": [(20, 16), (16, 16)]})
    out = tmp_path / "latents"
    # in this process (the script's main, without its argparse) to spare a second start of torch and diffusers
    args = argparse.Namespace(data_path=str(images), image_size=16, vae=tiny_vae_path, out=str(out), batch_size=2,
                              shard_size=2, mode="mean", seed=0, num_workers=0)
    with lock_folder(str(out), "--out"):  # another run on the same folder: refused before it writes anything
        with pytest.raises(UserError, match=f"{out}: in use by pid {os.getpid()} .* choose another --out"):
            extract_latents.main(args)
        assert os.listdir(out) == [".lock"]
    extract_latents.main(args)
    dataset = LatentsDataset(str(out))
    latents = torch.stack([dataset[i][0] for i in range(len(dataset))])  # (3, 4, 8, 8)
    pixels = torch.stack([x for x, _ in ImageFolderDataset(str(images), 16, flip=False)])
    expected = load_vae(tiny_vae_path, "cpu").encode(pixels).latent_dist.mean * 0.18215
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)
    batches = list(torch.utils.data.DataLoader(dataset, batch_size=2))  # samples from both shards in one batch
    torch.testing.assert_close(torch.cat([z for z, _ in batches]), latents, rtol=0, atol=0)
    assert torch.cat([y for _, y in batches]).tolist() == [0, 1, 1]


def test_latents_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentsDataset(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        LatentsDataset(str(tmp_path))


def test_extract_latents_help_and_bad_flag():
    result = run_script("extract_latents.py", "--help")
    assert result.returncode == 0 and "--shard-size" in result.stdout
    result = run_script("extract_latents.py", "--data-path", "x", "--out", "y", "--no-such-flag")
    assert result.returncode != 0 and "--no-such-flag" in result.stderr


def test_extract_latents_wrong_vae_leaves_no_meta(tmp_path):
    images = write_image_folder(tmp_path / "images", {"a": [(16, 16)]})
    args = argparse.Namespace(data_path=str(images), image_size=16, vae=str(tmp_path / "no-vae"),
                              out=str(tmp_path / "latents"), batch_size=1, shard_size=1, mode="sample", seed=0,
                              num_workers=0)
    with pytest.raises(FileNotFoundError, match="no-vae"):
        extract_latents.main(args)
    assert not (tmp_path / "latents").exists()  # a corrected --vae can reuse the same --out
