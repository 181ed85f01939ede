"""One-step students. DMD2: the distribution-matching gradient against its closed form, the fake score's stop-gradient,
the two time-scale schedule, zero GAN weight = DMD, backward simulation; adversarial distillation (ADD / LADD): its
terms, the frozen teacher as the discriminator's features; both through train.py and sample.py end to end (resume
after kill -9, 2 processes = 1, bad inputs)."""
import json
import os

import numpy as np
import pytest
import torch

import dmd2
import train
from models import DiT, model_config
from sampling import alpha_sigma, q_sample
from step_distill import backward_simulation, generator_grid, generator_x0
from test_convert_diffusers import convert, pipeline_images, sample_py_images
from test_step_distill import TINY, load, run_script
from test_train import kill_after_checkpoint, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL = dict(input_size=8, in_channels=1, num_classes=10)


def tiny_dit(seed, **overrides):
    torch.manual_seed(seed)
    model = DiT(**model_config("DiT-Digits-S", **PIXEL, **overrides))
    with torch.no_grad():  # adaLN-Zero starts at an identity map; random final layers make the outputs differ
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    results = tmp_path_factory.mktemp("teacher")
    run_script("train.py", "--model", "DiT-Digits-S", "--max-steps", 4, "--ckpt-every", 4, "--results-dir", results,
               *TINY)
    return str(results / "checkpoints" / "0000004.pt")


def dmd2_args(teacher_ckpt, results_dir, *extra):
    return ["--step-distillation", "dmd2", "--teacher-ckpt", teacher_ckpt, "--sampling-steps", 4, "--max-steps", 10,
            "--dmd2-generator-every", 5, "--dmd2-gan-generator-weight", 0.5, "--results-dir", results_dir, *TINY,
            *extra]


def build(teacher_ckpt, tmp_path, *extra):
    args = train.parse_args([str(a) for a in dmd2_args(teacher_ckpt, tmp_path, *extra)])
    data = dict(image_size=8, latent=False, vae=None, **PIXEL)
    return train.build_run(args, data, torch.device("cpu"), world_size=1), data


def test_distribution_matching_gradient_equals_its_closed_form():
    real, fake = tiny_dit(0), tiny_dit(1)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 8, 8, generator=generator).requires_grad_(True)
    noise = torch.randn(3, 1, 8, 8, generator=generator)
    y, t = torch.tensor([1, 4, 7]), torch.tensor([20, 500, 980])
    loss, grad = dmd2.distribution_matching_loss(real, fake, x, y, t, noise)
    # The closed form in float64: both scores' x_0 from their eps at x_t, then (x0_fake - x0_real) / mean|x - x0_real|.
    alpha, sigma = (v.double() for v in alpha_sigma(t))
    x64 = x.detach().double()
    x_t = alpha * x64 + sigma * noise.double()
    with torch.no_grad():
        eps_real = real(x_t.float(), t, y, force_drop_ids=torch.zeros_like(y))[:, :1].double()
        eps_fake = fake(x_t.float(), t, y, force_drop_ids=torch.zeros_like(y))[:, :1].double()
    real_x0, fake_x0 = (x_t - sigma * eps_real) / alpha, (x_t - sigma * eps_fake) / alpha
    expected = (fake_x0 - real_x0) / (x64 - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss.double(), 0.5 * (expected ** 2).mean(dim=(1, 2, 3)), rtol=1e-4, atol=1e-7)
    loss.mean().backward()  # the loss applies exactly grad to x (divided by the number of values averaged)
    torch.testing.assert_close(x.grad * x.numel(), grad, rtol=1e-5, atol=1e-6)


def test_backward_simulation_builds_the_input_from_the_generators_own_steps():
    generator_model = tiny_dit(3, learn_sigma=True)
    grid, steps = generator_grid(4)
    assert grid == [999, 749, 499, 249] and steps == (1, 2, 4)
    rng = torch.Generator().manual_seed(4)
    z, renoise = torch.randn(4, 1, 8, 8, generator=rng), torch.randn(4, 3, 1, 8, 8, generator=rng)
    index, y = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    x_t, t = backward_simulation(generator_model, z, renoise, index, grid, y, clip=True)
    assert t.tolist() == grid
    for i in range(4):  # the same steps one example at a time, written out
        x = z[i:i + 1]
        for j in range(i):
            x0 = generator_x0(generator_model, x, torch.tensor([grid[j]]), y[i:i + 1]).clamp(-1, 1)
            x = q_sample(x0, torch.tensor([grid[j + 1]]), renoise[i:i + 1, j])
        torch.testing.assert_close(x_t[i:i + 1], x, rtol=1e-5, atol=1e-6)
    assert torch.equal(x_t[0], z[0])  # grid point 0 is pure noise


