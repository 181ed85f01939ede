"""Scores an .npz of samples (ADM layout: arr_0 = uint8 images (N, H, W, C), arr_1 = int64 labels (N,)).

Two metric sets:
  --digits       the embedded default. A small CNN trained on the digits 'train' split (cached under --cache-dir)
                 gives the class accuracy of the samples (did the model draw the digit it was asked for?), and a
                 Frechet distance and precision/recall (k=3) between its penultimate features of the samples and of
                 the held-out 'test' digits. The same numbers for real digits are printed beside them as the reference.
  --ref-batch    ImageNet scale: FID, Inception Score and precision/recall (k=3) against an ADM reference batch,
                 with torchvision's Inception-V3 architecture and weights from a local file (--inception-weights).

Inception weights: published FIDs (ADM, DiT) use the TensorFlow FID Inception (pt_inception-2015-12-05 in its PyTorch
port), which differs from torchvision's ImageNet weights; FIDs from other weights rank models but are not comparable
to published numbers. The FID weights load here (1008 classes, no AuxLogits), but the FID network also changes a few
pooling layers that torchvision's Inception3 keeps, so even with them the numbers come close to, not exactly at, the
published ones. Nothing is ever downloaded.

    python evaluate.py samples.npz --digits
    python evaluate.py samples.npz --ref-batch VIRTUAL_imagenet256_labeled.npz --inception-weights inception.pth
"""
import argparse
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from scipy.special import xlogy
from tqdm import tqdm

from checks import UserError, check_output_path, positive_int, read_file, run_script, write_atomically
from data import DIGITS_CLASSES, DIGITS_SIZE, load_digits_arrays

DEFAULT_CACHE_DIR = "results/digits_scorer"
DIGITS_SCORER_FILE = "digits_scorer.pt"
# Everything that decides the trained scorer; a cached file made with other settings is refused, not silently used.
DIGITS_SCORER_CONFIG = dict(width=32, feature_dim=64, epochs=15, batch_size=64, lr=1e-3, seed=0)
INCEPTION_SIZE = 299  # Inception-V3 input resolution
INCEPTION_SPLITS = 10  # the standard number of splits for the Inception Score
PR_NEIGHBOURS = 3  # k of the k-NN manifold estimate (Kynkaanniemi et al. 2019), as in ADM's evaluator


#################################################################################
#                         Metrics on feature vectors                            #
#################################################################################

def feature_statistics(feats):
    """Mean and covariance (float64) of features (N, D); these define the Gaussian that FID compares."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need features of shape (N, D) with N >= 2 for a covariance, got shape {feats.shape}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def fid_from_feats(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), used by FID and the digits scorer.

    Heusel et al. 2017 (FID): |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; both sides must come from the same feature extractor")
    with warnings.catch_warnings():  # a singular product is common (few samples, dead units); checked below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():  # as in the standard FID code: retry with eps on the diagonals
            offset = np.eye(len(mu1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # round-off gives tiny imaginary parts; large ones mean a broken covariance
        largest = np.abs(np.diagonal(covmean).imag).max()
        # The standard 1e-3 tolerance, made relative for large features: round-off grows with their scale.
        if largest > 1e-3 * max(1.0, np.abs(np.diagonal(covmean).real).max()):
            raise ValueError(f"matrix square root has an imaginary component of {largest:.3g}; "
                             f"the covariances are not valid (check the features for NaN or inf)")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits, splits=INCEPTION_SPLITS):
    """Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), over `splits` equal parts.

    Returns (mean, std) over the splits; p(y) is the marginal within each split, as in the original code.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need logits of shape (N, classes) with N >= splits={splits}, got {logits.shape}")
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()  # (N, classes)
    scores = []
    for part in np.array_split(probs, splits):
        marginal = part.mean(axis=0, keepdims=True)  # (1, classes)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)  # xlogy: 0 log 0 = 0
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(rows, cols):
    # |a - b|^2 = |a|^2 - 2 a.b + |b|^2, clamped at 0 against round-off (as in the Kynkaanniemi et al. code)
    return (rows.pow(2).sum(1, keepdim=True) - 2 * rows @ cols.T + cols.pow(2).sum(1)[None]).clamp_(min=0)


