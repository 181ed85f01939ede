"""sample.py and sample_ddp.py end to end on tiny pixel and latent models: outputs, seeds, EMA, bad inputs, chunks."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sample_ddp
from checks import UserError
from models import DiT_models, load_dit_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL = dict(input_size=8, in_channels=1, num_classes=10)  # DiT-Digits-S on 8x8 one-channel digits
LATENT = dict(input_size=8, in_channels=4, num_classes=1000)  # what --image-size 64 gives a raw state_dict


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the subprocesses get OMP_NUM_THREADS=1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(script, *args, module=None):
    command = [sys.executable, "-m", module] if module else [sys.executable, os.path.join(ROOT, script)]
    result = subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def random_dit(seed, **config):
    """A DiT-Digits-S whose every weight is perturbed: adaLN-Zero's zero init would make the output ignore them."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-Digits-S"](**config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    return model.eval()


def load_npz(path):
    with np.load(path) as npz:
        return npz["arr_0"], npz["arr_1"]


@pytest.fixture(scope="module")
def pixel_ckpt(tmp_path_factory):
    """A training checkpoint of a pixel model whose "ema" and "model" weights differ."""
    ema, trained = random_dit(1, **PIXEL), random_dit(2, **PIXEL)
    path = tmp_path_factory.mktemp("pixel") / "ckpt.pt"
    torch.save(dict(config=ema.config, ema=ema.state_dict(), model=trained.state_dict(), step=0,
                    data={"image_size": 8, "latent": False, "vae": None}), path)
    return str(path)


@pytest.fixture(scope="module")
def pixel_npz(pixel_ckpt, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixel_sample")
    run("sample.py", "--ckpt", pixel_ckpt, "--num-sampling-steps", 5, "--npz", folder / "out.npz",
        "--out", folder / "grid.png", "--cfg-scale", 1.0)
    return folder


@pytest.fixture(scope="module")
def latent_files(tmp_path_factory):
    """An official-layout raw state_dict of a latent model and a tiny random AutoencoderKL (downsampling by 8)."""
    from diffusers import AutoencoderKL
    folder = tmp_path_factory.mktemp("latent")
    torch.save(random_dit(3, **LATENT).state_dict(), folder / "raw.pt")
    torch.manual_seed(4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)
    vae.save_pretrained(folder / "vae")
    return folder


#################################################################################
#                                   sample.py                                   #
#################################################################################

def test_pixel_grid_and_npz(pixel_npz):
    images, labels = load_npz(pixel_npz / "out.npz")
    assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 1)
    assert labels.dtype == np.int64 and labels.tolist() == list(range(10))
    assert len({image.tobytes() for image in images}) == 10  # ten different images
    with Image.open(pixel_npz / "grid.png") as grid:
        assert grid.size[0] > 8 and grid.size[1] > 8


def test_pixel_seed_reproducible_and_samplers(pixel_ckpt, pixel_npz, tmp_path):
    common = ["--ckpt", pixel_ckpt, "--num-sampling-steps", "5", "--out", str(tmp_path / "grid.png")]
    first, _ = load_npz(pixel_npz / "out.npz")
    run("sample.py", *common, "--cfg-scale", 1.0, "--npz", tmp_path / "same.npz")  # a fresh process, the same seed
    assert np.array_equal(load_npz(tmp_path / "same.npz")[0], first)
    variants = {"other": ["--cfg-scale", "1", "--seed", "1"], "ddim": ["--cfg-scale", "1", "--sampler", "ddim"],
                "cfg": ["--cfg-scale", "4"]}
    for name, extra in variants.items():
        sample.main(sample.parse_args(common + extra + ["--npz", str(tmp_path / f"{name}.npz")]))
        images, labels = load_npz(tmp_path / f"{name}.npz")
        assert images.shape == (10, 8, 8, 1) and labels.tolist() == list(range(10))
        assert not np.array_equal(images, first), name


