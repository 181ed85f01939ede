"""Rectified flow: the straight path against DDIM, the pair writer's folder, reflow and InstaFlow end to end."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

import rectified_flow as rf
import sampling
from checks import lock_folder
from models import load_dit_checkpoint
from test_step_distill import PIXEL, TINY, load, random_dit, run_script
from test_train import kill_after_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ddim_grid(num_steps):
    """The straight-path times s(t_i) of DDIM's trailing timesteps, then 1 (the clean end)."""
    return [float(sampling._FLOW_S[t + 1]) for t in sampling.trailing_timesteps(num_steps)] + [1.0]


#################################################################################
#                     The straight path, the velocity, the loss                 #
#################################################################################

def test_the_time_map_is_exact_on_dits_timesteps_and_between_them():
    t = torch.tensor([0, 1, 250, 998, 999])
    alpha, sigma = sampling.alpha_sigma(t)
    s = (alpha / (alpha + sigma)).flatten().double()
    assert torch.allclose(sampling.flow_timestep(s), t.double(), atol=1e-3)
    middle = (s[1:3] + s[:2]) / 2  # between timesteps: between them
    assert ((sampling.flow_timestep(middle) > t[:2]) & (sampling.flow_timestep(middle) < t[1:3])).all()
    assert sampling.flow_timestep(torch.tensor([0.0, 1.0])).tolist() == [999.0, 0.0]  # clamped to DiT's range


@pytest.mark.parametrize("parametrisation, steps", [("eps", 1), ("eps", 4), ("eps", 250), ("x-eps", 3)])
def test_euler_on_ddims_grid_is_ddim(parametrisation, steps):
    """v = x_0 - eps, so Euler on the straight path from the teacher's x_999 (scaled by 1 / (alpha + sigma)) over
    the s of DDIM's timesteps is DDIM: the teacher's ODE sample, exactly (float32 rounding)."""
    model = random_dit(1, learn_sigma=True)
    noise, y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(3)
    alpha, sigma = sampling.alpha_sigma(torch.tensor([999]))
    euler = sampling.flow_euler_sample(model, parametrisation, noise / (alpha + sigma), y, steps,
                                       grid=ddim_grid(steps))
    ddim = sampling.ddim_trailing_sample(model, parametrisation, noise, y, steps)
    torch.testing.assert_close(euler, ddim, rtol=1e-5, atol=1e-5 * ddim.abs().max().item())


def test_reflow_target_is_x_minus_z_on_the_pairs(tmp_path):
    """The loss by hand in float64: the straight point, the velocity, (x - z) as the target."""
    model = random_dit(2)
    generator = torch.Generator().manual_seed(1)
    z, x = torch.randn(4, 1, 8, 8, generator=generator), torch.rand(4, 1, 8, 8, generator=generator) * 2 - 1
    y, s = torch.arange(4), torch.tensor([0.0, 0.3, 0.7, 0.95], dtype=torch.float64)
    loss = rf.reflow_loss(model, "eps", z, x, y, s)
    x_s = (s.view(-1, 1, 1, 1) * x.double() + (1 - s.view(-1, 1, 1, 1)) * z.double()).float()
    v = sampling.velocity(model, "eps", x_s, s, y)
    by_hand = ((x.double() - z.double() - v.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss.double(), by_hand, rtol=1e-5, atol=1e-6)
    c = rf.PSEUDO_HUBER_C * 8  # sqrt(64 values)
    assert rf.pseudo_huber(x, x).abs().max() < 1e-6
    torch.testing.assert_close(rf.pseudo_huber(x, z), (((x - z) ** 2).sum(dim=(1, 2, 3)) + c ** 2).sqrt() - c)


def test_straightness_is_zero_for_a_straight_flow_and_the_variance_of_v():
    velocities = [torch.full((2, 1, 8, 8), 0.5), torch.full((2, 1, 8, 8), 1.5)]
    mean = sum(velocities) / 2
    expected = float(sum(((mean - v) ** 2).mean() for v in velocities) / 2)  # Def. 2.2 by hand: 0.25
    stacked = torch.stack(velocities)
    assert expected == pytest.approx(float((stacked ** 2).mean() - (stacked.mean(0) ** 2).mean()))
    model = random_dit(3)
    assert rf.straightness(model, "eps", torch.randn(2, 1, 8, 8), torch.arange(2), num_steps=4) > 0


def test_numpy_flow_euler_equals_the_torch_sampler():
    import run_exported
    metadata = {"diffusion": {"schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02}}
    alpha_bar = np.concatenate([[1.0], run_exported.alphas_cumprod(metadata)])
    noise = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    y = np.arange(3).astype(np.int32)
    for parametrisation in ("eps", "x-eps"):
        model = random_dit(4, learn_sigma=True)

        def denoise(x, t, labels):
            with torch.no_grad():
                return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(labels).long()).numpy()
        for steps in (1, 3, 8):
            ours = run_exported.flow_euler_sample(denoise, noise.astype(np.float64), y, alpha_bar, parametrisation,
                                                  True, steps)
            reference = sampling.flow_euler_sample(model, parametrisation, torch.from_numpy(noise),
                                                   torch.from_numpy(y).long(), steps, clip=True)
            np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-4, atol=1e-4)
        assert sampling.SAMPLERS["flow-euler"].timesteps(3, None) == pytest.approx(
            [float(t) for t in sampling.flow_timestep(torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64))])