def _kth_neighbour_radii(feats, k, batch_size):
    """Squared distance from each point to its k-th nearest other point; the radius of its hypersphere."""
    radii = []
    for start in tqdm(range(0, len(feats), batch_size), desc="k-NN radii", leave=False):
        dist = _squared_distances(feats[start:start + batch_size], feats)  # (B, N); the point itself is at 0
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # k+1 counts the point itself, as ADM does
    return torch.cat(radii)


def _share_inside(points, centers, center_radii, batch_size):
    """Share of points within at least one center's hypersphere."""
    inside = []
    for start in tqdm(range(0, len(points), batch_size), desc="manifold membership", leave=False):
        dist = _squared_distances(points[start:start + batch_size], centers)  # (B, M)
        inside.append((dist <= center_radii[None]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real_feats, fake_feats, k=PR_NEIGHBOURS, batch_size=1000, device="cpu"):
    """Improved precision and recall (Kynkaanniemi et al. 2019, eq. 1-3) with k-NN hyperspheres.

    precision: share of fake points inside the real manifold; recall: share of real points inside the fake one.
    Returns (precision, recall).
    """
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"need two feature sets (N, D) of the same D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points per set, "
                         f"got {len(real)} real and {len(fake)} fake")
    center = real.mean(dim=0)  # distances ignore a shared shift; centring keeps float32 round-off small
    real, fake = real - center, fake - center
    real_radii = _kth_neighbour_radii(real, k, batch_size)
    fake_radii = _kth_neighbour_radii(fake, k, batch_size)
    precision = _share_inside(fake, real, real_radii, batch_size)
    recall = _share_inside(real, fake, fake_radii, batch_size)
    return precision, recall


#################################################################################
#                         Reading sample files                                  #
#################################################################################

def check_images_layout(shape, dtype, where):
    """Raises a clear error unless (shape, dtype) describe uint8 images (N, H, W, C) with C = 1 or 3."""
    if np.dtype(dtype) != np.uint8:
        raise UserError(f"{where}: images must be uint8 in 0..255, got {np.dtype(dtype)}; convert with "
                        f"np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for x in [0, 1]")
    if len(shape) != 4 or shape[3] not in (1, 3) or shape[0] == 0:
        hint = " (it looks like NCHW: transpose to NHWC)" if len(shape) == 4 and shape[1] in (1, 3) else ""
        raise UserError(f"{where}: images must have shape (N, H, W, C) with N >= 1 and C = 1 or 3, "
                        f"got {tuple(shape)}{hint}")


def _read_npy_header(file):
    version = np.lib.format.read_magic(file)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(file)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(file)
    raise UserError(f"unsupported .npy format version {version}; save the images with np.savez")


def npz_images_info(path, need_labels=False):
    """Checks an ADM-layout .npz without loading its images; returns (images shape, labels or None)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; pass an .npz with arr_0 = uint8 images (N, H, W, C), "
                                f"e.g. the one sample.py writes")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz archive; write it with np.savez(path, images, labels)")
    with zipfile.ZipFile(path) as archive:
        names = [name[:-len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
        if "arr_0" not in names:
            raise UserError(f"{path} has no arr_0 (it holds {names}); expected arr_0 = uint8 images (N, H, W, C) "
                            f"and arr_1 = labels, as written by np.savez(path, images, labels)")
        with archive.open("arr_0.npy") as file:
            shape, fortran_order, dtype = _read_npy_header(file)
    check_images_layout(shape, dtype, f"{path} arr_0")
    if fortran_order:
        raise UserError(f"{path} arr_0 is stored in Fortran order; save np.ascontiguousarray(images) instead")
    labels = None
    if "arr_1" in names:
        with np.load(path) as npz:
            labels = npz["arr_1"]
        check_labels(labels, shape[0], f"{path} arr_1")
    elif need_labels:
        raise UserError(f"{path} has no arr_1; the class accuracy needs the label each sample was generated for "
                        f"(np.savez(path, images, labels))")
    return tuple(shape), labels


def check_labels(labels, num_images, where, num_classes=None):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{where}: labels must be integers of shape (N,), got {labels.dtype} {labels.shape}")
    if len(labels) != num_images:
        raise UserError(f"{where}: {len(labels)} labels for {num_images} images; "
                        f"arr_1 must hold one label per image of arr_0")
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(f"{where}: labels must lie in 0..{num_classes - 1}, got {labels.min()}..{labels.max()}")


def iter_npz_images(path, batch_size):
    """Yields arr_0 in batches (B, H, W, C) straight from the archive, so 50K images never sit in memory at once."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as file:
        shape, _, dtype = _read_npy_header(file)
        item_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = file.read(count * item_bytes)
            if len(data) != count * item_bytes:
                raise UserError(f"{path}: arr_0 is truncated (ends before image {start + len(data) // item_bytes})")
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(count, *shape[1:])  # bytearray: writable


