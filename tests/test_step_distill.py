"""Step distillation: the methods' math against hand computations, the samplers, and train.py / sample.py end to end."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sample
import sampling
import step_distill as sd
from models import DiT_models, load_dit_checkpoint
from test_train import kill_after_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL = dict(input_size=8, in_channels=1, num_classes=10)
TINY = ["--global-batch-size", "16", "--log-every", "2", "--lr", "1e-3", "--ema-decay", "0.9"]


def random_dit(seed=0, **overrides):
    """A tiny DiT with every weight random (adaLN-Zero would make its output 0)."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-Digits-S"](**dict(PIXEL, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.normal_(0, 0.1)
    return model.eval()


def alpha_bar_float64():
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # DiT's linear schedule


def run_script(script, *args, check=True):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


#################################################################################
#                               The methods' math                               #
#################################################################################

def test_trailing_grids_start_at_the_last_timestep_and_nest():
    assert sampling.trailing_timesteps(1) == [999]
    assert sampling.trailing_timesteps(2) == [999, 499]
    assert sampling.trailing_timesteps(4) == [999, 749, 499, 249]
    assert sampling.trailing_timesteps(4, stride=20) == [999, 759, 499, 259]
    for steps in (2, 4, 8, 16, 32, 64):
        assert sampling.trailing_timesteps(steps)[::2] == sampling.trailing_timesteps(steps // 2)  # progressive rounds nest
    with pytest.raises(ValueError, match="cannot place"):
        sampling.trailing_timesteps(51, stride=20)


def test_progressive_target_is_two_teacher_ddim_steps_by_hand():
    teacher = random_dit()
    torch.manual_seed(1)
    x_t = torch.randn(3, 1, 8, 8)
    y = torch.tensor([0, 3, 7])
    t, t_mid, t_next = torch.tensor([999, 499, 124]), torch.tensor([749, 249, 62]), torch.tensor([499, -1, 0])
    target = sd.progressive_target(teacher, "eps", x_t, t, t_mid, t_next, y)

    # By hand, in float64: DDIM x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s) eps, with x0 = (x - sqrt(1 - ab) eps) / sqrt(ab).
    alpha_bar = np.concatenate([[1.0], alpha_bar_float64()])  # index t + 1; t = -1 is clean

    def eps_of(x, times):
        with torch.no_grad():
            return teacher(x.float(), times, y)[:, :1].double()

    def ddim(x, times, to):
        ab, ab_to = (torch.from_numpy(alpha_bar[(v + 1).numpy()]).view(-1, 1, 1, 1) for v in (times, to))
        eps = eps_of(x, times)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ab_to.sqrt() * x0 + (1 - ab_to).sqrt() * eps

    x_next = ddim(ddim(x_t.double(), t, t_mid), t_mid, t_next)
    ab_t, ab_next = (torch.from_numpy(alpha_bar[(v + 1).numpy()]).view(-1, 1, 1, 1) for v in (t, t_next))
    ratio = (1 - ab_next).sqrt() / (1 - ab_t).sqrt()
    expected = (x_next - ratio * x_t.double()) / (ab_next.sqrt() - ratio * ab_t.sqrt())
    torch.testing.assert_close(target.double(), expected, rtol=1e-4, atol=1e-4)
    # and one student DDIM step from x_t with that x_0 lands where the teacher's two steps did
    alpha, sigma = sampling.alpha_sigma(t)
    one_step = sampling.ddim_step(target, (x_t - alpha * target) / sigma, t_next)
    torch.testing.assert_close(one_step.double(), x_next, rtol=1e-4, atol=1e-4)


def test_eps_sampler_on_a_shared_grid_matches_the_projects_ddim():
    """ddim-trailing on an eps model equals create_diffusion's DDIM where the two grids coincide (leading "ddim4"
    is 0, 250, 500, 750; trailing 4 is 999, 749, 499, 249: compare one step t -> s on both)."""
    from diffusion import create_diffusion
    model = random_dit(2)
    torch.manual_seed(3)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    diffusion = create_diffusion("ddim4")  # timesteps 0, 250, 500, 750
    out = diffusion.ddim_sample(model, x, torch.tensor([3, 3]), model_kwargs=dict(y=y), clip_denoised=True)
    x0, eps = sampling.denoise(model, "eps", x, torch.tensor([750, 750]), y, clip=True)
    torch.testing.assert_close(sampling.ddim_step(x0, eps, torch.tensor([500, 500])), out["sample"], rtol=1e-5, atol=1e-5)


def test_consistency_function_is_the_identity_at_the_smallest_t():
    student = sd.make_student(random_dit(), "eps", "x-eps", guidance=False).eval()
    with torch.no_grad():
        for p in student.final_layer.parameters():
            p.normal_(0, 0.1)  # x~ no longer zero: the model's x_0 differs from x_t
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        at_zero = sampling.consistency_function(student, x, torch.zeros(4, dtype=torch.long), y)
        at_later = sampling.consistency_function(student, x, torch.full((4,), 19), y)
    assert torch.equal(at_zero, x)
    assert (at_later - x).abs().max() > 1e-2


def test_trajectory_consistency_function_is_the_identity_at_s_t_and_the_consistency_function_at_s_0():
    """TCD's TCF at s = t returns x_t and at the clean end (s = -1 here: alpha 1, sigma 0, the paper's s = 0) the
    consistency function, exactly; in between it is DDIM's alpha_s x_0 + sigma_s eps(x_t, x_0) with x_0 = f."""
    student = sd.make_student(random_dit(), "eps", "x-eps", guidance=False).eval()
    with torch.no_grad():
        for p in student.final_layer.parameters():
            p.normal_(0, 0.1)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    t = torch.tensor([999, 519, 19, 0])
    with torch.no_grad():
        f = sampling.consistency_function(student, x, t, y)
        assert torch.equal(sampling.trajectory_consistency_function(student, x, t, t, y), x)
        assert torch.equal(sampling.trajectory_consistency_function(student, x, t, torch.full_like(t, -1), y), f)
        s = torch.tensor([500, 259, 0, 0])
        alpha_t, sigma_t = sampling.alpha_sigma(t)
        alpha_s, sigma_s = sampling.alpha_sigma(s)
        ddim_form = alpha_s * f + sigma_s * (x - alpha_t * f) / sigma_t
        torch.testing.assert_close(sampling.trajectory_consistency_function(student, x, t, s, y), ddim_form,
                                   rtol=1e-5, atol=1e-5)
    assert (f - x).abs().max() > 1e-2


def test_tcd_loss_is_the_consistency_loss_at_the_clean_end_and_matches_the_teachers_step_at_t_n():
    teacher, target = random_dit(0), sd.make_student(random_dit(1), "eps", "x-eps", guidance=False).eval()
    student = sd.make_student(random_dit(2), "eps", "x-eps", guidance=False).eval()
    for model in (student, target):
        with torch.no_grad():
            for p in model.final_layer.parameters():
                p.normal_(0, 0.1)
    torch.manual_seed(4)
    x0, noise, y = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    index, skip = torch.tensor([0, 3, 20, 49]), 20
    with torch.no_grad():
        consistency = sd.consistency_loss(student, target, teacher, "eps", x0, y, noise, index, skip)
        at_clean_end = sd.trajectory_consistency_loss(student, target, teacher, "eps", x0, y, noise, index,
                                                      torch.zeros_like(index), skip)
        assert torch.equal(at_clean_end, consistency)
        # s = t_n (every point but the first, whose t_n = 0): the target is the teacher's DDIM point itself
        x_t, t, x_n, t_n = sd.teacher_ode_step(teacher, "eps", x0, y, noise, index, skip)
        at_t_n = sd.trajectory_consistency_loss(student, target, teacher, "eps", x0, y, noise, index, index, skip)
        online = sampling.trajectory_consistency_function(student, x_t, t, t_n, y)
        torch.testing.assert_close(at_t_n[1:], ((online - x_n) ** 2).mean(dim=(1, 2, 3))[1:])
        assert (at_t_n[1:] - consistency[1:]).abs().min() > 0


def test_zero_initialised_w_embedding_leaves_the_model_unchanged():
    teacher = random_dit()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 3])
    student = sd.make_student(teacher, "eps", "eps", guidance=True).eval()
    assert student.w_embedder is not None and teacher.w_embedder is None
    with torch.no_grad():
        reference = teacher(x, t, y)
        for w in (1.0, 2.5, 4.0):
            assert torch.equal(student(x, t, y, w=torch.full((3,), w)), reference)
    with pytest.raises(ValueError, match="needs the guidance scale"):
        student(x, t, y)
    with pytest.raises(ValueError, match="takes no w"):
        teacher(x, t, y, w=torch.ones(3))


def test_x_eps_student_starts_from_the_teachers_eps():
    """Converted x-eps student: the eps channels are the teacher's, x~ is zero, so x_0 = alpha^2 x_0(eps)."""
    teacher = random_dit(learn_sigma=False)
    student = sd.make_student(teacher, "eps", "x-eps", guidance=False).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5, 500, 999]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        out = student(x, t, y)
        assert torch.equal(out[:, :1], teacher(x, t, y)) and torch.equal(out[:, 1:], torch.zeros_like(out[:, 1:]))
        x0_teacher, _ = sampling.denoise(teacher, "eps", x, t, y)
        x0_student, _ = sampling.denoise(student, "x-eps", x, t, y)
    alpha, _ = sampling.alpha_sigma(t)
    torch.testing.assert_close(x0_student, alpha ** 2 * x0_teacher, rtol=1e-4, atol=1e-5)


