"""evaluate.py: the metrics against closed forms and independent computations, the digits scorer, the Inception
path on a tiny random network, input errors, and the command line end to end."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

import evaluate

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    """A digits scorer trained once for this module."""
    cache_dir = str(tmp_path_factory.mktemp("digits_scorer"))
    evaluate.load_digits_scorer(cache_dir)
    return cache_dir


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception3 state_dict. Its BatchNorm statistics come from one batch of noise, so the
    activations stay O(1) instead of vanishing through 90 layers (and crawling through denormal floats)."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    model = inception_v3(weights=None, aux_logits=False, init_weights=False)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: the statistics of exactly the batch below
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 128, 128))
    path = str(tmp_path_factory.mktemp("inception") / "inception.pth")
    torch.save(model.state_dict(), path)
    return path


def random_images(count, size, channels, seed):
    return np.random.RandomState(seed).randint(0, 256, size=(count, size, size, channels)).astype(np.uint8)


#################################################################################
#                         Frechet distance, IS, precision/recall                #
#################################################################################

def test_frechet_diagonal_closed_form():
    rng = np.random.RandomState(0)
    mu1, mu2 = rng.randn(16), rng.randn(16)
    var1, var2 = rng.rand(16) + 0.1, rng.rand(16) + 0.1
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert evaluate.fid_from_feats(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_matches_float64_reference():
    # Reference: Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), a symmetric PSD matrix, via eigh in float64.
    rng = np.random.RandomState(1)
    feats1, feats2 = rng.randn(200, 12), rng.randn(150, 12) @ rng.randn(12, 12) + 0.5
    mu1, sigma1 = evaluate.feature_statistics(feats1)
    mu2, sigma2 = evaluate.feature_statistics(feats2)
    values, vectors = np.linalg.eigh(sigma1)
    root1 = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(np.sqrt(inner))
    assert evaluate.fid_from_feats(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    # float32 statistics are computed in float64 inside
    as32 = [x.astype(np.float32) for x in (mu1, sigma1, mu2, sigma2)]
    assert evaluate.fid_from_feats(*as32) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("count,dim", [(100, 8), (5, 32)])  # (5, 32): singular covariances
def test_frechet_identical_features_is_zero(count, dim):
    stats = evaluate.feature_statistics(np.random.RandomState(2).randn(count, dim))
    assert abs(evaluate.fid_from_feats(*stats, *stats)) < 1e-6 * np.trace(stats[1])  # sqrtm's round-off


def test_frechet_errors():
    with pytest.raises(ValueError, match="mismatched statistics"):
        evaluate.fid_from_feats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="N >= 2"):
        evaluate.feature_statistics(np.zeros((1, 3)))


def test_inception_score_closed_forms():
    assert evaluate.inception_score(np.zeros((100, 10))) == pytest.approx((1.0, 0.0), abs=1e-12)
    one_hot = 50.0 * np.eye(10)[np.arange(100) % 10]  # every split holds each class once: IS = classes
    assert evaluate.inception_score(one_hot) == pytest.approx((10.0, 0.0), abs=1e-9)
    with pytest.raises(ValueError, match="splits=10"):
        evaluate.inception_score(np.zeros((5, 10)))


def test_precision_recall_constructed():
    line = np.stack([np.arange(10.0), np.zeros(10)], axis=1)  # real: 10 points 1 apart on a line
    assert evaluate.precision_recall(line, line) == (1.0, 1.0)
    # fake: the first 5 real points and 5 points far away. Precision: 5 of 10 fakes lie on real points.
    # Recall: fake point 4's 3rd neighbour (fake 1) is 3 away, so its ball covers reals 0..7 (7 on the boundary,
    # counted as inside: distance <= radius, as in ADM); reals 8 and 9 are outside every fake ball.
    far = np.stack([1000.0 + np.arange(5), np.zeros(5)], axis=1)
    fake = np.concatenate([line[:5], far])
    precision, recall = evaluate.precision_recall(line, fake)
    assert (precision, recall) == (0.5, 0.8)
    with pytest.raises(ValueError, match="more than 3 points"):
        evaluate.precision_recall(line[:3], line)


def test_precision_recall_matches_brute_force():
    rng = np.random.RandomState(3)
    real, fake = rng.randn(60, 5), rng.randn(45, 5) * 1.3 + 0.4

    def share_inside(points, centers):
        radii = np.sort(cdist(centers, centers), axis=1)[:, 3]  # column 0 is the point itself
        return np.mean((cdist(points, centers) <= radii[None]).any(axis=1))

    precision, recall = evaluate.precision_recall(real, fake, batch_size=7)  # several uneven batches
    assert precision == pytest.approx(share_inside(fake, real))
    assert recall == pytest.approx(share_inside(real, fake))


def double_loop_precision_recall(real, fake, k=3):
    """Kynkaanniemi et al. 2019 written out pair by pair in float64: each point's radius is the distance to its k-th
    nearest other point of its own set; a point is inside a manifold if within the radius of one of its points."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def radii(feats):
        out = []
        for i in range(len(feats)):
            others = [np.sqrt(np.sum((feats[i] - feats[j]) ** 2)) for j in range(len(feats)) if j != i]
            out.append(sorted(others)[k - 1])
        return out

    def share_inside(points, centers, center_radii):
        inside = [any(np.sqrt(np.sum((point - center) ** 2)) <= radius for center, radius in zip(centers, center_radii))
                  for point in points]
        return sum(inside) / len(points)

    return share_inside(fake, real, radii(real)), share_inside(real, fake, radii(fake))