def test_fake_score_loss_sends_no_gradient_to_the_generator(teacher_ckpt, tmp_path):
    run, data = build(teacher_ckpt, tmp_path)
    method = run.method
    fake_update = next(u for u in run.updates if u.name == "fake_score")
    draws = train.step_draws(method, run.args, data, 0, 0, 1, torch.device("cpu"))
    x0, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10
    loss, terms = method.loss(fake_update, run.called, x0, y, draws, run.autocast)
    loss.mean().backward()
    assert all(p.grad is None for p in method.student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.trainable["fake_score"].parameters())
    # It is DiT's eps MSE at the noised, detached generator sample.
    with torch.no_grad():
        x = method.generate(method.student, draws, y, with_grad=False)
        x_t = q_sample(x, draws["t_fake"], draws["noise_fake"])
        eps = method.trainable["fake_score"](x_t, draws["t_fake"], y, force_drop_ids=torch.zeros_like(y))[:, :1]
    torch.testing.assert_close(terms["fake_denoising"], ((eps - draws["noise_fake"]) ** 2).mean(dim=(1, 2, 3)))


def test_update_schedule_and_zero_gan_weight_is_dmd(teacher_ckpt, tmp_path):
    run, data = build(teacher_ckpt, tmp_path / "gan0", "--dmd2-gan-generator-weight", 0,
                      "--dmd2-gan-discriminator-weight", 0)
    head = {k: v.clone() for k, v in run.method.trainable["discriminator"].state_dict().items()}
    generator_steps = []
    for step in range(10):
        draws = train.step_draws(run.method, run.args, data, step, 0, 1, torch.device("cpu"))
        values = train.train_step(run, step, torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10, draws)
        if "dm" in values:
            generator_steps.append(step)
            assert "gan_generator" not in values and torch.equal(values["total"], values["dm"])  # DMD alone
    assert generator_steps == [0, 5]  # the generator at every 5th iteration, the fake score at every one
    for name, count in (("student", 2), ("fake_score", 10)):  # each AdamW stepped as often as its update ran
        opt = run.optimizers[name]
        assert opt.state[opt.param_groups[0]["params"][0]]["step"] == count, name
    for key, value in run.method.trainable["discriminator"].state_dict().items():
        assert torch.equal(value, head[key]), key  # weight 0: the GAN head never moves


def test_dmd2_trains_resumes_exactly_in_two_processes_and_samples_its_grid(teacher_ckpt, tmp_path):
    one, killed, two = tmp_path / "one", tmp_path / "killed", tmp_path / "two"
    run_script("train.py", *dmd2_args(teacher_ckpt, one, "--ckpt-every", 5))
    a = load(one / "checkpoints" / "0000010.pt")
    assert a["sampling"] == {"method": "dmd2", "parametrisation": "x-eps", "sampler": "consistency",
                             "steps": [1, 2, 4], "default_steps": 4, "guidance_range": None, "consistency_skip": 1}
    assert {"model", "fake_score", "discriminator", "opt", "opt_fake_score"} <= set(a)
    kill_after_checkpoint(dmd2_args(teacher_ckpt, killed, "--ckpt-every", 5), killed / "checkpoints" / "0000005.pt")
    assert "resumed from" in run_script("train.py", *dmd2_args(teacher_ckpt, killed, "--ckpt-every", 5)).stdout
    b = load(killed / "checkpoints" / "0000010.pt")
    for key in ("model", "ema", "fake_score", "discriminator"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
    run_train("--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
              *map(str, dmd2_args(teacher_ckpt, two, "--ckpt-every", 5)), module="torch.distributed.run")
    c = load(two / "checkpoints" / "0000010.pt")
    for key in ("model", "fake_score", "discriminator"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], c[key][name], rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    # sample.py with no flags: 4 steps of the consistency sampler; 1 and 2 lie on the grid, 3 does not.
    ckpt = one / "checkpoints" / "0000010.pt"
    for steps in (1, 2):
        run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / f"{steps}.png", "--num-samples", 4,
                   "--num-sampling-steps", steps)
    result = run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "3.png", "--num-sampling-steps", 3,
                        check=False)
    assert result.returncode == 1 and "samples in 1, 2, 4 steps, not 3" in result.stderr
    # export.py (calibrated at its grid) and run_exported.py, and a DiTPipeline folder: its own sampler, no flag
    run_script("export.py", "--ckpt", ckpt, "--format", "torchscript", "--out", tmp_path / "g.ts")
    metadata = json.loads((tmp_path / "g.ts.json").read_text())
    assert metadata["sampling"]["sampler"] == "consistency" and metadata["sampling"]["steps"] == [1, 2, 4]
    run_script("run_exported.py", tmp_path / "g.ts", "--num-samples", 4, "--out", tmp_path / "e.npz")
    assert np.load(tmp_path / "e.npz")["arr_0"].shape == (4, 8, 8, 1)
    convert("--to-diffusers", "--pipeline", "--ckpt", ckpt, "--out", tmp_path / "pipe")
    labels = [1, 2, 3]
    for steps in (1, 4):
        torch.testing.assert_close(pipeline_images(tmp_path / "pipe", labels, 0, steps),
                                   sample_py_images(str(ckpt), labels, 0, steps), rtol=1e-4, atol=1e-4)