def test_guided_teacher_output_matches_forward_with_cfg():
    model = random_dit(4)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([4, 5])
    with torch.no_grad():
        guided = sampling.model_output(model, x, t, y, w=torch.full((2,), 3.0))
        null = torch.full_like(y, 10)
        reference = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0)[:2]
    torch.testing.assert_close(guided, reference, rtol=1e-5, atol=1e-6)


#################################################################################
#                         train.py and sample.py end to end                     #
#################################################################################

@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    results = tmp_path_factory.mktemp("teacher")
    run_script("train.py", "--model", "DiT-Digits-S", "--max-steps", 4, "--ckpt-every", 4, "--results-dir", results,
               *TINY)
    return str(results / "checkpoints" / "0000004.pt")


METHOD_ARGS = {
    "progressive": ["--progressive-start-steps", 8, "--sampling-steps", 2],
    "consistency": ["--sampling-steps", 2, "--consistency-skip", 100],
    "tcd": ["--sampling-steps", 2, "--consistency-skip", 100, "--tcd-gamma", 0.5],
    "guidance": ["--guidance-range", 1, 3],
}


def step_args(method, teacher_ckpt, results_dir, *extra):
    return ["--step-distillation", method, "--teacher-ckpt", teacher_ckpt, "--max-steps", 6,
            "--results-dir", results_dir, *METHOD_ARGS[method], *TINY, *extra]