#################################################################################
#                         Digits scorer (the embedded default)                  #
#################################################################################

def check_digits_samples(images, labels):
    """Raises a clear error unless images are square uint8 (N, S, S, C) with one label in 0..9 each; returns S."""
    check_images_layout(images.shape, images.dtype, "digits samples")
    if images.shape[1] != images.shape[2]:
        raise UserError(f"digits samples must be square (N, S, S, C), got {images.shape}")
    check_labels(labels, len(images), "digits samples", num_classes=DIGITS_CLASSES)
    return images.shape[1]


def digits_scorer_net(width, feature_dim):
    """A small CNN for 8x8 digits; everything but the last layer gives the features."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),  # (N, W, 8, 8)
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),  # (N, 2W, 8, 8)
        nn.MaxPool2d(2), nn.Flatten(),  # (N, 2W * 16)
        nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),  # (N, F): the features
        nn.Linear(feature_dim, DIGITS_CLASSES),  # (N, 10)
    )


def digits_to_input(images):
    """uint8 images (N, S, S, C) -> (N, 1, 8, 8) in [-1, 1]: RGB averaged to gray, other sizes resized to 8x8."""
    check_images_layout(images.shape, images.dtype, "digits samples")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255  # (N, C, S, S)
    x = x.mean(dim=1, keepdim=True)  # (N, 1, S, S)
    if x.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
        # Bilinear without antialiasing undoes DigitsDataset's bilinear upsampling far better than area averaging
        # does, which keeps the input close to the 8x8 digits the scorer was trained on.
        x = F.interpolate(x, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)  # (N, 1, 8, 8)
    return x * 2 - 1


def real_digits_uint8(split, image_size=DIGITS_SIZE):
    """Real digits in the form a model trained at image_size gives its samples: uint8 (N, S, S, 1), int64 labels.

    Resized as DigitsDataset does (bilinear), then quantised, so they make the same round trip as samples.
    """
    images, labels = load_digits_arrays(split)
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
    if image_size != DIGITS_SIZE:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)  # (N, 1, S, S)
    return (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(), labels


def train_digits_scorer(config=DIGITS_SCORER_CONFIG):
    """Trains the scorer on the 'train' split; deterministic: fixed seed, CPU, one thread, fixed epochs."""
    images, labels = real_digits_uint8("train")
    x, y = digits_to_input(images), torch.from_numpy(labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same weights on every machine (and fastest for a net this small)
    try:
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random state alone
            torch.manual_seed(config["seed"])
            net = digits_scorer_net(config["width"], config["feature_dim"])
            optimizer = torch.optim.Adam(net.parameters(), lr=config["lr"])
            for _ in tqdm(range(config["epochs"]), desc="training the digits scorer", leave=False):
                order = torch.randperm(len(y))
                for start in range(0, len(y), config["batch_size"]):
                    batch = order[start:start + config["batch_size"]]
                    loss = F.cross_entropy(net(x[batch]), y[batch])
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return net.eval()


@torch.no_grad()
def digits_features(net, images, batch_size=256):
    """Penultimate features (N, F) and logits (N, 10) of uint8 images (N, H, W, C), as float64 numpy arrays."""
    x = digits_to_input(images)
    feats, logits = [], []
    for start in range(0, len(x), batch_size):
        batch_feats = net[:-1](x[start:start + batch_size])  # (B, F)
        feats.append(batch_feats)
        logits.append(net[-1](batch_feats))  # (B, 10)
    return torch.cat(feats).double().numpy(), torch.cat(logits).double().numpy()


def load_digits_scorer(cache_dir=DEFAULT_CACHE_DIR):
    """The cached scorer from cache_dir/digits_scorer.pt; trained and saved there first if absent."""
    path = os.path.join(cache_dir, DIGITS_SCORER_FILE)
    if not os.path.exists(path):
        net = train_digits_scorer()
        test_images, test_labels = real_digits_uint8("test")
        test_accuracy = float((digits_features(net, test_images)[1].argmax(1) == test_labels).mean())
        os.makedirs(cache_dir, exist_ok=True)
        checkpoint = dict(model=net.state_dict(), config=dict(DIGITS_SCORER_CONFIG), test_accuracy=test_accuracy)
        write_atomically(path, lambda temporary: torch.save(checkpoint, temporary))
    checkpoint = read_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                           "delete it (or pass another --cache-dir): the next run trains the scorer again")
    if checkpoint.get("config") != DIGITS_SCORER_CONFIG:
        raise UserError(f"{path} was trained with {checkpoint.get('config')}, this code uses {DIGITS_SCORER_CONFIG}; "
                        f"delete the file (or pass another --cache-dir) to retrain")
    net = digits_scorer_net(DIGITS_SCORER_CONFIG["width"], DIGITS_SCORER_CONFIG["feature_dim"])
    net.load_state_dict(checkpoint["model"])
    return net.eval()


def digits_scores(images_uint8_nhwc, labels, cache_dir=DEFAULT_CACHE_DIR, batch_size=256):
    """Class accuracy of samples, and the Frechet distance and precision/recall of their scorer features against the
    held-out test digits (precision: share of samples on the test digits' manifold; recall: the converse).

    The test digits are first brought to the samples' size (see real_digits_uint8), so resizing costs nothing.
    Returns dict(accuracy=float, frechet=float, precision=float, recall=float, n=int).
    """
    image_size = check_digits_samples(images_uint8_nhwc, labels)
    net = load_digits_scorer(cache_dir)
    feats, logits = digits_features(net, images_uint8_nhwc, batch_size)
    test_feats, _ = digits_features(net, real_digits_uint8("test", image_size)[0], batch_size)
    frechet = fid_from_feats(*feature_statistics(feats), *feature_statistics(test_feats))
    # Frechet distance compares two Gaussians and can hide a collapse onto a few modes; recall shows it.
    precision, recall = precision_recall(test_feats, feats)
    accuracy = float((logits.argmax(1) == np.asarray(labels)).mean())
    return dict(accuracy=accuracy, frechet=frechet, precision=precision, recall=recall, n=len(images_uint8_nhwc))


def digits_reference_scores(cache_dir=DEFAULT_CACHE_DIR, image_size=DIGITS_SIZE):
    """The same numbers for real digits at image_size: accuracy on the held-out test digits (a ceiling for samples)
    and the Frechet distance and precision/recall between real train and held-out test digits (what two real sets
    of digits give; the train digits stand where the samples stand in digits_scores).

    Returns dict(accuracy=float, frechet=float, precision=float, recall=float, n=int, frechet_between=str).
    """
    net = load_digits_scorer(cache_dir)
    test_images, test_labels = real_digits_uint8("test", image_size)
    train_images, _ = real_digits_uint8("train", image_size)
    test_feats, test_logits = digits_features(net, test_images)
    train_feats, _ = digits_features(net, train_images)
    frechet = fid_from_feats(*feature_statistics(train_feats), *feature_statistics(test_feats))
    precision, recall = precision_recall(test_feats, train_feats)
    accuracy = float((test_logits.argmax(1) == test_labels).mean())
    between = f"real train digits ({len(train_images)}) vs held-out real test digits ({len(test_images)})"
    return dict(accuracy=accuracy, frechet=frechet, precision=precision, recall=recall, n=len(test_images),
                frechet_between=between)


#################################################################################
#                         ImageNet scale: Inception-V3                          #
#################################################################################

def load_inception(weights_path, device="cpu"):
    """torchvision's Inception-V3 with a local state_dict; returns (pool-feature network, classifier layer).

    The number of classes (1000 for torchvision's weights, 1008 for the FID weights) and AuxLogits are read off
    the file; anything else that does not match the architecture is an error naming the keys.
    """
    from torchvision.models import inception_v3  # imported here: the --digits path does without torchvision

    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"Inception weights {weights_path} not found; pass a local state_dict .pth for "
                                f"torchvision's Inception3 (nothing is downloaded)")
    state = read_file(weights_path, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                      "save a plain state_dict: torch.save(model.state_dict(), path)")
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise UserError(f"{weights_path} is not a state_dict (a dict of tensors); "
                        f"save one with torch.save(model.state_dict(), path)")
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    aux_logits = any(key.startswith("AuxLogits.") for key in state)
    model = inception_v3(weights=None, aux_logits=aux_logits, init_weights=False, num_classes=num_classes)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
                   for key in state if key in expected and state[key].shape != expected[key].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(keys)} {what}: {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("keys with the wrong shape", wrong_shape)) if keys]
        hint = " (keys start with 'module.': strip that prefix)" if any(k.startswith("module.") for k in state) else ""
        raise UserError(f"{weights_path} does not match torchvision's Inception3 architecture: "
                        f"{'; '.join(problems)}{hint}")
    model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent; unused in eval
    classifier = model.fc
    model.fc = nn.Identity()  # the network now ends at the 2048-d pool features
    return model.eval().to(device), classifier.eval().to(device)


@torch.no_grad()
def inception_features(model, classifier, batches, device, total=None):
    """2048-d pool features and logits (float32 numpy) for batches of uint8 images (B, H, W, C)."""
    feats, logits = [], []
    for images in tqdm(batches, total=total, desc="Inception features", leave=False):
        x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()  # (B, C, H, W)
        x = x.expand(-1, 3, -1, -1)  # gray -> RGB; a no-op for RGB
        # [-1, 1]: what torchvision's Inception3 computes internally (transform_input=True) from ImageNet-normalised
        # input for its own weights, and what the FID weights expect; transform_input stays False, so no round trip.
        x = x / 127.5 - 1
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        pooled = model(x)  # (B, 2048)
        feats.append(pooled.cpu())
        logits.append(classifier(pooled).cpu())  # (B, classes)
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def npz_inception_features(path, num_images, model, classifier, batch_size, device):
    batches = iter_npz_images(path, batch_size)
    return inception_features(model, classifier, batches, device, total=-(-num_images // batch_size))


def imagenet_scores(samples_path, ref_path, inception_weights, batch_size=64, device=None, splits=INCEPTION_SPLITS):
    """FID, Inception Score and precision/recall (k=3) of samples against an ADM reference batch.

    The reference statistics are recomputed from the reference images with the same network: the 'mu'/'sigma'
    an ADM reference batch carries come from the TensorFlow Inception and would mix two feature spaces.
    Returns dict(fid, inception_score, inception_score_std, inception_score_splits, precision, recall, n, n_ref).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    num_samples = npz_images_info(samples_path)[0][0]  # check both files before the long feature passes
    num_ref = npz_images_info(ref_path)[0][0]
    model, classifier = load_inception(inception_weights, device)
    sample_feats, sample_logits = npz_inception_features(samples_path, num_samples, model, classifier, batch_size,
                                                         device)
    ref_feats, _ = npz_inception_features(ref_path, num_ref, model, classifier, batch_size, device)
    fid = fid_from_feats(*feature_statistics(sample_feats), *feature_statistics(ref_feats))
    is_mean, is_std = inception_score(sample_logits, splits)
    precision, recall = precision_recall(ref_feats, sample_feats, device=device)
    return dict(fid=fid, inception_score=is_mean, inception_score_std=is_std, inception_score_splits=splits,
                precision=precision, recall=recall, n=len(sample_feats), n_ref=len(ref_feats))


#################################################################################
#                         Command line                                          #
#################################################################################

def print_digits_table(path, image_shape, scores, reference, cache_dir):
    size = "x".join(str(side) for side in image_shape[1:])
    print(f"digits scores of {path} (N={scores['n']}, {size}); scorer {os.path.join(cache_dir, DIGITS_SCORER_FILE)}")
    print(f"{'metric':<18}{'samples':>10}{'real':>10}  what 'real' is")
    print(f"{'class accuracy':<18}{scores['accuracy']:>10.4f}{reference['accuracy']:>10.4f}  "
          f"held-out real test digits ({reference['n']}): the ceiling")
    print(f"{'Frechet distance':<18}{scores['frechet']:>10.4f}{reference['frechet']:>10.4f}  "
          f"{reference['frechet_between']}: the floor")
    for key, name in (("precision", "precision (k=3)"), ("recall", "recall (k=3)")):
        print(f"{name:<18}{scores[key]:>10.4f}{reference[key]:>10.4f}  {reference['frechet_between']}")
    print(f"The samples' Frechet distance, precision and recall are against the held-out real test digits "
          f"({reference['n']}) in the scorer's penultimate features; the Frechet distance and recall depend on N, "
          f"so compare runs at equal N.")


def print_imagenet_table(path, ref_path, weights_path, scores):
    print(f"scores of {path} (N={scores['n']}) against {ref_path} (N={scores['n_ref']}), "
          f"Inception weights {weights_path}")
    print(f"{'FID':<18}{scores['fid']:>10.4f}")
    print(f"{'Inception Score':<18}{scores['inception_score']:>10.4f} +- {scores['inception_score_std']:.4f} "
          f"({scores['inception_score_splits']} splits)")
    print(f"{'precision (k=3)':<18}{scores['precision']:>10.4f}")
    print(f"{'recall (k=3)':<18}{scores['recall']:>10.4f}")


def main(args):
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.digits:
        if args.inception_weights is not None:
            raise UserError("--inception-weights is for --ref-batch; --digits uses its own scorer")
        cache_dir = args.cache_dir or DEFAULT_CACHE_DIR
        npz_images_info(args.samples, need_labels=True)
        with np.load(args.samples) as npz:
            images, labels = npz["arr_0"], npz["arr_1"]
        scores = digits_scores(images, labels, cache_dir, args.batch_size)
        reference = digits_reference_scores(cache_dir, image_size=images.shape[1])
        print_digits_table(args.samples, images.shape, scores, reference, cache_dir)
        result = dict(samples=args.samples, metrics="digits", scores=scores, reference=reference)
    else:
        if args.inception_weights is None:
            raise UserError("--ref-batch needs --inception-weights PATH (a local torchvision Inception3 state_dict)")
        if args.cache_dir is not None:
            raise UserError("--cache-dir is for the --digits scorer; --ref-batch caches nothing")
        scores = imagenet_scores(args.samples, args.ref_batch, args.inception_weights, args.batch_size)
        with np.load(args.ref_batch) as npz:
            ref_has_stats = "mu" in npz.files
        if ref_has_stats:
            print(f"note: the 'mu'/'sigma' stored in {args.ref_batch} (from ADM's TensorFlow Inception) are not used; "
                  f"both sides of the FID come from --inception-weights")
        print_imagenet_table(args.samples, args.ref_batch, args.inception_weights, scores)
        result = dict(samples=args.samples, metrics="imagenet", ref_batch=args.ref_batch,
                      inception_weights=args.inception_weights, scores=scores)
    if args.json:
        write_atomically(args.json, lambda temporary: Path(temporary).write_text(json.dumps(result, indent=2)))
        print(f"wrote {args.json}")
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Score an .npz of samples (arr_0 uint8 NHWC images, arr_1 labels).")
    parser.add_argument("samples", help="the .npz of samples to score (as written by sample.py)")
    metrics = parser.add_mutually_exclusive_group(required=True)
    metrics.add_argument("--digits", action="store_true",
                         help="score digits samples (8x8, or square of another size, gray or RGB): class accuracy, "
                              "Frechet distance and precision/recall (k=3) in a small CNN's features")
    metrics.add_argument("--ref-batch", default=None,
                         help="ADM reference batch .npz (arr_0 uint8 images) for FID, Inception Score and "
                              "precision/recall")
    parser.add_argument("--inception-weights", default=None,
                        help="local state_dict .pth for torchvision's Inception3 (with --ref-batch); "
                             "use the FID weights for numbers comparable to published FIDs")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    parser.add_argument("--cache-dir", default=None,
                        help=f"folder of the cached digits scorer, trained there if absent "
                             f"(with --digits; default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--json", default=None, help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    if args.json is not None:
        check_output_path(parser, "--json", args.json)
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