def test_dmd2_bad_inputs_fail_clearly(teacher_ckpt, tmp_path):
    cases = [(["--dmd2-generator-every", 0], 2, "argument --dmd2-generator-every: 0 is not an integer >= 1"),
             (["--sampling-steps", 3], 1, "must be a power of two"),
             (["--dmd2-real-guidance", 0.5], 2, "argument --dmd2-real-guidance: 0.5 is not a finite number >= 1"),
             (["--consistency-skip", 50], 2, "--consistency-skip do(es) not apply to --step-distillation dmd2")]
    no_null = tmp_path / "no_null.pt"  # a teacher trained without label dropout: no null label to guide against
    config = model_config("DiT-Digits-S", **PIXEL, class_dropout_prob=0.0)
    torch.save({"ema": DiT(**config).state_dict(), "config": config,
                "data": {"image_size": 8, "latent": False, "vae": None}}, no_null)
    for extra, code, message in cases:
        result = run_script("train.py", *dmd2_args(teacher_ckpt, tmp_path / "r", *extra), check=False)
        assert result.returncode == code and message in result.stderr, (message, result.stderr[-1500:])
    result = run_script("train.py", *dmd2_args(str(no_null), tmp_path / "n", "--dmd2-real-guidance", 1.5),
                        check=False)
    assert result.returncode == 1 and "no null label" in result.stderr and "Traceback" not in result.stderr
    # an x-eps few-step student is not a diffusion model: it cannot be the real score
    run_script("train.py", "--step-distillation", "consistency", "--teacher-ckpt", teacher_ckpt, "--max-steps", 1,
               "--sampling-steps", 2, "--results-dir", tmp_path / "cd", *TINY)
    result = run_script("train.py", *dmd2_args(str(tmp_path / "cd" / "checkpoints" / "0000001.pt"), tmp_path / "x"),
                        check=False)
    assert result.returncode == 1 and "needs a diffusion model as its real score" in result.stderr


def test_generator_init_warm_starts_the_generator_alone(teacher_ckpt, tmp_path):
    """--generator-init: the generator (and its EMA) start from a consistency student of the teacher; the fake score
    still starts from the teacher; a model that is not such a student is refused with the reason."""
    from models import load_dit_checkpoint
    run_script("train.py", "--step-distillation", "consistency", "--teacher-ckpt", teacher_ckpt, "--max-steps", 2,
               "--sampling-steps", 2, "--results-dir", tmp_path / "cd", *TINY)
    init = str(tmp_path / "cd" / "checkpoints" / "0000002.pt")
    run, _ = build(teacher_ckpt, tmp_path / "w", "--generator-init", init)
    warm, _ = load_dit_checkpoint(init)
    teacher, _ = load_dit_checkpoint(teacher_ckpt)
    for name, tensor in warm.state_dict().items():
        torch.testing.assert_close(run.method.student.state_dict()[name], tensor, rtol=0, atol=0)
        torch.testing.assert_close(run.ema.state_dict()[name], tensor, rtol=0, atol=0)
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(run.method.trainable["fake_score"].state_dict()[name], tensor, rtol=0, atol=0)
    cold, _ = build(teacher_ckpt, tmp_path / "c")
    assert not torch.equal(cold.method.student.final_layer.linear.weight, run.method.student.final_layer.linear.weight)
    # refused: the eps teacher itself, a guided student, another architecture
    run_script("train.py", "--step-distillation", "consistency", "--teacher-ckpt", teacher_ckpt, "--max-steps", 1,
               "--sampling-steps", 2, "--guidance-range", 1, 2, "--results-dir", tmp_path / "g", *TINY)
    wide = tmp_path / "wide.pt"
    config = model_config("DiT-Digits-S", **PIXEL, depth=2)
    torch.save({"ema": DiT(**dict(config, learn_sigma=True)).state_dict(), "config": dict(config, learn_sigma=True),
                "data": {"image_size": 8, "latent": False, "vae": None},
                "sampling": torch.load(init, map_location="cpu", weights_only=True)["sampling"]}, wide)
    for path, message in ((teacher_ckpt, "predicting eps; give a few-step x-eps student"),
                          (tmp_path / "g" / "checkpoints" / "0000001.pt", "with a w input"),
                          (wide, "is not of the teacher's architecture (it differs in depth)")):
        result = run_script("train.py", *dmd2_args(teacher_ckpt, tmp_path / "bad", "--generator-init", path),
                            check=False)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, \
            (message, result.stderr[-1500:])
    result = run_script("train.py", "--step-distillation", "consistency", "--teacher-ckpt", teacher_ckpt,
                        "--max-steps", 1, "--generator-init", init, "--results-dir", tmp_path / "x", *TINY,
                        check=False)
    assert result.returncode == 2 and "--generator-init" in result.stderr