@pytest.fixture(scope="module")
def students(teacher_ckpt, tmp_path_factory):
    """One 6-step run of each method, shared by the tests that only read the result: {method: checkpoint path}."""
    folder = tmp_path_factory.mktemp("students")
    for method in METHOD_ARGS:
        run_script("train.py", *step_args(method, teacher_ckpt, folder / method, "--ckpt-every", 2))
    return {method: str(folder / method / "checkpoints" / "0000006.pt") for method in METHOD_ARGS}


@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_each_method_trains_resumes_exactly_and_samples_its_own_way(method, teacher_ckpt, tmp_path):
    uninterrupted, interrupted = tmp_path / "a", tmp_path / "b"
    result = run_script("train.py", *step_args(method, teacher_ckpt, uninterrupted, "--ckpt-every", 2,
                                               "--sample-every", 6))
    assert f"[{method}" in result.stdout or "round" in result.stdout
    # Kill a second run once its step-2 checkpoint exists, then rerun the same command: it resumes exactly.
    kill_after_checkpoint(step_args(method, teacher_ckpt, interrupted, "--ckpt-every", 2, "--sample-every", 6),
                          interrupted / "checkpoints" / "0000002.pt")
    result = run_script("train.py", *step_args(method, teacher_ckpt, interrupted, "--ckpt-every", 2,
                                               "--sample-every", 6))
    assert "resumed from" in result.stdout
    a, b = (load(d / "checkpoints" / "0000006.pt") for d in (uninterrupted, interrupted))
    state_keys = {"progressive": ["round_teacher"], "consistency": ["consistency_target"],
                  "tcd": ["consistency_target"], "guidance": []}[method]
    for key in ["model", "ema", *state_keys]:
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"
    assert (uninterrupted / "samples" / "0000006.png").exists()
    assert os.listdir(uninterrupted / "tensorboard")

    # The checkpoint says what the model is; sample.py with no flags samples it its own way.
    entry = a["sampling"]
    assert entry["method"] == method
    expected = {"progressive": ("x-eps", "ddim-trailing", 2), "consistency": ("x-eps", "consistency", 2),
                "tcd": ("x-eps", "tcd", 2), "guidance": ("eps", None, None)}[method]
    assert (entry["parametrisation"], entry["sampler"], entry["default_steps"]) == expected
    assert entry.get("gamma") == (0.5 if method == "tcd" else None) and ("gamma" in entry) == (method == "tcd")
    ckpt = str(uninterrupted / "checkpoints" / "0000006.pt")
    model, data = load_dit_checkpoint(ckpt)
    sampler, steps, cfg = sampling.resolve_sampling(data["sampling"])
    assert (sampler, steps) == ((expected[1], expected[2]) if method != "guidance" else ("ddpm", 250))
    run_script("sample.py", "--ckpt", ckpt, "--out", tmp_path / "grid.png", "--npz", tmp_path / "s.npz",
               "--num-samples", 10)
    with np.load(tmp_path / "s.npz") as samples:
        assert samples["arr_0"].shape == (10, 8, 8, 1)