@pytest.mark.parametrize("num_real,num_fake,dim,batch_size", [(50, 40, 4, 1000), (37, 61, 16, 8)])
def test_precision_recall_matches_double_loop(num_real, num_fake, dim, batch_size):
    rng = np.random.RandomState(num_real)
    real, fake = rng.randn(num_real, dim) * 2 + 1, rng.randn(num_fake, dim) * 2.5 + 1.5
    expected = double_loop_precision_recall(real, fake)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # the radii decide some points both ways
    assert evaluate.precision_recall(real, fake, batch_size=batch_size) == pytest.approx(expected, abs=1e-12)


def test_precision_recall_closed_forms():
    rng = np.random.RandomState(4)
    real = rng.randn(300, 16)
    assert evaluate.precision_recall(real, real) == (1.0, 1.0)  # a set against itself
    # Mode collapse: every generated point on real point 0. All of them lie on the real manifold (precision 1), but
    # their radii are 0, so they cover at most that one real point: recall at most 1/N.
    precision, recall = evaluate.precision_recall(real, np.repeat(real[:1], 300, axis=0))
    assert precision == 1.0 and recall <= 1 / 300
    assert evaluate.precision_recall(real, real + 1000.0) == (0.0, 0.0)  # far away: neither covers the other


def test_precision_recall_unchanged_for_ref_batch():
    # Values of precision_recall (the --ref-batch path's, now shared with --digits) computed before the digits scores
    # used it: the counts of points inside, out of 300 fake and 400 real.
    rng = np.random.RandomState(19)
    real, fake = rng.randn(400, 256).astype(np.float32), (rng.randn(300, 256) * 1.1 + 0.05).astype(np.float32)
    assert evaluate.precision_recall(real, fake, batch_size=128) == (13 / 300, 391 / 400)
    real, fake = rng.randn(400, 16), rng.randn(300, 16) * 1.3 + 0.3
    assert evaluate.precision_recall(real, fake, batch_size=128) == (105 / 300, 389 / 400)


def test_precision_recall_is_fast():
    real, fake = np.random.RandomState(5).randn(1000, 64), np.random.RandomState(6).randn(1000, 64)
    start = time.perf_counter()
    evaluate.precision_recall(real, fake)
    assert time.perf_counter() - start < 1.0  # about 0.03 s on one CPU core


#################################################################################
#                         Digits scorer                                         #
#################################################################################