def test_ema_weights_are_sampled(pixel_ckpt, pixel_npz):
    checkpoint = torch.load(pixel_ckpt, weights_only=True)
    model, data = load_dit_checkpoint(pixel_ckpt)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["ema"].items())
    trained = DiT_models["DiT-Digits-S"](**PIXEL)
    trained.load_state_dict(checkpoint["model"])
    settings = dict(labels=list(range(10)), seed=0, num_sampling_steps=5, progress=False)
    from_ema = sample.to_uint8_nhwc(sample.generate(model, data, **settings)).astype(int)
    from_model = sample.to_uint8_nhwc(sample.generate(trained.eval(), data, **settings)).astype(int)
    written = load_npz(pixel_npz / "out.npz")[0].astype(int)
    assert np.abs(written - from_ema).max() <= 1  # the same up to float rounding across thread counts
    assert np.abs(written - from_model).mean() > 5


def test_latent_raw_state_dict_with_vae_folder(latent_files, tmp_path):
    run("sample.py", "--ckpt", latent_files / "raw.pt", "--model", "DiT-Digits-S", "--image-size", 64,
        "--vae", latent_files / "vae", "--num-sampling-steps", 3, "--class-labels", 1, 2,
        "--out", tmp_path / "grid.png", "--npz", tmp_path / "s.npz")
    images, labels = load_npz(tmp_path / "s.npz")
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8 and labels.tolist() == [1, 2]
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.mode == "RGB" and min(grid.size) >= 64