def adversarial_args(teacher_ckpt, results_dir, *extra):
    return ["--step-distillation", "adversarial", "--teacher-ckpt", teacher_ckpt, "--sampling-steps", 2,
            "--max-steps", 6, "--adversarial-levels", 2, "--results-dir", results_dir, *TINY, *extra]


def test_adversarial_trains_resumes_exactly_in_two_processes_and_samples_its_grid(teacher_ckpt, tmp_path):
    one, killed, two = tmp_path / "one", tmp_path / "killed", tmp_path / "two"
    run_script("train.py", *adversarial_args(teacher_ckpt, one, "--ckpt-every", 3))
    a = load(one / "checkpoints" / "0000006.pt")
    assert a["sampling"]["method"] == "adversarial" and a["sampling"]["steps"] == [1, 2]
    assert a["opt"]["state"][0]["step"].item() == 6 and a["opt_discriminator"]["state"][0]["step"].item() == 6
    assert set(a["discriminator"]) >= {"heads.0.net.1.weight", "heads.1.net.3.bias"}
    assert a["discriminator"]["heads.0.net.3.weight"].abs().sum() > 0  # the heads learned (they start at zero)
    kill_after_checkpoint(adversarial_args(teacher_ckpt, killed, "--ckpt-every", 3),
                          killed / "checkpoints" / "0000003.pt")
    assert "resumed from" in run_script("train.py", *adversarial_args(teacher_ckpt, killed, "--ckpt-every", 3)).stdout
    b = load(killed / "checkpoints" / "0000006.pt")
    run_train("--standalone", "--nproc_per_node=2", os.path.join(ROOT, "train.py"),
              *map(str, adversarial_args(teacher_ckpt, two, "--ckpt-every", 3)), module="torch.distributed.run")
    c = load(two / "checkpoints" / "0000006.pt")
    for key in ("model", "ema", "discriminator"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
            if key != "ema":
                torch.testing.assert_close(a[key][name], c[key][name], rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
    run_script("sample.py", "--ckpt", one / "checkpoints" / "0000006.pt", "--out", tmp_path / "g.png",
               "--num-samples", 4, "--num-sampling-steps", 1)


def test_adversarial_terms_and_frozen_teacher(teacher_ckpt, tmp_path):
    args = train.parse_args([str(a) for a in adversarial_args(teacher_ckpt, tmp_path, "--adversarial-distill-weight",
                                                              0)])
    data = dict(image_size=8, latent=False, vae=None, **PIXEL)
    run = train.build_run(args, data, torch.device("cpu"), world_size=1)
    teacher = {k: v.clone() for k, v in run.method.teacher.state_dict().items()}
    for step in range(2):
        draws = train.step_draws(run.method, args, data, step, 0, 1, torch.device("cpu"))
        values = train.train_step(run, step, torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10, draws)
        assert "distill" not in values and "adversarial" in values  # weight 0: LADD's adversarial loss alone
    assert all(torch.equal(v, teacher[k]) for k, v in run.method.teacher.state_dict().items())
    assert all(p.grad is None for p in run.method.teacher.parameters())
    result = run_script("train.py", *adversarial_args(teacher_ckpt, tmp_path / "l", "--adversarial-levels", 9),
                        check=False)
    assert result.returncode == 1 and "the teacher has 4 blocks" in result.stderr
