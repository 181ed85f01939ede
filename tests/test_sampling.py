"""sampling.py: the one guidance function against each formula it replaced, every sampler's declared timesteps
against the timesteps it calls the model at, the SamplingSpec reader on every old "sampling" entry, and
run_exported.py's numpy copies equal to sampling.py's."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import checks
import run_exported
import sample
import sampling
from export import Denoiser
from models import DiT_models, load_dit_checkpoint
from sampling import SAMPLERS, SamplingSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIXEL_DATA = {"image_size": 8, "latent": False, "vae": None}
# Every "sampling" entry train.py has written (models.EPS_SAMPLING, train.py's size distillation and the
# step-distillation methods' sampling()), and one written before guidance-distilled teachers existed.
OLD_ENTRIES = [
    {"method": "plain", "parametrisation": "eps", "sampler": None, "steps": None, "default_steps": None,
     "guidance_range": None, "consistency_skip": None},
    {"method": "size-distillation", "parametrisation": "eps", "sampler": None, "steps": None, "default_steps": None,
     "guidance_range": None, "consistency_skip": None},
    {"method": "progressive", "parametrisation": "x-eps", "sampler": "ddim-trailing", "steps": [4], "default_steps": 4,
     "guidance_range": None, "consistency_skip": None},
    {"method": "progressive", "parametrisation": "x-eps", "sampler": "ddim-trailing", "steps": [2], "default_steps": 2,
     "guidance_range": [1.0, 4.0], "consistency_skip": None},
    {"method": "consistency", "parametrisation": "x-eps", "sampler": "consistency", "steps": list(range(1, 51)),
     "default_steps": 4, "guidance_range": None, "consistency_skip": 20},
    {"method": "guidance", "parametrisation": "eps", "sampler": None, "steps": None, "default_steps": None,
     "guidance_range": [1.0, 5.0], "consistency_skip": None},
]
# A TCD student's entry: the 7 keys and gamma.
TCD_ENTRY = {"method": "tcd", "parametrisation": "x-eps", "sampler": "tcd", "steps": list(range(1, 51)),
             "default_steps": 4, "guidance_range": None, "consistency_skip": 20, "gamma": 0.3}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_dit(seed=0, **overrides):
    """A tiny DiT with every weight random (adaLN-Zero would make its output 0)."""
    torch.manual_seed(seed)
    model = DiT_models["DiT-Digits-S"](**dict(dict(input_size=8, in_channels=1, num_classes=10), **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.normal_(0, 0.1)
    return model.eval()


#################################################################################
#                  Classifier-free guidance, written once                       #
#################################################################################

@pytest.mark.parametrize("in_channels", [1, 4])
def test_the_guidance_function_equals_each_old_copy(in_channels):
    model = random_dit(in_channels, in_channels=in_channels)
    x = torch.randn(3, in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.tensor([5, 500, 999]), torch.tensor([1, 2, 7])
    null = torch.full_like(y, 10)
    g = min(3, in_channels)
    with torch.no_grad():
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C_out, H, W)

        # models.py's forward_with_cfg as it was (the original DiT's)
        eps, rest = out[:, :g], out[:, g:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + 2.5 * (cond_eps - uncond_eps)
        old_forward_with_cfg = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
        new = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 2.5)
        assert torch.equal(new, old_forward_with_cfg)

        # step_distill.model_output as it was, with w (N,) and a temperature
        w = torch.tensor([1.5, 2.5, 4.0])
        cond, uncond = out.chunk(2)
        guided = uncond[:, :g] + w.float().view(-1, 1, 1, 1) * (cond[:, :g] - uncond[:, :g])
        old_model_output = torch.cat([guided, cond[:, g:]], dim=1) / 1.3
        assert torch.equal(sampling.model_output(model, x, t, y, w, temperature=1.3), old_model_output)

        # export.py's Denoiser as it was
        cond, uncond = out.unflatten(0, (2, -1)).unbind(0)
        guided = uncond[:, :g] + 2.5 * (cond[:, :g] - uncond[:, :g])
        old_denoiser = torch.cat([guided, cond[:, g:]], dim=1)
        assert torch.equal(Denoiser(model, 2.5)(x, t.float(), y), old_denoiser)


#################################################################################
#            Every sampler calls the model at the timesteps it declares         #
#################################################################################

def recording(model):
    """model, with every timestep it is called at appended to the returned list (one per call; a batch shares it)."""
    calls = []
    forward = model.forward

    def recorded(x, t, *args, **kwargs):
        assert (t == t[0]).all()
        calls.append(t[0].item())
        return forward(x, t, *args, **kwargs)
    model.forward = recorded  # the instance's forward: model(...), model.forward and forward_with_cfg all reach it
    return calls


CASES = [("ddpm", 2), ("ddpm", 7), ("ddim", 10), ("ddim", 25), ("ddim-trailing", 1), ("ddim-trailing", 3),
         ("dpm++2m", 1), ("dpm++2m", 5), ("unipc", 4), ("euler", 3), ("euler", 6), ("flow-euler", 1),
         ("flow-euler", 5)]


@pytest.mark.parametrize("name, steps", CASES)
def test_declared_timesteps_are_the_models_calls(name, steps):
    model = random_dit(3)
    calls = recording(model)
    spec = SamplingSpec()
    sample.generate(model, dict(PIXEL_DATA, sampling=spec.to_dict()), [0, 1, 2], sampler=name,
                    num_sampling_steps=steps, cfg_scale=2.0, progress=False)
    declared = SAMPLERS[name].timesteps(steps, spec)
    assert len(declared) == steps and calls == declared


@pytest.mark.parametrize("sampler, spec_steps, skip", [("ddim-trailing", [2], None), ("consistency", [1, 3, 7], 20),
                                                       ("consistency", [2, 5], 1), ("tcd", [1, 3, 7], 20)])
def test_few_step_students_declare_their_grids(sampler, spec_steps, skip):
    from dit_pipeline import FewStepScheduler
    student = random_dit(4, learn_sigma=True)
    method = sampler if sampler in ("consistency", "tcd") else "progressive"
    spec = SamplingSpec(method=method, parametrisation="x-eps", sampler=sampler, steps=tuple(spec_steps),
                        default_steps=spec_steps[0], consistency_skip=skip, gamma=0.3 if sampler == "tcd" else None)
    scheduler = FewStepScheduler(sampler, skip or 1, clip_sample=True)
    for steps in spec_steps:
        calls = recording(student)
        sample.generate(student, dict(PIXEL_DATA, sampling=spec.to_dict()), [0, 1], num_sampling_steps=steps,
                        progress=False)
        declared = SAMPLERS[sampler].timesteps(steps, spec)
        assert len(declared) == steps and calls == declared
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == declared  # the DiTPipeline scheduler reads the same grid
        del student.forward  # the class's own again, for the next count's recording


def test_step_counts_and_needs_are_declared():
    assert 25 in SAMPLERS["ddim"].step_counts and 999 not in SAMPLERS["ddim"].step_counts
    for count in (1, 7, 250, 1000):
        assert count in SAMPLERS["ddpm"].step_counts and count in SAMPLERS["dpm++2m"].step_counts
    assert [name for name, s in SAMPLERS.items() if s.renoises] == ["consistency", "tcd"]
    assert [name for name, s in SAMPLERS.items() if "x-eps" in s.parametrisations] == \
        ["ddim-trailing", "consistency", "tcd", "flow-euler"]  # flow-euler: any DiT's velocity x_0 - eps


#################################################################################
#        The few-step samplers against diffusers' own (independent) schedulers  #
#################################################################################

def x0_model(model, y, consistency=False):
    """The DiT as a diffusers scheduler with prediction_type="sample" calls it: (x_t, scalar t) -> an x_0 estimate.
    consistency: TCD's x_0 (its TCF takes the consistency function's f; LCMScheduler applies c_skip / c_out itself)."""
    def predict(x, t):
        t = t.expand(len(x))
        if consistency:
            return sampling.consistency_function(model, x, t, y)
        return sampling.predict_x0_eps(model(x, t, y), x, t, "x-eps")[0]
    return predict


def diffusers_sample(scheduler, predict, noise, grid, seed, **step_options):
    """noise (N, C, H, W) through `scheduler` at the timesteps `grid`, its re-noising drawn from a generator at seed."""
    scheduler.set_timesteps(timesteps=grid)
    assert scheduler.timesteps.tolist() == grid
    generator, x = torch.Generator().manual_seed(seed), noise
    for t in scheduler.timesteps:
        x = scheduler.step(predict(x, t), t, x, generator=generator, **step_options).prev_sample
    return x


def step_draws(seed, count, shape):
    """The draws diffusers' randn_tensor makes on the CPU from a generator at seed, one per step but the last."""
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(shape, generator=generator) for _ in range(count)]) if count else \
        torch.empty(0, *shape)