@pytest.mark.parametrize("case, extra, error", [
    ("latent", ["--vae", "{tmp}/missing"], "does not exist"),
    ("latent", ["--vae", "{tmp}"], "not a diffusers AutoencoderKL folder"),
    ("latent_without_model", [], "--model"),
    ("pixel", ["--class-labels", "3", "10"], r"\[0, 9\]"),
])
def test_sample_bad_inputs_fail_clearly(case, extra, error, pixel_ckpt, latent_files, tmp_path):
    ckpt = {"pixel": [pixel_ckpt], "latent": [str(latent_files / "raw.pt"), "--model", "DiT-Digits-S",
                                               "--image-size", "64"],
            "latent_without_model": [str(latent_files / "raw.pt")]}[case]
    argv = ["--ckpt", *ckpt, "--num-sampling-steps", "2", "--out", str(tmp_path / "grid.png"),
            *[a.format(tmp=tmp_path) for a in extra]]
    # A clear message, as SystemExit("error: ...") or as the exception that names the problem.
    with pytest.raises((SystemExit, ValueError, OSError), match=error):
        sample.main(sample.parse_args(argv))
    assert not (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{tmp}/missing.pt"], "does not exist"),
    (["--ckpt", "{ckpt}", "--temperature", "0"], "--temperature: 0 is not a finite number > 0"),
])
def test_sample_argument_errors_exit_2(argv, message, pixel_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args([a.format(tmp=tmp_path, ckpt=pixel_ckpt) for a in argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_ddim_independent_of_batch_size_and_device(pixel_ckpt):
    model, data = load_dit_checkpoint(pixel_ckpt)
    settings = dict(labels=[i % 10 for i in range(12)], seed=5, num_sampling_steps=6, sampler="ddim", eta=0.0,
                    cfg_scale=2.0, progress=False)
    whole = sample.generate(model, data, batch_size=12, **settings)
    torch.testing.assert_close(sample.generate(model, data, batch_size=5, **settings), whole, rtol=1e-4, atol=1e-4)
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CPU/GPU comparison needs one")
    torch.backends.cuda.matmul.allow_tf32 = False
    on_gpu = sample.generate(model.cuda(), data, batch_size=5, **settings)
    torch.testing.assert_close(on_gpu, whole, rtol=1e-3, atol=1e-3)


#################################################################################
#                                 sample_ddp.py                                 #
#################################################################################

def ddp_args(ckpt, sample_dir, *extra):
    return ["--ckpt", ckpt, "--num-samples", 20, "--chunk-size", 6, "--per-proc-batch-size", 4,
            "--num-sampling-steps", 4, "--sample-dir", sample_dir, *extra]


def test_ddp_one_process_resume_and_two_processes(pixel_ckpt, tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    run("sample_ddp.py", *ddp_args(pixel_ckpt, one))
    images, labels = load_npz(one / "samples_20.npz")
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
    from evaluate import npz_images_info  # the evaluator's own streaming reader takes the streamed .npz
    assert npz_images_info(str(one / "samples_20.npz"), need_labels=True)[0] == (20, 8, 8, 1)
    assert labels.tolist() == [i % 10 for i in range(20)]  # class-balanced: two of each digit
    chunks = sorted(name for name in os.listdir(one) if name.startswith("chunk_"))
    assert chunks == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz", "chunk_00003.npz"]
    assert [len(load_npz(one / name)[1]) for name in chunks] == [6, 6, 6, 2]

    # Delete one chunk: the rerun samples only that one, and gives the same images.
    kept = {name: os.stat(one / name).st_mtime_ns for name in chunks if name != "chunk_00002.npz"}
    os.remove(one / "chunk_00002.npz")
    sample_ddp.main(sample_ddp.parse_args([str(a) for a in ddp_args(pixel_ckpt, one)]))  # the same command
    out = capsys.readouterr().out
    assert "3 of 4 chunks of 6 already in " in out and "; sampling 1 on 1 process" in out
    assert {name: os.stat(one / name).st_mtime_ns for name in kept} == kept
    assert np.array_equal(load_npz(one / "samples_20.npz")[0], images)

    # Two processes (gloo on the CPU) draw each chunk's noise from (seed, chunk) too: the same images.
    run("sample_ddp.py", "--standalone", "--nproc_per_node=2", os.path.join(ROOT, "sample_ddp.py"),
        *ddp_args(pixel_ckpt, two), module="torch.distributed.run")
    assert np.array_equal(load_npz(two / "samples_20.npz")[0], images)


def test_ddp_refuses_other_settings_and_resamples_a_broken_chunk(pixel_ckpt, tmp_path, capsys):
    sample_ddp.main(sample_ddp.parse_args([str(a) for a in ddp_args(pixel_ckpt, tmp_path, "--num-samples", 3,
                                                                       "--chunk-size", 2)]))
    images = load_npz(tmp_path / "samples_3.npz")[0]
    assert images.shape == (3, 8, 8, 1)
    other = ddp_args(pixel_ckpt, tmp_path, "--num-samples", 3, "--chunk-size", 3, "--cfg-scale", 4)
    with pytest.raises(UserError, match=r"--cfg-scale: 1.5 -> 4.0, --chunk-size: 2 -> 3\)"):
        sample_ddp.main(sample_ddp.parse_args([str(a) for a in other]))
    # A broken chunk (e.g. a disk error; a killed write leaves none, it is atomic) is found and sampled again.
    (tmp_path / "chunk_00001.npz").write_bytes(b"half a file")
    capsys.readouterr()
    sample_ddp.main(sample_ddp.parse_args([str(a) for a in ddp_args(pixel_ckpt, tmp_path, "--num-samples", 3,
                                                                       "--chunk-size", 2)]))
    assert "chunk_00001.npz: cannot be read" in capsys.readouterr().out
    assert np.array_equal(load_npz(tmp_path / "samples_3.npz")[0], images)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def test_ddp_bad_inputs(pixel_ckpt, latent_files, tmp_path, capsys):
    for argv, message in [(ddp_args(tmp_path / "missing.pt", tmp_path), "does not exist"),
                          (ddp_args(pixel_ckpt, tmp_path, "--num-samples", 0), "--num-samples: 0 is not an integer >= 1")]:
        with pytest.raises(SystemExit) as exit_info:
            sample_ddp.parse_args([str(a) for a in argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    latent = ["--ckpt", latent_files / "raw.pt", "--model", "DiT-Digits-S", "--image-size", 64, "--num-samples", 2,
              "--sample-dir", tmp_path / "latent", "--vae", tmp_path / "missing"]
    with pytest.raises(UserError, match="VAE folder .* does not exist"):
        sample_ddp.main(sample_ddp.parse_args([str(a) for a in latent]))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "chunk_00000.npz").write_bytes(b"")
    with pytest.raises(UserError, match="no meta.json"):
        sample_ddp.main(sample_ddp.parse_args([str(a) for a in ddp_args(pixel_ckpt, tmp_path / "foreign")]))