def test_progressive_rounds_hand_over_the_teacher(students):
    run = os.path.dirname(os.path.dirname(students["progressive"]))
    log = open(os.path.join(run, "log.txt")).read()
    assert "round 1/2: 8->4 steps" in log and "step 3: round 2/2: 4->2 steps" in log
    at_handover, final = (load(os.path.join(run, "checkpoints", f"000000{step}.pt")) for step in (4, 6))
    assert at_handover["round"] == 1 and final["round"] == 1
    # round 2's teacher is round 1's EMA student (the EMA at step 3, which the step-4 checkpoint follows by one step)
    assert at_handover["round_teacher_parametrisation"] == "x-eps"
    assert all(torch.equal(at_handover["round_teacher"][k], final["round_teacher"][k]) for k in final["round_teacher"])


def test_guidance_distilled_student_takes_w_in_one_forward(students):
    model, data = load_dit_checkpoint(students["guidance"])
    calls = []
    model.x_embedder.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    sample.generate(model, data, [1, 2, 3], num_sampling_steps=4, sampler="ddim", cfg_scale=2.5, progress=False)
    assert calls == [3] * 4  # one forward of the 3 samples per step, no doubled batch
    with pytest.raises(ValueError, match=r"outside the guidance range this student was distilled for \[1.0, 3.0\]"):
        sample.generate(model, data, [1], cfg_scale=4.0, progress=False)