@pytest.mark.parametrize("steps, skip", [(1, 20), (2, 20), (4, 20), (7, 20), (3, 50)])
def test_the_consistency_sampler_equals_diffusers_lcm_scheduler(steps, skip):
    """sampling.consistency_sample against diffusers' LCMScheduler (LCM's Algorithm 3, c_skip / c_out its own) on the
    same random x-eps DiT, timesteps and re-noising draws; unclipped (LCMScheduler clips only x_0, we clip f too)."""
    from diffusers import LCMScheduler
    model = random_dit(5, learn_sigma=True)
    y = torch.tensor([0, 4, 9])
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    grid = sampling.trailing_timesteps(steps, skip)
    scheduler = LCMScheduler(**sampling.DIT_SCHEDULE, prediction_type="sample", original_inference_steps=1000 // skip,
                             timestep_scaling=sampling.CONSISTENCY_TIMESTEP_SCALE, set_alpha_to_one=True)
    with torch.no_grad():
        theirs = diffusers_sample(scheduler, x0_model(model, y), noise, grid, seed=7)
        ours = sampling.consistency_sample(model, noise, step_draws(7, steps - 1, noise.shape), y, steps, skip)
        other = sampling.consistency_sample(model, noise, step_draws(8, steps - 1, noise.shape), y, steps, skip)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # measured: at most 7e-7 (outputs up to 2.7)
    assert steps == 1 or (other - ours).abs().max() > 0.1  # the draws matter