#################################################################################
#                  The pair writer, reflow and InstaFlow end to end             #
#################################################################################

@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny eps teachers (4 steps, different seeds)."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (0, 1):
        run_script("train.py", "--model", "DiT-Digits-S", "--max-steps", 4, "--ckpt-every", 4, "--seed", seed,
                   "--results-dir", folder / str(seed), *TINY)
        paths.append(str(folder / str(seed) / "checkpoints" / "0000004.pt"))
    return paths


def pair_args(ckpt, out, *extra):
    return ["--ckpt", ckpt, "--out", out, "--num-pairs", 40, "--chunk-size", 10, "--batch-size", 10, "--sampler",
            "ddim-trailing", "--num-sampling-steps", 2, *extra]


@pytest.fixture(scope="module")
def pairs(teachers, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs") / "teacher"
    result = run_script("reflow_pairs.py", *pair_args(teachers[0], folder))
    assert "ms per pair (2 forwards)" in result.stdout
    return folder


def test_pair_folder_names_its_teacher_and_holds_its_ode_samples(pairs, teachers):
    from checks import file_sha256
    meta = json.load(open(pairs / "meta.json"))
    assert meta["teacher"]["sha256"] == file_sha256(teachers[0]) and meta["teacher"]["step"] == 4
    assert meta["settings"]["sampler"] == "ddim-trailing" and meta["num_chunks"] == 4
    loaded = rf.load_pairs(str(pairs), teachers[0])
    assert loaded["z"].shape == (40, 1, 8, 8) and loaded["y"].tolist() == [i % 10 for i in range(40)]
    teacher, _ = load_dit_checkpoint(teachers[0])
    x = sampling.ddim_trailing_sample(teacher, "eps", loaded["z"][10:20], loaded["y"][10:20], 2, clip=True)
    torch.testing.assert_close(x, loaded["x"][10:20], rtol=1e-4, atol=1e-4)
    assert rf.pair_cost(str(pairs))["forwards_per_pair"] == 2


def test_pair_writer_resumes_after_a_kill_and_refuses_a_busy_folder(pairs, teachers, tmp_path):
    folder = tmp_path / "resumed"
    kill_after_checkpoint(pair_args(teachers[0], folder), folder / "pairs_00000.npz",
                          script=os.path.join(ROOT, "reflow_pairs.py"))
    result = run_script("reflow_pairs.py", *pair_args(teachers[0], folder))
    assert "already in" in result.stdout and not result.stdout.startswith("0 of")
    for k in range(4):
        a, b = np.load(pairs / f"pairs_{k:05d}.npz"), np.load(folder / f"pairs_{k:05d}.npz")
        assert all(np.array_equal(a[key], b[key]) for key in ("z", "x", "y")), k
    with lock_folder(str(folder), "--out"):
        busy = run_script("reflow_pairs.py", *pair_args(teachers[0], folder), check=False)
    assert busy.returncode == 1 and "in use by" in busy.stderr and "Traceback" not in busy.stderr
    moved = tmp_path / "moved.pt"
    shutil.copyfile(teachers[0], moved)  # the same teacher elsewhere: its pairs are found finished, not refused
    assert "already in" in run_script("reflow_pairs.py", *pair_args(str(moved), folder)).stdout
    other = run_script("reflow_pairs.py", *pair_args(teachers[1], folder), check=False)
    assert other.returncode == 1 and "pairs of another teacher or settings" in other.stderr
    stochastic = run_script("reflow_pairs.py", *pair_args(teachers[0], tmp_path / "s")[:-4], "--sampler", "ddpm",
                            check=False)
    assert stochastic.returncode == 2 and "invalid choice: 'ddpm'" in stochastic.stderr


def reflow_args(family, teacher, pair_folder, results_dir, *extra):
    return ["--step-distillation", family, "--teacher-ckpt", teacher, "--reflow-pairs", pair_folder, "--max-steps", 6,
            "--ckpt-every", 2, "--results-dir", results_dir, *TINY, *extra]


def resumes_exactly(family, teacher, pair_folder, tmp_path):
    """Train 6 steps uninterrupted and killed after step 2 then rerun: the same weights. Returns the checkpoint."""
    a, b = tmp_path / f"{family}_a", tmp_path / f"{family}_b"
    run_script("train.py", *reflow_args(family, teacher, pair_folder, a, "--sample-every", 6))
    kill_after_checkpoint(reflow_args(family, teacher, pair_folder, b, "--sample-every", 6),
                          b / "checkpoints" / "0000002.pt")
    assert "resumed from" in run_script("train.py", *reflow_args(family, teacher, pair_folder, b, "--sample-every",
                                                                 6)).stdout
    first, second = load(a / "checkpoints" / "0000006.pt"), load(b / "checkpoints" / "0000006.pt")
    for key in ("model", "ema"):
        for name in first[key]:
            assert torch.equal(first[key][name], second[key][name]), f"{key}.{name} differs after resuming"
    assert os.listdir(a / "tensorboard") and (a / "samples" / "0000006.png").exists()
    assert f"[{family}] " in open(a / "log.txt").read()
    return str(a / "checkpoints" / "0000006.pt")


@pytest.fixture(scope="module")
def reflowed(teachers, pairs, tmp_path_factory):
    return resumes_exactly("reflow", teachers[0], pairs, tmp_path_factory.mktemp("reflow"))


def test_the_initial_reflow_student_is_its_teacher(teachers, pairs):
    import train
    args = train.parse_args([str(a) for a in reflow_args("reflow", teachers[0], pairs, "unused")])
    method = train.METHODS["reflow"](args, dict(PIXEL, image_size=8, latent=False, vae=None), torch.device("cpu"))
    teacher, _ = load_dit_checkpoint(teachers[0])
    assert method.parametrisation == "eps" and "teacher" not in method.frozen
    student = method.student.eval()
    for name, value in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name
    noise, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)), torch.arange(4)
    alpha, sigma = sampling.alpha_sigma(torch.tensor([999]))
    euler = sampling.flow_euler_sample(student, "eps", noise / (alpha + sigma), y, 200, grid=ddim_grid(200))
    ddim = sampling.ddim_trailing_sample(teacher, "eps", noise, y, 200)
    torch.testing.assert_close(euler, ddim, rtol=1e-5, atol=1e-5 * ddim.abs().max().item())


