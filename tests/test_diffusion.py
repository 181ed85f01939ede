"""diffusion/: schedules, forward process, posterior, likelihoods, p_mean_variance, losses, respacing and samplers.

References are float64 numpy / torch computations written here from the papers' formulas (DDPM: Ho et al. 2020;
improved DDPM: Nichol & Dhariwal 2021; DDIM: Song et al. 2021), closed forms, and second derivations.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion import create_diffusion
from diffusion import gaussian_diffusion as gd
from diffusion.diffusion_utils import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from diffusion.respace import SpacedDiffusion, space_timesteps

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # DDPM's linear schedule, float64
ALPHAS = 1.0 - BETAS
ABAR = np.cumprod(ALPHAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
POSTERIOR_VAR = BETAS * (1 - ABAR_PREV) / (1 - ABAR)  # DDPM Eq. 7, beta~_t
LOG_POSTERIOR_VAR_CLIPPED = np.log(np.concatenate([[POSTERIOR_VAR[1]], POSTERIOR_VAR[1:]]))


def per_sample(array, t, ndim=4):
    """Index a float64 schedule by timesteps t (numpy ints) and shape it to broadcast over (N, C, H, W)."""
    return np.asarray(array)[t].reshape(-1, *([1] * (ndim - 1)))


def diffusion_of(var_type, mean_type=gd.ModelMeanType.EPSILON, loss_type=gd.LossType.MSE, betas=BETAS):
    return gd.GaussianDiffusion(betas=betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type)


def constant_model(output):
    return lambda x, t, **kwargs: output


def f64(tensor):
    return tensor.detach().double().numpy()


# ---------------------------------------------------------------- schedules

def test_linear_betas():
    np.testing.assert_array_equal(gd.get_named_beta_schedule("linear", 1000), np.linspace(1e-4, 0.02, 1000))
    for steps in (250, 4000):
        betas = gd.get_named_beta_schedule("linear", steps)
        assert betas.dtype == np.float64 and betas.shape == (steps,)
        np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, steps) * 1000 / steps, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        gd.get_named_beta_schedule("sigmoid", 1000)


@pytest.mark.parametrize("steps", [1000, 50])
def test_cosine_betas(steps):
    def alpha_bar(t):  # improved DDPM, Eq. 17 (normalised by f(0) below), s = 0.008
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2

    i = np.arange(steps, dtype=np.float64)
    expected = np.minimum(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999)
    betas = gd.get_named_beta_schedule("cosine", steps)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=1e-15)
    assert betas[-1] == 0.999 and betas.max() == 0.999  # alpha_bar(1) = 0: the last beta is capped
    # Second path: the betas telescope back to alpha_bar(t) / alpha_bar(0) wherever the cap is not hit.
    cumulative = np.cumprod(1 - betas)
    np.testing.assert_allclose(cumulative[:-1], alpha_bar(i[1:] / steps) / alpha_bar(0.0), rtol=1e-10)
    spaced = create_diffusion("", noise_schedule="cosine", diffusion_steps=steps)
    np.testing.assert_allclose(spaced.alphas_cumprod, cumulative, rtol=1e-12)


# ---------------------------------------------------------------- forward process

def test_q_sample_matches_closed_form():
    diffusion = create_diffusion("")
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, 4, generator=generator)
    noise = torch.randn(5, 3, 4, 4, generator=generator)
    t = torch.tensor([0, 1, 100, 500, 999])
    tn = t.numpy()
    expected = np.sqrt(per_sample(ABAR, tn)) * f64(x0) + np.sqrt(1 - per_sample(ABAR, tn)) * f64(noise)
    np.testing.assert_allclose(f64(diffusion.q_sample(x0, t, noise=noise)), expected, rtol=1e-6, atol=1e-6)
    mean, variance, log_variance = diffusion.q_mean_variance(x0, t)
    np.testing.assert_allclose(f64(mean), np.sqrt(per_sample(ABAR, tn)) * f64(x0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(f64(variance), np.broadcast_to(1 - per_sample(ABAR, tn), x0.shape), rtol=1e-6)
    np.testing.assert_allclose(f64(log_variance), np.broadcast_to(np.log(1 - per_sample(ABAR, tn)), x0.shape),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.q_sample(x0, t, noise=noise[:, :2])


@pytest.mark.parametrize("step", [50, 300, 900])
def test_q_sample_statistics(step):
    diffusion = create_diffusion("")
    n = 200_000
    x0 = torch.tensor([-1.0, 0.2, 0.8]).expand(n, 3).contiguous()
    torch.manual_seed(step)
    x_t = f64(diffusion.q_sample(x0, torch.full((n,), step)))
    abar = ABAR[step]
    expected_mean, expected_var = np.sqrt(abar) * np.array([-1.0, 0.2, 0.8]), 1 - abar
    # five standard errors of the sample mean and the sample variance
    np.testing.assert_allclose(x_t.mean(0), expected_mean, atol=5 * np.sqrt(expected_var / n))
    np.testing.assert_allclose(x_t.var(0), expected_var, atol=5 * expected_var * np.sqrt(2 / (n - 1)))


def test_q_posterior_closed_form_and_bayes_rule():
    diffusion = create_diffusion("")
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 2, 3, 3, generator=generator)
    x_t = torch.randn(6, 2, 3, 3, generator=generator)
    t = torch.tensor([0, 1, 2, 100, 500, 999])
    tn = t.numpy()
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x0, x_t, t)

    # DDPM Eq. 7
    beta, alpha, abar, abar_prev = (per_sample(a, tn) for a in (BETAS, ALPHAS, ABAR, ABAR_PREV))
    eq7_mean = ((np.sqrt(abar_prev) * beta / (1 - abar)) * f64(x0)
                + (np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * f64(x_t))
    eq7_var = (1 - abar_prev) / (1 - abar) * beta
    np.testing.assert_allclose(f64(mean), eq7_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(variance), np.broadcast_to(eq7_var, x0.shape), rtol=1e-5, atol=0)
    assert torch.all(variance[0] == 0)  # at t = 0 the posterior is a point mass at x0
    np.testing.assert_allclose(f64(mean[0]), f64(x0[0]), rtol=1e-6, atol=1e-6)
    # The log-variance is clipped to its t = 1 value at t = 0 and exact elsewhere.
    np.testing.assert_allclose(f64(log_variance[1:]), np.broadcast_to(np.log(eq7_var[1:]), x0[1:].shape), rtol=1e-5)
    np.testing.assert_allclose(f64(log_variance[0]), np.full(x0[0].shape, np.log(POSTERIOR_VAR[1])), rtol=1e-5)

    # Second path (t >= 1): Bayes' rule of q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t) as a function of
    # x_{t-1} and the prior q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x_0, 1 - abar_{t-1}): precisions add,
    # means combine weighted by precision.
    likelihood_precision, likelihood_mean = alpha / beta, f64(x_t) / np.sqrt(alpha)
    prior_precision, prior_mean = 1 / (1 - abar_prev[1:]), np.sqrt(abar_prev[1:]) * f64(x0[1:])
    bayes_var = 1 / (likelihood_precision[1:] + prior_precision)
    bayes_mean = bayes_var * (likelihood_precision[1:] * likelihood_mean[1:] + prior_precision * prior_mean)
    np.testing.assert_allclose(f64(mean[1:]), bayes_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(variance[1:]), np.broadcast_to(bayes_var, x0[1:].shape), rtol=1e-5)


# ---------------------------------------------------------------- Gaussian helpers

def test_normal_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(2)
    mean1 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    mean2 = torch.randn(5, generator=generator, dtype=torch.float64)
    logvar1 = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    logvar2 = torch.randn(4, 1, generator=generator, dtype=torch.float64)
    kl = normal_kl(mean1, logvar1, mean2, logvar2)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean1, torch.exp(0.5 * logvar1)),
                                                 torch.distributions.Normal(mean2, torch.exp(0.5 * logvar2)))
    assert kl.shape == (4, 5)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normal_kl(mean1, logvar1, mean1, logvar1), torch.zeros_like(mean1), rtol=0, atol=1e-15)


def tanh_cdf(z):
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def exact_discretized_log_likelihood(x, mean, scale, cdf):
    """log P(x's bin) for 256 bins of width 2/255 on [-1, 1], the edge bins open to -inf and +inf (float64)."""
    upper, lower = (x + 1 / 255 - mean) / scale, (x - 1 / 255 - mean) / scale
    with np.errstate(divide="ignore"):
        interior = np.log(cdf(upper) - cdf(lower))
        return np.where(x < -0.999, np.log(cdf(upper)), np.where(x > 0.999, np.log(1 - cdf(lower)), interior))


def test_tanh_cdf_approximation_is_close_to_the_normal_cdf():
    z = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    np.testing.assert_allclose(f64(approx_standard_normal_cdf(z)), norm.cdf(z.numpy()), atol=2e-4)


@pytest.mark.parametrize("mean, scale", [(0.0, 0.05), (0.3, 0.01), (-0.9, 0.2), (0.99, 0.02), (-1.0, 0.004),
                                         (0.5, 1.0)])
def test_discretized_gaussian_log_likelihood(mean, scale):
    x = np.arange(256) / 255 * 2 - 1  # the 256 bin centres, both edges included
    means, log_scales = np.full(256, mean), np.full(256, np.log(scale))
    ours = f64(discretized_gaussian_log_likelihood(torch.from_numpy(x), means=torch.from_numpy(means),
                                                   log_scales=torch.from_numpy(log_scales)))
    exact = exact_discretized_log_likelihood(x, mean, scale, norm.cdf)
    exact[0], exact[-1] = norm.logcdf((x[0] + 1 / 255 - mean) / scale), norm.logsf((x[-1] - 1 / 255 - mean) / scale)
    # The bin probabilities agree to the tanh approximation's error everywhere, ...
    np.testing.assert_allclose(np.exp(ours), np.exp(exact), rtol=0, atol=5e-4)
    # ... and relatively (in log space) where the bin holds real mass; the edge bins go to -inf / +inf.
    bulk = np.exp(exact) > 0.05
    assert bulk.any()
    np.testing.assert_allclose(ours[bulk], exact[bulk], rtol=0, atol=1e-2)
    # The same formula with the tanh CDF written here agrees closely where the bin is not far in the tails (there
    # the CDF difference cancels and then the 1e-12 clamp takes over).
    with_tanh = exact_discretized_log_likelihood(x, mean, scale, tanh_cdf)
    not_tails = np.isfinite(with_tanh) & (with_tanh > np.log(1e-6))
    np.testing.assert_allclose(ours[not_tails], with_tanh[not_tails], rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="shapes differ"):
        discretized_gaussian_log_likelihood(torch.zeros(3), means=torch.zeros(2), log_scales=torch.zeros(3))


def test_discretized_likelihood_edge_bins_take_the_tails():
    # A Gaussian centred far outside [-1, 1] puts almost all its mass in the nearest edge bin.
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    for centre, edge in [(-3.0, 0), (3.0, 1)]:
        ll = discretized_gaussian_log_likelihood(x, means=torch.full((2,), centre, dtype=torch.float64),
                                                 log_scales=torch.zeros(2, dtype=torch.float64))
        expected = norm.logcdf(-1 + 1 / 255 - centre) if edge == 0 else norm.logsf(1 - 1 / 255 - centre)
        assert abs(ll[edge].item() - expected) < 1e-3


# ---------------------------------------------------------------- p_mean_variance

def reference_p_mean_variance(var_type, mean_type, x, t, output, clip):
    """float64 closed forms: x_0 from eps (DDPM Eq. 15), the posterior mean (Eq. 7), the variance of each type."""
    x, output = f64(x), f64(output)
    C = x.shape[1]
    abar, beta = per_sample(ABAR, t), per_sample(BETAS, t)
    if var_type == gd.ModelVarType.LEARNED_RANGE:
        output, v = output[:, :C], output[:, C:]
        frac = (v + 1) / 2  # improved DDPM Eq. 15: v in [-1, 1] interpolates log beta~_t .. log beta_t
        log_variance = frac * np.log(beta) + (1 - frac) * per_sample(LOG_POSTERIOR_VAR_CLIPPED, t)
    elif var_type == gd.ModelVarType.FIXED_LARGE:
        large = np.concatenate([[POSTERIOR_VAR[1]], BETAS[1:]])
        log_variance = np.broadcast_to(np.log(per_sample(large, t)), x.shape)
    else:  # the variance is beta~_t (0 at t = 0); its log is clipped to the t = 1 value
        log_variance = np.broadcast_to(per_sample(LOG_POSTERIOR_VAR_CLIPPED, t), x.shape)
        variance = np.broadcast_to(per_sample(POSTERIOR_VAR, t), x.shape)
    if mean_type == gd.ModelMeanType.EPSILON:
        pred_xstart = x / np.sqrt(abar) - np.sqrt(1 / abar - 1) * output
    else:
        pred_xstart = output
    if clip:
        pred_xstart = np.clip(pred_xstart, -1, 1)
    abar_prev, alpha = per_sample(ABAR_PREV, t), per_sample(ALPHAS, t)
    mean = (np.sqrt(abar_prev) * beta / (1 - abar)) * pred_xstart + (np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * x
    if var_type != gd.ModelVarType.FIXED_SMALL:
        variance = np.exp(log_variance)
    return mean, variance, log_variance, pred_xstart


def fixed_model_output(channels, learned, seed=3, batch=5):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, 4, 4, generator=generator)
    eps = torch.randn(batch, channels, 4, 4, generator=generator)
    if learned:
        v = torch.rand(batch, channels, 4, 4, generator=generator) * 2 - 1
        return x, torch.cat([eps, v], dim=1)
    return x, eps


@pytest.mark.parametrize("var_type", [gd.ModelVarType.LEARNED_RANGE, gd.ModelVarType.FIXED_LARGE,
                                      gd.ModelVarType.FIXED_SMALL])
@pytest.mark.parametrize("mean_type", [gd.ModelMeanType.EPSILON, gd.ModelMeanType.START_X])
@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_closed_forms(var_type, mean_type, clip):
    learned = var_type == gd.ModelVarType.LEARNED_RANGE
    x, output = fixed_model_output(2, learned)
    t = torch.tensor([0, 1, 40, 500, 999])
    out = diffusion_of(var_type, mean_type).p_mean_variance(constant_model(output), x, t, clip_denoised=clip)
    mean, variance, log_variance, pred_xstart = reference_p_mean_variance(var_type, mean_type, x, t.numpy(), output,
                                                                         clip)
    np.testing.assert_allclose(f64(out["pred_xstart"]), pred_xstart, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(out["mean"]), mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(out["log_variance"]), log_variance, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f64(out["variance"]), variance, rtol=1e-5, atol=0)
    assert out["extra"] is None


def test_p_mean_variance_returns_extra_and_checks_shapes():
    x, output = fixed_model_output(2, learned=True)
    diffusion = diffusion_of(gd.ModelVarType.LEARNED_RANGE)
    t = torch.tensor([0, 1, 2, 3, 4])
    out = diffusion.p_mean_variance(lambda x, t: (output, "features"), x, t)
    assert out["extra"] == "features"
    with pytest.raises(ValueError, match="learn_sigma=True"):
        diffusion.p_mean_variance(constant_model(output[:, :2]), x, t)
    with pytest.raises(ValueError, match="t must have shape"):
        diffusion.p_mean_variance(constant_model(output), x, t[:3])


def test_spaced_p_mean_variance_uses_spaced_schedule():
    # On a respaced diffusion the same closed forms hold with the respaced alpha_bar.
    diffusion = create_diffusion("10", learn_sigma=False)
    x, output = fixed_model_output(2, learned=False)
    t = torch.tensor([0, 1, 5, 8, 9])
    out = diffusion.p_mean_variance(constant_model(output), x, t, clip_denoised=False)
    abar = diffusion.alphas_cumprod[t.numpy()].reshape(-1, 1, 1, 1)
    kept = np.array(sorted(space_timesteps(1000, "10")))
    np.testing.assert_allclose(diffusion.alphas_cumprod, ABAR[kept], rtol=1e-12)
    pred_xstart = f64(x) / np.sqrt(abar) - np.sqrt(1 / abar - 1) * f64(output)
    np.testing.assert_allclose(f64(out["pred_xstart"]), pred_xstart, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- temperature

def test_temperature():
    x, output = fixed_model_output(2, learned=True)
    t = torch.tensor([0, 1, 40, 500, 999])
    for var_type, mean_type in [(gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON),
                                (gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.START_X),
                                (gd.ModelVarType.FIXED_LARGE, gd.ModelMeanType.EPSILON)]:
        diffusion = diffusion_of(var_type, mean_type)
        model_output = output if var_type == gd.ModelVarType.LEARNED_RANGE else output[:, :2]
        default = diffusion.p_mean_variance(constant_model(model_output), x, t)
        at_one = diffusion.p_mean_variance(constant_model(model_output), x, t, temperature=1.0)
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            assert torch.equal(default[key], at_one[key]), f"temperature=1.0 changed {key}"
        for temperature in (0.5, 2.0):
            tempered = diffusion.p_mean_variance(constant_model(model_output), x, t, temperature=temperature)
            divided = diffusion.p_mean_variance(constant_model(model_output / temperature), x, t)
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                torch.testing.assert_close(tempered[key], divided[key], rtol=1e-6, atol=1e-6,
                                           msg=f"temperature {temperature}: {key} is not the output divided by T")
            if var_type == gd.ModelVarType.FIXED_LARGE:  # fixed variances do not depend on the output
                assert torch.equal(tempered["log_variance"], default["log_variance"])

    # T > 1 pulls the learned log-variance towards the midpoint of [log beta~_t, log beta_t], T < 1 pushes it out.
    diffusion = diffusion_of(gd.ModelVarType.LEARNED_RANGE)
    t = torch.tensor([1, 2, 10, 40])  # early steps, where log beta~_t and log beta_t are far apart
    x, output = x[:4], output[:4]
    midpoint = torch.from_numpy((np.log(per_sample(BETAS, t.numpy())) + per_sample(LOG_POSTERIOR_VAR_CLIPPED,
                                                                                  t.numpy())) / 2).float()
    distance = {temperature: (diffusion.p_mean_variance(constant_model(output), x, t, temperature=temperature)
                              ["log_variance"] - midpoint).abs() for temperature in (0.5, 1.0, 3.0)}
    moved = distance[1.0] > 1e-3
    assert moved.float().mean() > 0.5
    assert torch.all(distance[3.0][moved] < distance[1.0][moved])
    assert torch.all(distance[0.5][moved] > distance[1.0][moved])
    torch.testing.assert_close(distance[3.0], distance[1.0] / 3.0, rtol=1e-4, atol=1e-6)

    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            diffusion.p_mean_variance(constant_model(output), x, t, temperature=temperature)


# ---------------------------------------------------------------- training losses

def test_training_losses_hybrid_terms_and_gradients():
    diffusion = create_diffusion("")
    generator = torch.Generator().manual_seed(4)
    C = 2
    x0 = (torch.randint(0, 256, (4, C, 4, 4), generator=generator) / 255.0 * 2 - 1).float()
    noise = torch.randn(4, C, 4, 4, generator=generator)
    output = torch.cat([torch.randn(4, C, 4, 4, generator=generator),
                        torch.rand(4, C, 4, 4, generator=generator) * 2 - 1], dim=1).requires_grad_(True)
    t = torch.tensor([0, 1, 200, 999])
    calls = []
    terms = diffusion.training_losses(lambda x_t, ts, **kw: calls.append(ts) or output, x0, t, noise=noise)
    assert len(calls) == 1 and calls[0].tolist() == t.tolist()  # one forward pass

    # mse = mean((eps - model_eps)^2), by hand
    np.testing.assert_allclose(f64(terms["mse"]), ((f64(noise) - f64(output[:, :C])) ** 2).mean(axis=(1, 2, 3)),
                               rtol=1e-6)
    assert torch.equal(terms["loss"], terms["mse"] + terms["vb"])

    # vb: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits for t > 0 and the decoder NLL at t = 0 (float64)
    tn = t.numpy()
    x_t = np.sqrt(per_sample(ABAR, tn)) * f64(x0) + np.sqrt(1 - per_sample(ABAR, tn)) * f64(noise)
    mean, _, log_variance, _ = reference_p_mean_variance(gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON,
                                                      torch.from_numpy(x_t), tn, output, clip=False)
    beta, alpha, abar, abar_prev = (per_sample(a, tn) for a in (BETAS, ALPHAS, ABAR, ABAR_PREV))
    true_mean = ((np.sqrt(abar_prev) * beta / (1 - abar)) * f64(x0)
                 + (np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * x_t)
    true_std = np.exp(0.5 * np.broadcast_to(per_sample(LOG_POSTERIOR_VAR_CLIPPED, tn), x_t.shape))
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.from_numpy(true_mean), torch.from_numpy(true_std.copy())),
        torch.distributions.Normal(torch.from_numpy(mean), torch.from_numpy(np.exp(0.5 * log_variance)))).numpy()
    kl_bits = kl.mean(axis=(1, 2, 3)) / math.log(2)
    decoder_nll_bits = -exact_discretized_log_likelihood(f64(x0), mean, np.exp(0.5 * log_variance),
                                                         tanh_cdf).mean(axis=(1, 2, 3)) / math.log(2)
    np.testing.assert_allclose(f64(terms["vb"][1:]), kl_bits[1:], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(terms["vb"][:1]), decoder_nll_bits[:1], rtol=1e-4, atol=1e-6,
                               err_msg="at t = 0 the vb term must be the decoder NLL")

    # The bound trains only the variance: no gradient reaches the mean channels; the mse reaches only them.
    (vb_grad,) = torch.autograd.grad(terms["vb"].sum(), output, retain_graph=True)
    assert torch.all(vb_grad[:, :C] == 0), "the vb term's gradient flows into the mean channels"
    assert torch.all(vb_grad[:, C:].abs().sum(dim=(1, 2, 3)) > 0)
    (mse_grad,) = torch.autograd.grad(terms["mse"].sum(), output)
    assert torch.all(mse_grad[:, C:] == 0) and torch.all(mse_grad[:, :C].abs().sum(dim=(1, 2, 3)) > 0)


def test_training_loss_variants():
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(3, 1, 4, 4, generator=generator) * 2 - 1
    noise = torch.randn(3, 1, 4, 4, generator=generator)
    output = torch.randn(3, 2, 4, 4, generator=generator)
    t = torch.tensor([0, 3, 9])
    model = constant_model(output)
    base = create_diffusion("10").training_losses(model, x0, t, noise=noise)
    rescaled = create_diffusion("10", rescale_learned_sigmas=True).training_losses(model, x0, t, noise=noise)
    kl = create_diffusion("10", use_kl=True).training_losses(model, x0, t, noise=noise)
    torch.testing.assert_close(rescaled["vb"], base["vb"] * 10 / 1000)  # the bound's scale for 1000 steps
    torch.testing.assert_close(rescaled["mse"], base["mse"])
    assert set(kl) == {"loss"}
    torch.testing.assert_close(kl["loss"], base["vb"] * 10)  # RESCALED_KL: the bound times num_timesteps
    # without learned sigma: the plain noise MSE; with predict_xstart the target is x0
    eps_only = create_diffusion("10", learn_sigma=False).training_losses(constant_model(output[:, :1]), x0, t,
                                                                       noise=noise)
    assert "vb" not in eps_only
    torch.testing.assert_close(eps_only["loss"], ((noise - output[:, :1]) ** 2).mean(dim=(1, 2, 3)))
    x0_pred = create_diffusion("10", learn_sigma=False, predict_xstart=True).training_losses(
        constant_model(output[:, :1]), x0, t, noise=noise)
    torch.testing.assert_close(x0_pred["loss"], ((x0 - output[:, :1]) ** 2).mean(dim=(1, 2, 3)))
    with pytest.raises(ValueError, match="must output 2 channels"):
        create_diffusion("10").training_losses(constant_model(output[:, :1]), x0, t, noise=noise)


# ---------------------------------------------------------------- respacing

def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and 0 in steps and 999 in steps
    assert space_timesteps(1000, [1000]) == set(range(1000))
    assert space_timesteps(1000, "1") == {0}

    # "10,15,20": three sections of 334, 333, 333 steps (the remainder goes to the first), each evenly strided
    # from its first to its last step.
    steps = sorted(space_timesteps(1000, "10,15,20"))
    assert len(steps) == 45
    sections = [(0, 334, 10), (334, 667, 15), (667, 1000, 20)]
    for start, end, count in sections:
        inside = [s for s in steps if start <= s < end]
        assert len(inside) == count
        assert inside[0] == start and inside[-1] == end - 1
        np.testing.assert_array_equal(inside, np.round(np.linspace(start, end - 1, count) + 1e-9).astype(int))
    assert space_timesteps(1000, "10,15,20") == space_timesteps(1000, [10, 15, 20])

    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot divide"):
        space_timesteps(10, "20")


@pytest.mark.parametrize("respacing", ["250", "ddim50", "10,15,20"])
def test_spaced_diffusion_keeps_alpha_bar_and_calls_model_with_original_timesteps(respacing):
    diffusion = create_diffusion(respacing, learn_sigma=False)
    kept = np.array(sorted(space_timesteps(1000, respacing)))
    assert diffusion.num_timesteps == len(kept) and diffusion.timestep_map == kept.tolist()
    np.testing.assert_allclose(diffusion.alphas_cumprod, ABAR[kept], rtol=1e-13, atol=0)

    seen = []

    def recording_model(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    noise = torch.randn(2, 1, 2, 2)
    diffusion.ddim_sample_loop(recording_model, (2, 1, 2, 2), noise=noise)
    assert [s.tolist() for s in seen] == [[int(k)] * 2 for k in kept[::-1]]
    assert all(s.dtype == torch.long for s in seen)
    seen.clear()
    diffusion.training_losses(recording_model, noise, torch.tensor([0, len(kept) - 1]))
    assert seen[0].tolist() == [0, int(kept[-1])]


# ---------------------------------------------------------------- samplers

def linear_model(seed=6, channels=2):
    """A fixed, deterministic stand-in for a network: eps = W x + b(t)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(channels, channels, generator=generator) * 0.3
    return lambda x, t: torch.einsum("dc,nchw->ndhw", weight, x) + (t.float() / 1000).view(-1, 1, 1, 1)


def oracle_model(x0, base_alphas_cumprod):
    """Returns the true eps for a known x0: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), t the original step."""
    def model(x_t, t):
        abar = torch.from_numpy(base_alphas_cumprod[t.numpy()]).view(-1, 1, 1, 1)
        return ((x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt()).float()
    return model


def test_ddim_eta0_is_deterministic():
    diffusion = create_diffusion("ddim10", learn_sigma=False)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    first = diffusion.ddim_sample_loop(linear_model(), noise.shape, noise=noise, eta=0.0)
    torch.manual_seed(2)
    second = diffusion.ddim_sample_loop(linear_model(), noise.shape, noise=noise.clone(), eta=0.0)
    assert torch.equal(first, second)
    other = diffusion.ddim_sample_loop(linear_model(), noise.shape, noise=noise + 0.1, eta=0.0)
    assert not torch.allclose(first, other)
    torch.manual_seed(1)
    stochastic_a = diffusion.ddim_sample_loop(linear_model(), noise.shape, noise=noise, eta=1.0)
    torch.manual_seed(2)
    stochastic_b = diffusion.ddim_sample_loop(linear_model(), noise.shape, noise=noise, eta=1.0)
    assert not torch.allclose(stochastic_a, stochastic_b)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_with_perfect_oracle_recovers_x0(eta):
    diffusion = create_diffusion("ddim20", learn_sigma=False)
    x0 = torch.rand(2, 2, 4, 4, generator=torch.Generator().manual_seed(7)) * 1.8 - 0.9
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    sample = diffusion.ddim_sample_loop(oracle_model(x0, ABAR), x0.shape, noise=noise, eta=eta)
    torch.testing.assert_close(sample, x0, rtol=0, atol=1e-4)
    # Every step predicts x0 exactly; with eta=0 the path is the closed-form DDIM trajectory of a point mass:
    # x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps_T with the eps of the starting noise kept throughout.
    steps = list(diffusion.ddim_sample_loop_progressive(oracle_model(x0, ABAR), x0.shape, noise=noise, eta=eta))
    kept = diffusion.timestep_map
    eps_T = (f64(noise) - np.sqrt(ABAR[kept[-1]]) * f64(x0)) / np.sqrt(1 - ABAR[kept[-1]])
    for i, step in zip(range(len(kept) - 1, -1, -1), steps):
        torch.testing.assert_close(step["pred_xstart"], x0, rtol=0, atol=1e-4, msg=f"step {i}")
        if eta == 0.0 and i > 0:
            abar_prev = ABAR[kept[i - 1]]
            expected = np.sqrt(abar_prev) * f64(x0) + np.sqrt(1 - abar_prev) * eps_T
            np.testing.assert_allclose(f64(step["sample"]), expected, rtol=0, atol=1e-4, err_msg=f"step {i}")


def test_ddpm_with_perfect_oracle_recovers_x0():
    diffusion = create_diffusion("25", learn_sigma=False)
    x0 = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(9)) * 1.8 - 0.9
    torch.manual_seed(0)
    sample = diffusion.p_sample_loop(oracle_model(x0, ABAR), x0.shape, device="cpu")
    torch.testing.assert_close(sample, x0, rtol=0, atol=1e-4)
    steps = list(diffusion.p_sample_loop_progressive(oracle_model(x0, ABAR), x0.shape, device="cpu"))
    assert len(steps) == 25
    for step in steps:
        torch.testing.assert_close(step["pred_xstart"], x0, rtol=0, atol=1e-4)


def test_ddim_step_matches_song_eq12():
    diffusion = create_diffusion("ddim10", learn_sigma=False)
    base_model = linear_model()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(10))
    t = torch.tensor([9, 4, 1])
    eta = 0.5
    torch.manual_seed(11)
    out = diffusion.ddim_sample(base_model, x, t, clip_denoised=False, eta=eta)
    torch.manual_seed(11)
    z = f64(torch.randn_like(x))

    original_t = torch.tensor(diffusion.timestep_map)[t]
    eps = f64(base_model(x, original_t))
    abar = per_sample(diffusion.alphas_cumprod, t.numpy())
    abar_prev = per_sample(diffusion.alphas_cumprod_prev, t.numpy())
    pred_x0 = (f64(x) - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))  # Song et al. Eq. 16
    expected = np.sqrt(abar_prev) * pred_x0 + np.sqrt(1 - abar_prev - sigma ** 2) * eps + sigma * z  # Eq. 12
    np.testing.assert_allclose(f64(out["pred_xstart"]), pred_x0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(out["sample"]), expected, rtol=1e-5, atol=1e-5)


def test_p_sample_step_adds_scaled_noise_except_at_t0():
    diffusion = create_diffusion("10", learn_sigma=False)
    model = linear_model()
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(12))
    t = torch.tensor([5, 0])
    torch.manual_seed(13)
    out = diffusion.p_sample(model, x, t)
    torch.manual_seed(13)
    z = torch.randn_like(x)
    stats = diffusion.p_mean_variance(model, x, t)
    torch.testing.assert_close(out["sample"][0], stats["mean"][0] + torch.exp(0.5 * stats["log_variance"][0]) * z[0])
    torch.testing.assert_close(out["sample"][1], stats["mean"][1])  # no noise on the last step


def test_sample_loops_reproducible_and_check_noise_shape():
    diffusion = create_diffusion("10", learn_sigma=False)
    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(14))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(diffusion.p_sample_loop(linear_model(), noise.shape, noise=noise, clip_denoised=False))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    torch.manual_seed(3)
    progressive = list(diffusion.p_sample_loop_progressive(linear_model(), noise.shape, noise=noise,
                                                           clip_denoised=False))
    assert len(progressive) == 10 and torch.equal(progressive[-1]["sample"], runs[0])
    for loop in (diffusion.p_sample_loop, diffusion.ddim_sample_loop):
        with pytest.raises(ValueError, match="initial noise has shape"):
            loop(linear_model(), (2, 2, 4, 4), noise=torch.randn(2, 2, 4, 5))
        assert loop(linear_model(), (2, 2, 4, 4), device="cpu").shape == (2, 2, 4, 4)


# ---------------------------------------------------------------- create_diffusion

@pytest.mark.parametrize("kwargs, var_type, mean_type, loss_type", [
    ({}, gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON, gd.LossType.MSE),
    (dict(learn_sigma=False), gd.ModelVarType.FIXED_LARGE, gd.ModelMeanType.EPSILON, gd.LossType.MSE),
    (dict(learn_sigma=False, sigma_small=True), gd.ModelVarType.FIXED_SMALL, gd.ModelMeanType.EPSILON,
     gd.LossType.MSE),
    (dict(sigma_small=True), gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON, gd.LossType.MSE),
    (dict(use_kl=True), gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON, gd.LossType.RESCALED_KL),
    (dict(rescale_learned_sigmas=True), gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON,
     gd.LossType.RESCALED_MSE),
    (dict(use_kl=True, rescale_learned_sigmas=True), gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.EPSILON,
     gd.LossType.RESCALED_KL),
    (dict(predict_xstart=True), gd.ModelVarType.LEARNED_RANGE, gd.ModelMeanType.START_X, gd.LossType.MSE),
])
def test_create_diffusion_types(kwargs, var_type, mean_type, loss_type):
    diffusion = create_diffusion("", **kwargs)
    assert isinstance(diffusion, SpacedDiffusion)
    assert (diffusion.model_var_type, diffusion.model_mean_type, diffusion.loss_type) == (var_type, mean_type,
                                                                                          loss_type)
    assert diffusion.num_timesteps == 1000


def test_create_diffusion_steps_and_schedule():
    for respacing in (None, ""):
        diffusion = create_diffusion(respacing, diffusion_steps=500)
        assert diffusion.num_timesteps == 500 and diffusion.original_num_steps == 500
        np.testing.assert_allclose(diffusion.betas, np.linspace(1e-4, 0.02, 500) * 2, rtol=1e-12)
    diffusion = create_diffusion("ddim50", diffusion_steps=500)
    assert diffusion.timestep_map == list(range(0, 500, 10))
    diffusion = create_diffusion("", noise_schedule="cosine")
    np.testing.assert_allclose(diffusion.betas, gd.get_named_beta_schedule("cosine", 1000), rtol=1e-10)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        create_diffusion("", noise_schedule="quadratic")