@pytest.mark.parametrize("steps, skip, gamma", [(1, 20, 0.3), (2, 20, 0.3), (4, 20, 0.3), (7, 20, 0.3), (4, 20, 0.0),
                                                (4, 20, 1.0), (4, 20, 0.55), (3, 50, 0.7)])
def test_the_tcd_sampler_equals_diffusers_tcd_scheduler(steps, skip, gamma):
    """sampling.tcd_sample against diffusers' TCDScheduler (strategic stochastic sampling, eta = gamma) on the same
    random x-eps DiT (fed the x_0 our TCF takes), timesteps and re-noising draws."""
    from diffusers import TCDScheduler
    model = random_dit(5, learn_sigma=True)
    y = torch.tensor([0, 4, 9])
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    grid = sampling.trailing_timesteps(steps, skip)
    scheduler = TCDScheduler(**sampling.DIT_SCHEDULE, prediction_type="sample", original_inference_steps=1000 // skip)
    with torch.no_grad():
        theirs = diffusers_sample(scheduler, x0_model(model, y, consistency=True), noise, grid, seed=7, eta=gamma)
        ours = sampling.tcd_sample(model, noise, step_draws(7, steps - 1, noise.shape), y, steps, skip, gamma)
        other = sampling.tcd_sample(model, noise, step_draws(8, steps - 1, noise.shape), y, steps, skip, gamma)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # measured: at most 3e-6 (outputs up to 2.8)
    assert (steps == 1 or gamma == 0) == bool((other - ours).abs().max() < 1e-6)  # the draws matter where gamma > 0
    for t_next in range(1000):  # the same jump target at every timestep (both round (1 - gamma) t in float32)
        assert sampling.tcd_s(t_next, gamma) == int(torch.floor((1 - gamma) * torch.tensor(t_next)))


#################################################################################
#                 The checkpoint's "sampling" entry: one reader                 #
#################################################################################

@pytest.mark.parametrize("entry", OLD_ENTRIES + [TCD_ENTRY])
def test_the_reader_round_trips_every_old_entry(entry):
    spec = SamplingSpec.from_checkpoint_entry(entry)
    assert spec.to_dict() == entry and list(spec.to_dict()) == list(OLD_ENTRIES[0]) + (["gamma"] if spec.gamma else [])
    assert SamplingSpec.from_checkpoint_entry(spec) is spec
    assert hash(spec) == hash(SamplingSpec.from_checkpoint_entry(dict(entry)))  # frozen, plain values
    with pytest.raises(AttributeError):
        spec.sampler = "ddpm"


def test_the_reader_fills_what_an_old_checkpoint_lacks_and_refuses_foreign_keys(tmp_path):
    assert SamplingSpec.from_checkpoint_entry(None) == SamplingSpec() == SamplingSpec.from_checkpoint_entry({})
    assert SamplingSpec().to_dict() == OLD_ENTRIES[0] == sampling.EPS_SAMPLING
    partial = {"method": "guidance", "guidance_range": [1.0, 5.0]}
    assert SamplingSpec.from_checkpoint_entry(partial).to_dict() == OLD_ENTRIES[-1]
    with pytest.raises(checks.UserError, match="unknown keys"):
        SamplingSpec.from_checkpoint_entry(dict(OLD_ENTRIES[0], schedule="cosine"))
    with pytest.raises(checks.UserError, match="does not know"):
        SamplingSpec.from_checkpoint_entry(dict(OLD_ENTRIES[0], sampler="heun"))
    # A checkpoint with a partial entry (and one without any) loads with weights_only and reads complete.
    model = random_dit()
    for name, entry in (("partial.pt", partial), ("none.pt", None)):
        checkpoint = {"ema": model.state_dict(), "config": model.config, "data": dict(PIXEL_DATA)}
        if entry is not None:
            checkpoint["sampling"] = entry
        torch.save(checkpoint, tmp_path / name)
        _, data = load_dit_checkpoint(str(tmp_path / name))
        assert data["sampling"] == (OLD_ENTRIES[-1] if entry else OLD_ENTRIES[0])
    torch.save({"sampling": SamplingSpec.from_checkpoint_entry(OLD_ENTRIES[4]).to_dict()}, tmp_path / "plain.pt")
    assert torch.load(tmp_path / "plain.pt", weights_only=True)["sampling"] == OLD_ENTRIES[4]


def test_sampling_imports_no_model_and_no_script():
    code = ("import sys, sampling; "
            "print(sorted({'models', 'sample', 'step_distill', 'train', 'export'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


#################################################################################
#               run_exported.py's numpy copies equal sampling.py's              #
#################################################################################

def test_the_standalone_runners_copies_equal_sampling():
    assert run_exported.EPS_SAMPLING == sampling.EPS_SAMPLING
    assert (run_exported.CONSISTENCY_SIGMA_DATA, run_exported.CONSISTENCY_TIMESTEP_SCALE) == \
        (sampling.CONSISTENCY_SIGMA_DATA, sampling.CONSISTENCY_TIMESTEP_SCALE)
    assert run_exported.SOLVERS == sampling.SOLVERS and run_exported.DIT_SCHEDULE == sampling.DIT_SCHEDULE
    for stride in (1, 5, 20, 50):
        for steps in range(1, sampling.DIFFUSION_STEPS // stride + 1, 7):
            assert run_exported.trailing_timesteps(steps, stride) == sampling.trailing_timesteps(steps, stride)
    for steps in range(2, 1001):
        if steps in sampling.SAMPLERS["ddim"].step_counts:
            assert run_exported.ddim_timesteps(1000, steps).tolist() == sorted(sampling.leading_timesteps(steps))
        else:
            for grid in (lambda: run_exported.ddim_timesteps(1000, steps), lambda: sampling.leading_timesteps(steps)):
                with pytest.raises(ValueError):
                    grid()
    metadata = {"input_size": 8, "in_channels": 1, "num_classes": 10, "latent": False}
    alpha_bar = run_exported.alphas_cumprod({"diffusion": {"schedule": "linear", "num_timesteps": 1000,
                                                           "beta_start": 1e-4, "beta_end": 0.02}, **metadata})
    alpha, sigma = sampling.alpha_sigma(torch.arange(1000), ndim=1)
    np.testing.assert_allclose(np.sqrt(alpha_bar), alpha.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.sqrt(1 - alpha_bar), sigma.numpy(), rtol=1e-6)
    for entry in OLD_ENTRIES + [TCD_ENTRY, None, {"method": "guidance", "guidance_range": [1.0, 5.0]}]:
        assert run_exported.sampling_entry({"sampling": entry}) == SamplingSpec.from_checkpoint_entry(entry).to_dict()
    assert run_exported.TCD_GAMMA == sampling.TCD_GAMMA
    for gamma in np.linspace(0, 1, 41).tolist() + [0.3, 0.7]:
        for t_next in range(1000):
            assert run_exported.tcd_s(t_next, gamma) == sampling.tcd_s(t_next, gamma)


def test_the_runners_atomic_writer_is_checks(tmp_path):
    assert run_exported.TEMPORARY_PREFIX == checks.TEMPORARY_PREFIX
    arrays = dict(arr_0=np.arange(6, dtype=np.uint8), arr_1=np.arange(2))
    for writer, name in ((run_exported.write_atomically, "a.npz"), (checks.write_atomically, "b.npz")):
        writer(str(tmp_path / name), lambda temporary: np.savez(temporary, **arrays))

        def broken(temporary):
            np.savez(temporary, **arrays)
            raise OSError("disk full")
        with pytest.raises(OSError):
            writer(str(tmp_path / ("broken-" + name)), broken)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert os.stat(tmp_path / "a.npz").st_mode == os.stat(tmp_path / "b.npz").st_mode
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.npz"]