def test_digits_scorer_accuracy_and_checkpoint(scorer_dir):
    path = os.path.join(scorer_dir, evaluate.DIGITS_SCORER_FILE)
    checkpoint = torch.load(path, weights_only=True)  # plain data
    assert checkpoint["config"] == evaluate.DIGITS_SCORER_CONFIG
    assert checkpoint["test_accuracy"] >= 0.95
    reference = evaluate.digits_reference_scores(scorer_dir)
    assert reference["accuracy"] == pytest.approx(checkpoint["test_accuracy"])
    assert reference["n"] == 297 and reference["frechet"] > 0 and "train" in reference["frechet_between"]
    assert 0.8 < reference["precision"] <= 1 and 0.8 < reference["recall"] <= 1  # two real sets of digits


def test_digits_scores_real_vs_noise(scorer_dir):
    floor = evaluate.digits_reference_scores(scorer_dir)["frechet"]
    images, labels = evaluate.real_digits_uint8("test")
    real = evaluate.digits_scores(images, labels, scorer_dir)
    assert real["accuracy"] >= 0.95 and real["frechet"] < 1e-6 and real["n"] == 297
    assert (real["precision"], real["recall"]) == (1.0, 1.0)
    # Upsampled to 16px and RGB, as a model trained at 16px would draw them: still scored as real digits.
    big, _ = evaluate.real_digits_uint8("test", image_size=16)
    big_rgb = evaluate.digits_scores(np.repeat(big, 3, axis=3), labels, scorer_dir)
    assert big_rgb["accuracy"] >= 0.93 and big_rgb["frechet"] < 1e-6
    train_images, train_labels = evaluate.real_digits_uint8("train")
    train = evaluate.digits_scores(train_images[:500], train_labels[:500], scorer_dir)
    assert train["accuracy"] >= 0.97 and train["frechet"] < 4 * floor
    noise = evaluate.digits_scores(random_images(297, 8, 1, seed=0), labels, scorer_dir)
    assert noise["accuracy"] < 0.3 and noise["frechet"] > 20 * max(floor, train["frechet"])
    assert noise["precision"] < 0.1
    # Mode collapse: the first test digit of each class, repeated for every label. The right digits and on the real
    # manifold (precision 1), but covering at most those 10 of the 297 test digits: recall shows what accuracy hides.
    first_of_class = np.array([np.flatnonzero(labels == digit)[0] for digit in labels])
    collapsed = evaluate.digits_scores(images[first_of_class], labels, scorer_dir)
    assert collapsed["accuracy"] >= 0.95 and collapsed["precision"] == 1.0 and collapsed["recall"] <= 10 / 297
    shuffled = evaluate.digits_scores(images, np.random.RandomState(0).permutation(labels), scorer_dir)
    assert shuffled["accuracy"] < 0.3  # right digits, wrong requested classes


def test_digits_scorer_cache_is_reused(scorer_dir, monkeypatch):
    path = os.path.join(scorer_dir, evaluate.DIGITS_SCORER_FILE)
    before = os.stat(path).st_mtime_ns

    def fail():
        raise AssertionError("the cached scorer should have been loaded, not retrained")

    monkeypatch.setattr(evaluate, "train_digits_scorer", fail)
    images, labels = evaluate.real_digits_uint8("test")
    evaluate.digits_scores(images[:50], labels[:50], scorer_dir)
    assert os.stat(path).st_mtime_ns == before


def test_digits_scorer_training_is_deterministic(scorer_dir):
    cached = torch.load(os.path.join(scorer_dir, evaluate.DIGITS_SCORER_FILE), weights_only=True)["model"]
    torch.manual_seed(123)
    state_before = torch.random.get_rng_state()
    retrained = evaluate.train_digits_scorer().state_dict()
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the caller's random state is left alone
    for key in cached:
        assert torch.equal(cached[key], retrained[key]), key