def test_reflow_resumes_exactly_and_samples_with_euler_with_no_flags(reflowed, tmp_path):
    import export
    entry = load(reflowed)["sampling"]
    assert (entry["method"], entry["parametrisation"], entry["sampler"], entry["steps"], entry["default_steps"]) == \
        ("reflow", "eps", "flow-euler", None, 4)
    assert export.sampler_timesteps(entry, 50) == sampling.flow_timesteps(4)  # INT8 calibration's timesteps
    run_script("sample.py", "--ckpt", reflowed, "--out", tmp_path / "g.png", "--npz", tmp_path / "s.npz",
               "--num-samples", 10)
    model, data = load_dit_checkpoint(reflowed)
    assert sampling.resolve_sampling(data["sampling"], num_steps=7)[:2] == ("flow-euler", 7)  # any count


def test_instaflow_resumes_exactly_and_samples_in_one_step(reflowed, tmp_path):
    folder = tmp_path / "reflow_pairs"
    run_script("reflow_pairs.py", "--ckpt", reflowed, "--out", folder, "--num-pairs", 20, "--chunk-size", 10,
               "--num-sampling-steps", 2)
    assert json.load(open(folder / "meta.json"))["settings"]["sampler"] == "flow-euler"  # the reflowed model's own
    ckpt = resumes_exactly("instaflow", reflowed, folder, tmp_path)
    entry = load(ckpt)["sampling"]
    assert (entry["method"], entry["parametrisation"], entry["sampler"], entry["steps"]) == \
        ("instaflow", "x-eps", "flow-euler", [1])
    result = run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "g.png", "--num-sampling-steps", 2,
                        check=False)
    assert result.returncode == 1 and "samples in 1 steps, not 2" in result.stderr


def test_rectified_flow_bad_inputs_fail_clearly(teachers, pairs, reflowed, tmp_path, capsys):
    import train
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([str(a) for a in reflow_args("reflow", teachers[0], pairs, tmp_path / "a")[:4] +
                          ["--max-steps", 2]])
    assert exit_info.value.code == 2 and "pass --reflow-pairs FOLDER" in capsys.readouterr().err
    cases = [
        (reflow_args("reflow", teachers[0], tmp_path / "nothing", tmp_path / "b"),
         "not a pair folder (no meta.json) - write the teacher's pairs first: python reflow_pairs.py"),
        (reflow_args("reflow", teachers[1], pairs, tmp_path / "c"),
         f"its pairs were made by teacher {os.path.abspath(teachers[0])}"),
        (reflow_args("instaflow", teachers[0], pairs, tmp_path / "d"),
         "--step-distillation instaflow distils a velocity model"),
    ]
    unfinished = tmp_path / "unfinished"
    shutil.copytree(pairs, unfinished)
    os.remove(unfinished / "pairs_00002.npz")
    cases.append((reflow_args("reflow", teachers[0], unfinished, tmp_path / "e"),
                  "unfinished, 1 of 4 chunks missing - rerun its reflow_pairs.py command"))
    for argv, message in cases:
        result = run_script("train.py", *argv, check=False)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, \
            (message, result.stderr[-2000:])
