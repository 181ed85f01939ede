"""train.py end to end on tiny digits configs: stages, logging, exact resume, DDP, atomic checkpoints, bad inputs."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import models
from distill import teacher_block_indices
from models import DiT, save_checkpoint_atomic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--global-batch-size", "16", "--log-every", "2", "--lr", "1e-3", "--ema-decay", "0.9"]


def run_train(*args, check=True, module=None, script=None):
    """train.py (or `script`, or `python -m module`) with args; an AssertionError with its output if it fails."""
    command = [sys.executable, "-m", module] if module else [sys.executable, script or os.path.join(ROOT, "train.py")]
    result = subprocess.run(command + list(args), capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def kill_after_checkpoint(arguments, checkpoint, script=None):
    """Start train.py (or `script`) with `arguments` and kill -9 it as soon as `checkpoint` exists."""
    process = subprocess.Popen([sys.executable, script or os.path.join(ROOT, "train.py"), *map(str, arguments)],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert checkpoint.exists()


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def newest(results_dir):
    folder = os.path.join(results_dir, "checkpoints")
    return os.path.join(folder, sorted(os.listdir(folder))[-1])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    """A small digits teacher, trained for a few steps (its quality does not matter here)."""
    results = tmp_path_factory.mktemp("teacher")
    run_train("--model", "DiT-Digits-S", "--max-steps", "4", "--ckpt-every", "4", "--results-dir", str(results), *TINY)
    return newest(str(results))


def distill_args(teacher_ckpt, results_dir, *extra):
    return ["--distillation", "--teacher-model", "DiT-Digits-S", "--teacher-ckpt", teacher_ckpt,
            "--student-model", "DiT-Digits-S", "--student-depth", "2", "--warmup-steps", "2", "--feature-steps", "2",
            "--joint-steps", "2", "--results-dir", str(results_dir), *TINY, *extra]


def test_plain_training_checkpoint_layout(teacher_ckpt, tmp_path):
    checkpoint = load(teacher_ckpt)  # weights_only: plain data only
    assert {"model", "ema", "opt", "step", "args", "config", "data"} <= set(checkpoint)
    assert checkpoint["step"] == 4 and checkpoint["config"]["in_channels"] == 1
    assert isinstance(checkpoint["args"], dict) and checkpoint["data"] == {"image_size": 8, "latent": False,
                                                                           "vae": None}
    model, data = models.load_dit_checkpoint(teacher_ckpt)
    ema = DiT(**checkpoint["config"])
    ema.load_state_dict(checkpoint["ema"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ema.state_dict().values()))
    results = os.path.dirname(os.path.dirname(teacher_ckpt))
    assert {"args.json", "log.txt", "tensorboard", "checkpoints"} <= set(os.listdir(results))


def test_distillation_runs_three_stages_and_logs_each_term(teacher_ckpt, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_train(*distill_args(teacher_ckpt, tmp_path, "--ckpt-every", "6"))
    log = open(tmp_path / "log.txt").read()
    for stage in ("stage warmup", "stage feature", "stage joint"):
        assert stage in log
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert [v for _, v in scalars["train/stage"]] == [0, 1, 2]  # logged at steps 2, 4, 6
    for tag in ("loss/diffusion", "loss/mse", "loss/vb", "loss/total", "train/lr", "train/grad_norm",
                "train/images_per_second"):
        assert len(scalars[tag]) == 3, tag
    assert [s for s, _ in scalars["loss/kd_feature"]] == [2, 4, 6]  # the teacher's features from the first step
    assert [s for s, _ in scalars["loss/kd_output"]] == [4, 6]  # from the feature stage on
    assert [s for s, _ in scalars["loss/kd_kl"]] == [6]  # the joint stage only
    checkpoint = load(newest(str(tmp_path)))
    assert checkpoint["stage"] == "joint" and checkpoint["step"] == 6
    assert checkpoint["config"]["depth"] == 2 and "proj.0.weight" not in checkpoint["projections"]  # same width


def test_resume_after_a_kill_is_exact(teacher_ckpt, tmp_path):
    uninterrupted, interrupted = tmp_path / "a", tmp_path / "b"
    arguments = distill_args(teacher_ckpt, uninterrupted, "--ckpt-every", "2", "--kd-kl-type", "gaussian")
    run_train(*arguments)
    # Kill the second run once its step-2 checkpoint exists, then rerun the same command.
    arguments_b = distill_args(teacher_ckpt, interrupted, "--ckpt-every", "2", "--kd-kl-type", "gaussian")
    kill_after_checkpoint(arguments_b, interrupted / "checkpoints" / "0000002.pt")
    result = run_train(*arguments_b)
    assert "resumed from" in result.stdout
    a, b = load(newest(str(uninterrupted))), load(newest(str(interrupted)))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "projections"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"


def test_resume_with_other_options_is_refused(teacher_ckpt, tmp_path):
    run_train(*distill_args(teacher_ckpt, tmp_path, "--ckpt-every", "6"))
    result = run_train(*distill_args(teacher_ckpt, tmp_path, "--ckpt-every", "6", "--kd-temperature", "4"),
                       check=False)
    assert result.returncode != 0 and "--kd-temperature: 2.0 -> 4.0" in result.stderr


def test_truncated_newest_checkpoint_is_skipped_on_resume(teacher_ckpt, tmp_path):
    run_train("--model", "DiT-Digits-S", "--max-steps", "2", "--ckpt-every", "2", "--results-dir", str(tmp_path),
              *TINY)
    good = tmp_path / "checkpoints" / "0000002.pt"
    (tmp_path / "checkpoints" / "0000004.pt").write_bytes(good.read_bytes()[:1000])  # a half-written file
    result = run_train("--model", "DiT-Digits-S", "--max-steps", "4", "--ckpt-every", "2", "--results-dir",
                       str(tmp_path), *TINY)
    assert "skipping unreadable checkpoint" in result.stdout and "resumed from" in result.stdout
    assert load(tmp_path / "checkpoints" / "0000004.pt")["step"] == 4


def test_crash_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "0000002.pt"
    save_checkpoint_atomic({"step": 2, "w": torch.ones(3)}, str(path))

    def crashing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(models.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic({"step": 4, "w": torch.zeros(3)}, str(path))
    assert load(path)["step"] == 2 and os.listdir(tmp_path) == ["0000002.pt"]


def test_torchrun_two_processes_match_one(teacher_ckpt, tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    run_train(*distill_args(teacher_ckpt, single, "--ckpt-every", "6"))
    run_train("--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
              *distill_args(teacher_ckpt, double, "--ckpt-every", "6"), module="torch.distributed.run")
    a, b = load(newest(str(single))), load(newest(str(double)))
    assert b["args"]["global_batch_size"] == 16
    for name in a["model"]:
        # The same examples, noise and label drops; only the order of float reductions differs.
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_student_init_from_teacher_copies_chosen_blocks(teacher_ckpt, tmp_path):
    run_train(*distill_args(teacher_ckpt, tmp_path, "--student-init-from-teacher", "--warmup-steps", "0",
                            "--feature-steps", "0", "--joint-steps", "1", "--lr", "0", "--ckpt-every", "1"))
    student = load(newest(str(tmp_path)))["model"]
    teacher = load(teacher_ckpt)["ema"]
    indices = teacher_block_indices(2, 4)
    assert indices == [1, 3]
    for i, j in enumerate(indices):
        for key in [k for k in teacher if k.startswith(f"blocks.{j}.")]:
            assert torch.equal(student[key.replace(f"blocks.{j}.", f"blocks.{i}.", 1)], teacher[key]), key
    for key in [k for k in teacher if not k.startswith("blocks.")]:
        assert torch.equal(student[key], teacher[key]), key


def test_teacher_checkpoint_of_another_model_names_the_mismatch(teacher_ckpt, tmp_path):
    arguments = distill_args(teacher_ckpt, tmp_path)
    arguments[arguments.index("--teacher-model") + 1] = "DiT-Digits-T"
    result = run_train(*arguments, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "shape mismatches: pos_embed: checkpoint (1, 16, 64) vs model (1, 16, 128)" in result.stderr
    assert "unexpected keys: none" in result.stderr and "missing keys: blocks.4" in result.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # An absurd learning rate makes the weights overflow within a couple of steps.
    result = run_train("--model", "DiT-Digits-S", "--max-steps", "30", "--ckpt-every", "1", "--results-dir",
                       str(tmp_path), "--global-batch-size", "16", "--lr", "1e30", check=False)
    assert result.returncode != 0 and "non-finite loss or gradient" in result.stderr
    saved = sorted(os.listdir(tmp_path / "checkpoints"))
    assert len(saved) < 30 and f"The last good checkpoint is {tmp_path / 'checkpoints' / saved[-1]}" in result.stderr
    for name in saved:
        assert all(torch.isfinite(v).all() for v in load(tmp_path / "checkpoints" / name)["model"].values())


@pytest.mark.parametrize("arguments, message", [
    (["--distillation", "--teacher-model", "DiT-Digits-T"], "needs --teacher-model, --teacher-ckpt"),
    (["--model", "DiT-Digits-S"], "needs --max-steps"),
    (["--max-steps", "3"], "needs --model"),
    (["--model", "DiT-Digits-S", "--max-steps", "3", "--teacher-model", "DiT-Digits-T"], "need --distillation"),
    (["--model", "DiT-Digits-S", "--max-steps", "3", "--vae", "ema"], "not to the pixel-space digits"),
    (["--model", "DiT-Digits-S", "--max-steps", "3", "--data-path", "x", "--latents-path", "y"], "not allowed with"),
    (["--model", "DiT-Digits-S", "--max-steps", "3", "--no-such-flag"], "unrecognized arguments"),
    (["--model", "DiT-Digits-S", "--max-steps", "3", "--sample-every", "2", "--sample-sampler", "ddim",
      "--sample-steps", "999"], "cannot give exactly 999 steps"),
])
def test_impossible_flag_combinations_are_rejected(arguments, message, tmp_path):
    result = run_train(*arguments, "--results-dir", str(tmp_path), check=False)
    assert result.returncode == 2 and message in result.stderr


def test_distillation_flag_conflicts(teacher_ckpt, tmp_path):
    base = distill_args(teacher_ckpt, tmp_path)
    for extra, message in [(["--max-steps", "5"], "drop --max-steps"), (["--model", "DiT-Digits-S"], "--student-model"),
                           (["--kd-temperature", "0"], "--kd-temperature: 0 is not a finite number > 0")]:
        result = run_train(*base, *extra, check=False)
        assert result.returncode == 2 and message in result.stderr
    arguments = list(base)
    arguments[arguments.index("--student-model") + 1] = "DiT-Digits-T"
    result = run_train(*arguments, "--student-init-from-teacher", check=False)
    assert result.returncode == 2 and "teacher's width" in result.stderr


def write_image_folder(root, images_per_class=10, size=40):
    from PIL import Image
    generator = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        os.makedirs(root / label)
        for i in range(images_per_class):
            pixels = torch.randint(0, 256, (size, size + 8, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A randomly initialised AutoencoderKL that downsamples by 8 like the Stable Diffusion VAE."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return str(path)


def test_latent_training_from_image_folder_and_from_extracted_latents(tmp_path, tiny_vae):
    write_image_folder(tmp_path / "images")
    common = ["--model", "DiT-Digits-S", "--max-steps", "2", "--ckpt-every", "2", "--global-batch-size", "8",
              "--image-size", "32", "--num-workers", "0"]
    run_train(*common, "--data-path", str(tmp_path / "images"), "--vae", tiny_vae, "--sample-every", "2",
              "--results-dir", str(tmp_path / "folder"))
    checkpoint = load(tmp_path / "folder" / "checkpoints" / "0000002.pt")
    assert checkpoint["config"]["in_channels"] == 4 and checkpoint["config"]["input_size"] == 4
    assert checkpoint["config"]["num_classes"] == 2 and checkpoint["data"]["latent"] is True
    assert (tmp_path / "folder" / "samples" / "0000002.png").exists()  # decoded through the VAE

    subprocess.run([sys.executable, os.path.join(ROOT, "extract_latents.py"), "--data-path", str(tmp_path / "images"),
                    "--image-size", "32", "--vae", tiny_vae, "--out", str(tmp_path / "latents"), "--batch-size", "8",
                    "--num-workers", "0"], check=True, capture_output=True, cwd=ROOT)
    run_train(*[a for a in common if a not in ("--image-size", "32")], "--latents-path", str(tmp_path / "latents"),
              "--results-dir", str(tmp_path / "latent"))
    assert load(tmp_path / "latent" / "checkpoints" / "0000002.pt")["config"]["input_size"] == 4