def test_digits_scorer_from_other_settings_is_refused(scorer_dir, tmp_path):
    checkpoint = torch.load(os.path.join(scorer_dir, evaluate.DIGITS_SCORER_FILE), weights_only=True)
    checkpoint["config"] = dict(checkpoint["config"], epochs=1)
    torch.save(checkpoint, tmp_path / evaluate.DIGITS_SCORER_FILE)
    with pytest.raises(ValueError, match="delete the file"):
        evaluate.load_digits_scorer(str(tmp_path))


def test_digits_input_errors(scorer_dir):
    images, labels = evaluate.real_digits_uint8("test")
    with pytest.raises(ValueError, match="297 labels for 100 images"):
        evaluate.digits_scores(images[:100], labels, scorer_dir)
    with pytest.raises(ValueError, match="0..9"):
        evaluate.digits_scores(images, labels + 5, scorer_dir)
    with pytest.raises(ValueError, match="uint8"):
        evaluate.digits_scores(images.astype(np.float32) / 255, labels, scorer_dir)
    with pytest.raises(ValueError, match="square"):
        evaluate.digits_scores(np.zeros((4, 8, 10, 1), np.uint8), labels[:4], scorer_dir)


#################################################################################
#                         Sample files                                          #
#################################################################################

def test_npz_errors(tmp_path):
    images = random_images(4, 8, 1, seed=0)
    with pytest.raises(FileNotFoundError, match="not found"):
        evaluate.npz_images_info(str(tmp_path / "missing.npz"))
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not an .npz archive"):
        evaluate.npz_images_info(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "named.npz", images=images)
    with pytest.raises(ValueError, match="no arr_0"):
        evaluate.npz_images_info(str(tmp_path / "named.npz"))
    np.savez(tmp_path / "float.npz", images.astype(np.float32))
    with pytest.raises(ValueError, match="must be uint8"):
        evaluate.npz_images_info(str(tmp_path / "float.npz"))
    np.savez(tmp_path / "three_dims.npz", images[..., 0])
    with pytest.raises(ValueError, match=r"shape \(N, H, W, C\)"):
        evaluate.npz_images_info(str(tmp_path / "three_dims.npz"))
    np.savez(tmp_path / "nchw.npz", images.transpose(0, 3, 1, 2).repeat(3, axis=1))
    with pytest.raises(ValueError, match="NCHW"):
        evaluate.npz_images_info(str(tmp_path / "nchw.npz"))
    np.savez(tmp_path / "labels.npz", images, np.arange(3))
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        evaluate.npz_images_info(str(tmp_path / "labels.npz"))
    np.savez(tmp_path / "no_labels.npz", images)
    with pytest.raises(ValueError, match="no arr_1"):
        evaluate.npz_images_info(str(tmp_path / "no_labels.npz"), need_labels=True)


def test_streamed_batches_match_the_array(tmp_path):
    images = random_images(7, 5, 3, seed=1)
    np.savez_compressed(tmp_path / "images.npz", images, np.arange(7))
    assert evaluate.npz_images_info(str(tmp_path / "images.npz"))[0] == (7, 5, 5, 3)
    batches = list(evaluate.iter_npz_images(str(tmp_path / "images.npz"), batch_size=3))
    assert [len(batch) for batch in batches] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)


#################################################################################
#                         Inception path                                        #
#################################################################################

def test_inception_weights_errors(tmp_path, inception_weights):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        evaluate.load_inception(str(tmp_path / "missing.pth"))
    torch.save(torch.nn.Linear(3, 3).state_dict(), tmp_path / "linear.pth")
    with pytest.raises(ValueError, match="missing keys: Conv2d_1a_3x3.conv.weight.*unexpected keys: weight, bias"):
        evaluate.load_inception(str(tmp_path / "linear.pth"))
    state = torch.load(inception_weights, weights_only=True)
    state["Conv2d_1a_3x3.conv.weight"] = torch.zeros(32, 3, 5, 5)
    torch.save(state, tmp_path / "wrong_shape.pth")
    with pytest.raises(ValueError, match=r"wrong shape: Conv2d_1a_3x3.conv.weight \(32, 3, 5, 5\)"):
        evaluate.load_inception(str(tmp_path / "wrong_shape.pth"))
    torch.save({"model": state}, tmp_path / "nested.pth")
    with pytest.raises(ValueError, match="not a state_dict"):
        evaluate.load_inception(str(tmp_path / "nested.pth"))


