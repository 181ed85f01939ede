"""diffusers' solvers as samplers (sampling.SAMPLERS, run_exported.py --sampler): determinism, agreement with
independent references (diffusers' DDIMScheduler as the project's DDIM; DPM-Solver++ of order 1 as DDIM), the
existing DDPM / DDIM unchanged, and the standalone runner's copy equal to sampling.py's."""
import numpy as np
import pytest
import torch

import run_exported
import sample
import sampling
from diffusion import create_diffusion
from models import DiT_models
from sampling import EPS_SAMPLING
from sampling import SamplingSpec, ddim_trailing_sample

PIXEL_DATA = {"image_size": 8, "latent": False, "vae": None, "sampling": EPS_SAMPLING}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    """A DiT-Digits-S with every weight perturbed (adaLN-Zero's zero init would make it output zeros)."""
    torch.manual_seed(0)
    dit = DiT_models["DiT-Digits-S"](input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return dit.eval()


def run_sampler(model, name, num_steps, noise, labels, clip, cfg_scale=1.0, temperature=1.0):
    with torch.no_grad():
        return sampling.SAMPLERS[name].sample(model, SamplingSpec(), noise, labels, num_steps, cfg_scale, temperature,
                                              0.0, clip, None, False)


@pytest.mark.parametrize("name", sampling.SOLVERS)
def test_every_solver_is_deterministic_with_guidance_and_temperature(model, name):
    labels = list(range(10))
    settings = dict(seed=3, sampler=name, num_sampling_steps=5, progress=False)
    first = sample.generate(model, PIXEL_DATA, labels, **settings)
    assert torch.equal(first, sample.generate(model, PIXEL_DATA, labels, **settings))
    assert torch.isfinite(first).all() and first.shape == (10, 1, 8, 8)
    assert not torch.allclose(first, sample.generate(model, PIXEL_DATA, labels, **{**settings, "seed": 4}))
    guided = sample.generate(model, PIXEL_DATA, labels, cfg_scale=3.0, **settings)
    tempered = sample.generate(model, PIXEL_DATA, labels, temperature=1.2, **settings)
    for other in (guided, tempered):
        assert torch.isfinite(other).all() and (other - first).abs().max() > 1e-3
    one_step = sample.generate(model, PIXEL_DATA, labels, **{**settings, "num_sampling_steps": 1})
    assert torch.isfinite(one_step).all()


def test_first_order_dpm_solver_plus_plus_is_ddim(model, monkeypatch):
    """DPM-Solver++ of order 1 is DDIM (Lu et al. 2022, Sec. 4.1): on the same trailing grid, the diffusers path
    (channels, timesteps, noise scaling) must reproduce the project's own DDIM."""
    monkeypatch.setitem(sampling.SOLVERS, "dpm++1", ("DPMSolverMultistepScheduler",
                                                   dict(algorithm_type="dpmsolver++", solver_order=1)))
    noise = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6)
    for steps in (4, 10):
        ours = ddim_trailing_sample(model, "eps", noise, labels, steps)
        with torch.no_grad():
            theirs = sampling.solver("dpm++1", model, SamplingSpec(), noise, labels, steps, 1.0, 1.0, 0.0, False,
                                     None, False)
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clip", [False, True])
def test_diffusers_ddim_scheduler_agrees_with_the_project_ddim(model, clip):
    """diffusers' DDIMScheduler set up as the original DiT's DDIM (leading grid from t = 0, stride 1000 // N, alpha 1
    after the last step, eta 0; pixels: x_0 clamped and eps re-derived from it) gives the same samples."""
    from diffusers import DDIMScheduler
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 3, 5, 7])
    for steps in (10, 25):
        ours = run_sampler(model, "ddim", steps, noise, labels, clip)
        scheduler = DDIMScheduler(**sampling.DIT_SCHEDULE, timestep_spacing="leading", steps_offset=0,
                                  set_alpha_to_one=True, clip_sample=clip, clip_sample_range=1.0)
        scheduler.set_timesteps(steps)
        x = noise.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                eps = model(x, t.expand(len(x)), labels)[:, :1]
                x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=clip).prev_sample
        torch.testing.assert_close(x, ours, rtol=1e-4, atol=1e-4)


def test_ddpm_and_ddim_are_the_original_loops(model):
    """generate's ddpm and ddim are bit-identical to the original DiT's p_sample_loop / ddim_sample_loop."""
    labels = list(range(8))
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.tensor(labels)
    for name, loop in (("ddpm", "p_sample_loop"), ("ddim", "ddim_sample_loop")):
        images = sample.generate(model, PIXEL_DATA, labels, seed=5, sampler=name, num_sampling_steps=10,
                                 progress=False)
        torch.manual_seed(5)  # DDPM's per-step noise: generate reseeds the global generator from the seed
        with torch.no_grad():
            reference = getattr(create_diffusion(f"{'ddim' if name == 'ddim' else ''}10"), loop)(
                model.forward, noise.shape, noise, clip_denoised=True, model_kwargs=dict(y=y), progress=False)
        assert torch.equal(images, reference), name


def test_standalone_runner_solvers_match_sample_py(model, tmp_path):
    assert run_exported.SOLVERS == sampling.SOLVERS and run_exported.DIT_SCHEDULE == sampling.DIT_SCHEDULE
    assert run_exported.SOLVER_DEFAULT_STEPS == sampling.SOLVER_DEFAULT_STEPS
    labels = np.array([2, 4, 6])
    noise = np.random.default_rng(7).standard_normal((3, 1, 8, 8), dtype=np.float32)

    def denoise(x, t, y):
        with torch.no_grad():
            return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y).long()).numpy()
    metadata = {"input_size": 8, "in_channels": 1, "num_classes": 10, "batch_size": None, "sampling": None}
    for name in sampling.SOLVERS:
        for latent in (False, True):
            ours = run_exported.sample(denoise, {**metadata, "latent": latent}, labels, num_steps=6, seed=7,
                                       sampler=name)
            theirs = run_sampler(model, name, 6, torch.from_numpy(noise), torch.from_numpy(labels), clip=not latent)
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{name} latent={latent}")


def test_runner_without_diffusers_says_so(model, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_diffusers(name, *args, **kwargs):
        if name == "diffusers":
            raise ImportError("no diffusers")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_diffusers)
    metadata = {"input_size": 8, "in_channels": 1, "num_classes": 10, "batch_size": None, "sampling": None,
                "latent": False}
    with pytest.raises(ValueError, match="diffusers .*not installed.*--sampler ddim"):
        run_exported.sample(lambda x, t, y: x, metadata, np.array([1]), num_steps=2, sampler="unipc")


@pytest.mark.parametrize("sampler, steps, message", [
    ("ddim", 999, "cannot give exactly 999 steps"), ("ddim", 1, "cannot give exactly 1 steps"),
    ("dpm++2m", 1001, r"must lie in \[1, 1000\]"), ("consistency", 4, "needs a consistency-distilled checkpoint"),
    ("tcd", 4, "needs a tcd-distilled checkpoint"), ("heun", 4, "unknown sampler 'heun'")])
def test_impossible_requests_are_clear_errors(model, sampler, steps, message):
    with pytest.raises(ValueError, match=message):
        sample.generate(model, PIXEL_DATA, [0], sampler=sampler, num_sampling_steps=steps, progress=False)