def built_method(argv):
    """The training method train.py builds from argv on a digits-shaped data set, without training."""
    import train
    args = train.parse_args([str(a) for a in argv])
    data = dict(image_size=8, latent=False, vae=None, input_size=8, in_channels=1, num_classes=10)
    return train.build_run(args, data, torch.device("cpu"), world_size=1).method


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_guidance_min_fraction_draws_wmin_for_that_share_and_uniform_w_for_the_rest(fraction, teacher_ckpt,
                                                                                    tmp_path):
    method = built_method(step_args("consistency", teacher_ckpt, tmp_path, "--guidance-range", 1, 3,
                                    "--guidance-min-fraction", fraction))
    draws = method.randomness(torch.Generator().manual_seed(0), 20000, (1, 8, 8))
    w, drop = method.guidance(draws)
    assert not drop.any()  # every label kept: w = 1 is the conditional model
    at_min = w == 1.0
    assert abs(at_min.float().mean().item() - fraction) < 0.01
    rest = w[~at_min]
    if fraction < 1:  # the rest uniform on [1, 3): mean 2, variance 1/3, each half of the range holding half
        assert rest.min() >= 1 and rest.max() < 3
        assert abs(rest.mean().item() - 2) < 0.02 and abs(rest.var().item() - 4 / 12) < 0.02
        assert abs((rest < 2).float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("fraction", [0.0, 0.25])
def test_tcd_clean_fraction_sends_that_share_to_the_clean_end_and_the_rest_uniform(fraction, teacher_ckpt, tmp_path):
    method = built_method(step_args("tcd", teacher_ckpt, tmp_path, "--tcd-clean-fraction", fraction))
    u = method.randomness(torch.Generator().manual_seed(0), 20000, (1, 8, 8))["s_uniform"]
    index = torch.full((20000,), 9)
    s_index = method.jump_index(u, index)
    if fraction == 0:  # the paper's draw: uniform over the grid points 0 ... n
        assert torch.equal(s_index, torch.minimum((u * 10).long(), index))
    assert abs((s_index == 0).float().mean().item() - (fraction + (1 - fraction) / 10)) < 0.01
    counts = torch.bincount(s_index[s_index > 0], minlength=10)[1:].float()
    assert s_index.max() == 9 and counts.min() / counts.max() > 0.85  # 1 ... 9 equally often
    small = method.jump_index(u[:6], torch.tensor([0, 0, 1, 2, 3, 4]))
    assert (small >= 0).all() and (small <= torch.tensor([0, 0, 1, 2, 3, 4])).all()


def test_sample_ddp_uses_the_checkpoints_sampler(students, tmp_path):
    import json
    ckpt = students["consistency"]
    run_script("sample_ddp.py", "--ckpt", ckpt, "--num-samples", 12, "--chunk-size", 6, "--sample-dir",
               tmp_path / "samples")
    settings = json.loads((tmp_path / "samples" / "meta.json").read_text())["settings"]
    assert (settings["sampler"], settings["num_sampling_steps"], settings["cfg_scale"]) == ("consistency", 2, 1.0)
    with np.load(tmp_path / "samples" / "samples_12.npz") as samples:
        assert samples["arr_0"].shape == (12, 8, 8, 1)
    result = run_script("sample_ddp.py", "--ckpt", ckpt, "--num-samples", 12, "--sample-dir", tmp_path / "other",
                        "--sampler", "ddpm", check=False)
    assert result.returncode != 0 and "made for the consistency sampler" in result.stderr


def test_consistency_sampler_is_deterministic_and_takes_any_step_count(students):
    model, data = load_dit_checkpoint(students["consistency"])
    for steps in (1, 2, 4, 8):
        first = sample.generate(model, data, list(range(10)), seed=3, num_sampling_steps=steps, progress=False)
        again = sample.generate(model, data, list(range(10)), seed=3, num_sampling_steps=steps, batch_size=4,
                                progress=False)
        torch.testing.assert_close(first, again, rtol=1e-5, atol=1e-5)
        assert first.shape == (10, 1, 8, 8) and first.abs().max() <= 1
    with pytest.raises(ValueError, match=r"samples in 1..10 steps, not 11"):
        sample.generate(model, data, [1], num_sampling_steps=11, progress=False)


def test_tcd_student_samples_at_its_gamma_or_the_one_given(students, tmp_path):
    import export
    model, data = load_dit_checkpoint(students["tcd"])
    assert data["sampling"]["gamma"] == 0.5 and data["sampling"]["consistency_skip"] == 100
    own = sample.generate(model, data, list(range(6)), seed=3, progress=False)
    again = sample.generate(model, data, list(range(6)), seed=3, gamma=0.5, batch_size=4, progress=False)
    torch.testing.assert_close(own, again, rtol=1e-5, atol=1e-5)
    for gamma in (0.0, 1.0):
        other = sample.generate(model, data, list(range(6)), seed=3, gamma=gamma, progress=False)
        assert (other - own).abs().max() > 1e-3 and other.shape == (6, 1, 8, 8)
    for steps in (1, 4, 10):  # any count on its grid of 1000 / 100 points
        assert sample.generate(model, data, [1, 2], num_sampling_steps=steps, progress=False).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"samples in 1..10 steps, not 11"):
        sample.generate(model, data, [1], num_sampling_steps=11, progress=False)
    # export.py calibrates on the timesteps its sampler declares (its default 2 steps on the grid of 100)
    calibration = export.calibration_set(model.config, data, 8, None)
    assert sorted(set(calibration["t"].tolist()), reverse=True) == [999.0, 499.0]
    run_script("sample.py", "--ckpt", students["tcd"], "--gamma", 0.2, "--out", tmp_path / "g.png", "--num-samples", 4)
    for ckpt, gamma, message in [(students["tcd"], 1.5, "argument --gamma: 1.5 is not a finite number in [0, 1]"),
                                 (students["tcd"], -0.1, "argument --gamma: -0.1 is not a finite number in [0, 1]"),
                                 (students["consistency"], 0.3, "--gamma is the stochasticity of TCD's sampler")]:
        result = run_script("sample.py", "--ckpt", ckpt, "--gamma", gamma, "--out", tmp_path / "x.png", check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, message


@pytest.mark.parametrize("case, extra, message", [
    ("wrong sampler", ["--sampler", "ddim"], "made for the ddim-trailing sampler"),
    ("steps it was not distilled for", ["--num-sampling-steps", "3"], "samples in 2 steps, not 3"),
    ("guidance without a range", ["--cfg-scale", "2"], "distilled without guidance"),
])
def test_few_step_checkpoint_refuses_what_it_was_not_trained_for(case, extra, message, students, tmp_path):
    result = run_script("sample.py", "--ckpt", students["progressive"], "--out", tmp_path / "g.png", *extra,
                        check=False)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, case


def test_two_processes_match_one_and_bf16_runs(teacher_ckpt, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_script("train.py", *step_args("consistency", teacher_ckpt, one, "--ckpt-every", 6, "--guidance-range", 1, 3))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             os.path.join(ROOT, "train.py"),
                             *map(str, step_args("consistency", teacher_ckpt, two, "--ckpt-every", 6,
                                                 "--guidance-range", 1, 3))],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = (load(d / "checkpoints" / "0000006.pt") for d in (one, two))
    for key in ("model", "consistency_target"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-4, atol=1e-5)
    run_script("train.py", *step_args("progressive", teacher_ckpt, tmp_path / "bf16", "--ckpt-every", 6,
                                      "--precision", "bf16"))
    assert torch.isfinite(load(tmp_path / "bf16" / "checkpoints" / "0000006.pt")["model"]["final_layer.linear.weight"]).all()


def test_step_distillation_bad_inputs_fail_clearly(teacher_ckpt, tmp_path, capsys):
    import train
    for argv, message in [
        (step_args("guidance", teacher_ckpt, tmp_path / "d", "--guidance-range", 3, 1), "WMIN <= WMAX"),
        (step_args("progressive", teacher_ckpt, tmp_path / "e", "--student-model", "DiT-Digits-S"),
         "student of the teacher's own architecture"),
        (step_args("guidance", teacher_ckpt, tmp_path / "h", "--consistency-skip", 50),
         "--consistency-skip do(es) not apply to --step-distillation guidance"),
        (step_args("tcd", teacher_ckpt, tmp_path / "i", "--tcd-gamma", 1.5),
         "argument --tcd-gamma: 1.5 is not a finite number in [0, 1]"),
        (step_args("consistency", teacher_ckpt, tmp_path / "j", "--tcd-gamma", 0.5),
         "--tcd-gamma do(es) not apply to --step-distillation consistency (used by --step-distillation tcd)"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            train.parse_args([str(a) for a in argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, message
    cases = [
        (step_args("progressive", teacher_ckpt, tmp_path / "a", "--progressive-start-steps", 12),
         "must be --sampling-steps 2 times a power of two"),
        (step_args("consistency", teacher_ckpt, tmp_path / "b", "--consistency-skip", 7), "must divide 1000"),
        (["--step-distillation", "guidance", "--teacher-ckpt", teacher_ckpt, "--max-steps", 2, "--results-dir",
          tmp_path / "c"], "needs --guidance-range"),
        (step_args("consistency", teacher_ckpt, tmp_path / "k", "--guidance-min-fraction", 0.5),
         "--guidance-min-fraction 0.5 draws w from a guidance range: pass --guidance-range WMIN WMAX too"),
    ]
    not_a_checkpoint = tmp_path / "notes.pt"
    not_a_checkpoint.write_text("not a checkpoint")
    cases.append((step_args("consistency", str(not_a_checkpoint), tmp_path / "f"), "cannot be read ("))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    cases.append((step_args("consistency", str(foreign), tmp_path / "g"), "no model config"))
    for argv, message in cases:
        result = run_script("train.py", *argv, check=False)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, \
            (message, result.stderr[-2000:])


#################################################################################
#              Export: the numpy runner's samplers and exported files           #
#################################################################################

@pytest.mark.parametrize("method", ["progressive", "consistency", "tcd"])
def test_numpy_runner_samplers_equal_the_torch_samplers(method, students):
    import run_exported
    model, data = load_dit_checkpoint(students[method])
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.add_(0.05 * torch.randn_like(p))  # x~ away from zero, so the x-eps head matters

    def denoise(x, t, y, w=None):
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    metadata = {"diffusion": {"schedule": "linear", "num_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02},
                "latent": False, "sampling": data["sampling"]}
    rng = np.random.default_rng(0)
    labels = np.arange(6) % 10
    noise = rng.standard_normal((6, 1, 8, 8)).astype(np.float32)
    step_noise = rng.standard_normal((3, 6, 1, 8, 8)).astype(np.float32)
    for steps in (1, 2, 4):
        ours = run_exported.few_step_sample(denoise, noise, step_noise, labels, metadata, steps)
        y = torch.from_numpy(labels)
        if method == "progressive":
            reference = sampling.ddim_trailing_sample(model, "x-eps", torch.from_numpy(noise), y, steps, clip=True)
        elif method == "tcd":
            reference = sampling.tcd_sample(model, torch.from_numpy(noise), torch.from_numpy(step_noise), y, steps,
                                            data["sampling"]["consistency_skip"], data["sampling"]["gamma"], clip=True)
        else:
            reference = sampling.consistency_sample(model, torch.from_numpy(noise), torch.from_numpy(step_noise), y, steps,
                                              data["sampling"]["consistency_skip"], clip=True)
        np.testing.assert_allclose(ours, reference.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["consistency", "guidance"])
def test_few_step_and_guidance_students_export_and_sample_standalone(method, students, tmp_path):
    import export
    import run_exported
    ckpt = students[method]
    formats = (("torchscript", ".ts"), ("onnx", ".onnx")) if method == "guidance" else (("onnx", ".onnx"),)
    for fmt, extension in formats:  # the w input in both formats; the few-step sampler once
        out = str(tmp_path / f"student{extension}")
        extra = ["--calib-samples", "2"] if fmt == "onnx" else []
        results = export.main(export.parse_args(["--ckpt", ckpt, "--format", fmt, "--int8", "--dynamic-batch",
                                                 "--out", out, "--repeats", "1", *extra]))
        expected = ["fp32", "int8", "int8-cpu"] if fmt == "onnx" else ["fp32", "int8"]
        assert [r["precision"] for r in results] == expected and results[0]["relative_error"] < 1e-5
        denoise, metadata = run_exported.load_denoiser(out)
        assert metadata["sampling"]["method"] == method
        if method == "guidance":
            assert "w" in metadata["inputs"]
            model, _ = load_dit_checkpoint(ckpt)
            x, t, y = np.ones((2, 1, 8, 8), np.float32), np.array([10, 900], np.float32), np.array([1, 2], np.int32)
            w = np.array([1.5, 3.0], np.float32)
            with torch.no_grad():
                reference = model(*map(torch.from_numpy, (x, t, y)), w=torch.from_numpy(w)).numpy()
            np.testing.assert_allclose(denoise(x, t, y, w), reference, rtol=1e-4, atol=1e-5)
        samples = run_exported.sample(denoise, metadata, list(range(10)), seed=1,
                                      cfg_scale=2.0 if method == "guidance" else None)
        assert samples.shape == (10, 1, 8, 8) and np.isfinite(samples).all()
    if method == "consistency":
        calibration = np.load(str(tmp_path / "student_calib.npz"))
        assert sorted(set(calibration["t"].tolist()), reverse=True) == [999.0, 499.0]  # its own 2-step grid
        with pytest.raises(ValueError, match="takes no guidance scale"):
            run_exported.sample(denoise, metadata, [1], cfg_scale=2.0)
    else:
        with pytest.raises(ValueError, match="outside the guidance range"):
            run_exported.sample(denoise, metadata, [1], cfg_scale=5.0)
        with pytest.raises(ValueError, match="guidance-distilled"):
            export.main(export.parse_args(["--ckpt", ckpt, "--format", "onnx", "--cfg-scale", "2", "--out",
                                           str(tmp_path / "x.onnx")]))


def test_diffusers_conversion_takes_a_guidance_distilled_student(students, tmp_path):
    # once refused; its w input now converts (tests/test_pipeline_travel.py samples such folders with diffusers)
    run_script("convert_diffusers.py", "--to-diffusers", "--ckpt", students["guidance"], "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").exists()