def test_inception_takes_the_fid_layout(tmp_path, inception_weights):
    # The FID weights (pt_inception-2015-12-05) have 1008 classes and no AuxLogits; the layout is read off the file.
    state = torch.load(inception_weights, weights_only=True)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "fid_layout.pth")
    model, classifier = evaluate.load_inception(str(tmp_path / "fid_layout.pth"))
    assert classifier.out_features == 1008 and model.AuxLogits is None


def test_imagenet_scores_on_tiny_inputs(tmp_path, inception_weights, monkeypatch):
    samples = random_images(4, 24, 1, seed=2)  # gray and 24px: both converted on the way in
    np.savez(tmp_path / "samples.npz", samples, np.arange(4))
    np.savez(tmp_path / "ref.npz", random_images(5, 32, 3, seed=3))
    seen = []
    feature_statistics = evaluate.feature_statistics
    monkeypatch.setattr(evaluate, "feature_statistics", lambda feats: seen.append(feats) or feature_statistics(feats))
    scores = evaluate.imagenet_scores(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), inception_weights,
                                      batch_size=3, splits=2)  # the 2048-d sqrtm of FID takes most of the time
    assert (scores["n"], scores["n_ref"], scores["inception_score_splits"]) == (4, 5, 2)
    assert np.isfinite(scores["fid"]) and scores["fid"] > 0
    assert 1 <= scores["inception_score"] <= 2 + 1e-9  # at most the split size
    assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1
    # Second path for the first sample's features: torchvision's model called directly.
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=False, init_weights=False)
    model.load_state_dict(torch.load(inception_weights, weights_only=True))
    model.fc = torch.nn.Identity()
    x = torch.from_numpy(samples[:1]).permute(0, 3, 1, 2).float().repeat(1, 3, 1, 1) / 255 * 2 - 1
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = model.eval()(x)[0].numpy()
    assert seen[0].shape == (4, 2048)
    np.testing.assert_allclose(seen[0][0], expected, rtol=1e-4, atol=1e-3 * np.abs(expected).max())


#################################################################################
#                         Command line                                          #
#################################################################################

def run_cli(*args):
    return subprocess.run([sys.executable, "evaluate.py", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_digits_end_to_end(tmp_path, scorer_dir):
    images, labels = evaluate.real_digits_uint8("test")
    np.savez(tmp_path / "samples.npz", images[:120], labels[:120])
    out = tmp_path / "out" / "scores.json"
    result = run_cli(str(tmp_path / "samples.npz"), "--digits", "--cache-dir", scorer_dir, "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "class accuracy" in result.stdout and "Frechet distance" in result.stdout
    assert "precision (k=3)" in result.stdout and "recall (k=3)" in result.stdout
    scores = json.loads(out.read_text())
    assert [p.name for p in out.parent.iterdir()] == ["scores.json"]  # written atomically: no temporary left
    assert scores["metrics"] == "digits" and scores["scores"]["n"] == 120
    assert scores["scores"]["accuracy"] >= 0.95
    assert scores["reference"]["accuracy"] >= 0.95
    for side in ("scores", "reference"):
        assert 0 < scores[side]["precision"] <= 1 and 0 < scores[side]["recall"] <= 1


def test_cli_errors(tmp_path):
    result = run_cli(str(tmp_path / "missing.npz"), "--digits", "--inception-weights", "x.pth")
    assert result.returncode != 0 and "--inception-weights is for --ref-batch" in result.stderr
    result = run_cli(str(tmp_path / "missing.npz"), "--ref-batch", "ref.npz", "--inception-weights",
                     str(tmp_path / "w.pth"))
    assert result.returncode != 0 and "missing.npz not found" in result.stderr
