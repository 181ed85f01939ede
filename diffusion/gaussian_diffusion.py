"""Gaussian diffusion: schedules, the forward process, the learned reverse process, losses and samplers.

Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (improved DDPM: learned variance, cosine schedule), Song et al. 2021
(DDIM). Behaviour and call signatures follow the diffusion code of the original DiT release, so the same model and
noise give the same losses and samples. Addition: p_mean_variance(..., temperature) for output-distribution
distillation and tempered sampling.
"""
import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .diffusion_utils import discretized_gaussian_log_likelihood, normal_kl


def mean_flat(tensor):
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


class ModelMeanType(enum.Enum):
    START_X = enum.auto()  # the model predicts x_0
    EPSILON = enum.auto()  # the model predicts the noise


class ModelVarType(enum.Enum):
    LEARNED = enum.auto()  # the model outputs log-variance directly
    FIXED_SMALL = enum.auto()  # posterior variance beta~_t
    FIXED_LARGE = enum.auto()  # beta_t (with beta~_1 at t = 0)
    LEARNED_RANGE = enum.auto()  # interpolation between beta~_t and beta_t in log space (improved DDPM, Eq. 15)


class LossType(enum.Enum):
    MSE = enum.auto()  # simple loss, plus the variational bound when the variance is learned
    RESCALED_MSE = enum.auto()  # as MSE, with the bound scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational lower bound
    RESCALED_KL = enum.auto()  # the bound times num_timesteps

    def is_vb(self):
        return self in (LossType.KL, LossType.RESCALED_KL)


def get_named_beta_schedule(schedule_name, num_diffusion_timesteps):
    """Betas (float64, length num_diffusion_timesteps) for 'linear' (DDPM, rescaled to the step count) or 'cosine'."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps  # keeps the schedule's shape for other step counts
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if schedule_name == "cosine":
        # Nichol & Dhariwal 2021, Eq. 17 with s = 0.008.
        return betas_for_alpha_bar(num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown noise schedule {schedule_name!r}; use 'linear' or 'cosine'")


def betas_for_alpha_bar(num_diffusion_timesteps, alpha_bar, max_beta=0.999):
    """Discretise a continuous alpha_bar(t), t in [0, 1], into betas capped at max_beta."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas, dtype=np.float64)


class GaussianDiffusion:
    """The diffusion process for a given beta schedule. Coefficients are float64 numpy arrays indexed by t."""

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type):
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0), DDPM Eq. 6-7
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; the log is clipped to its value at t = 1.
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1 else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------ forward process

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start, t, noise=None):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM Eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        return (_extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM Eq. 6-7)."""
        mean = (_extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance_clipped

    # ------------------------------------------------------------------ reverse process

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, temperature=1.0):
        """Apply the model to get p(x_{t-1} | x_t) and the prediction of x_0.

        temperature: the model output is divided by it before the mean and variance are formed (the method's
        temperature scaling). temperature=1 gives exactly the untempered result. For T != 1, with an
        epsilon-predicting model:
        - the predicted noise becomes eps / T, so pred_xstart = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps / T:
          T > 1 removes less noise (a softer, closer-to-x_t estimate), T < 1 removes more;
        - the mean is the posterior mean q(x_{t-1} | x_t, pred_xstart) of that estimate, so it moves linearly with
          1/T: mean = coef1 pred_xstart + coef2 x_t;
        - a learned (LEARNED_RANGE) variance v in [-1, 1] becomes v / T, so T > 1 pulls the log-variance towards
          the midpoint of [log beta~_t, log beta_t] and T < 1 pushes it towards the ends; a LEARNED log-variance is
          divided by T (T > 1 moves the variance towards 1); fixed variances are unchanged.
        An x_0-predicting model (START_X) has its x_0 divided by T instead of its noise.
        Clipping (clip_denoised) is applied after the temperature.

        Returns a dict with 'mean', 'variance', 'log_variance', 'pred_xstart' and 'extra' (anything the model returned
        beside its output, else None).
        """
        if model_kwargs is None:
            model_kwargs = {}
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        B, C = x.shape[:2]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        model_output = model(x, t, **model_kwargs)
        extra = None
        if isinstance(model_output, tuple):
            model_output, extra = model_output
        if temperature != 1.0:
            model_output = model_output / temperature

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            if model_output.shape != (B, C * 2, *x.shape[2:]):
                raise ValueError(f"a learned-variance model must output {C * 2} channels for {C} input channels, "
                                 f"got shape {tuple(model_output.shape)}; build the model with learn_sigma=True")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            if self.model_var_type == ModelVarType.LEARNED:
                model_log_variance = model_var_values
                model_variance = torch.exp(model_log_variance)
            else:
                min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
                max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
                frac = (model_var_values + 1) / 2  # the model's [-1, 1] output mapped to [0, 1]
                model_log_variance = frac * max_log + (1 - frac) * min_log
                model_variance = torch.exp(model_log_variance)
        else:
            model_variance, model_log_variance = {
                # beta_t, with beta~_1 at t = 0 so that the decoder's log-variance is finite.
                ModelVarType.FIXED_LARGE: (np.append(self.posterior_variance[1], self.betas[1:]),
                                           np.log(np.append(self.posterior_variance[1], self.betas[1:]))),
                ModelVarType.FIXED_SMALL: (self.posterior_variance, self.posterior_log_variance_clipped),
            }[self.model_var_type]
            model_variance = _extract_into_tensor(model_variance, t, x.shape)
            model_log_variance = _extract_into_tensor(model_log_variance, t, x.shape)

        def process_xstart(x_0):
            if denoised_fn is not None:
                x_0 = denoised_fn(x_0)
            return x_0.clamp(-1, 1) if clip_denoised else x_0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        else:
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {"mean": model_mean, "variance": model_variance, "log_variance": model_log_variance,
                "pred_xstart": pred_xstart, "extra": extra}

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return ((_extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart)
                / _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape))

    def condition_mean(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Shift the mean by variance * grad log p(y | x_t) (Dhariwal & Nichol 2021, Algorithm 1)."""
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].float() + p_mean_var["variance"] * gradient.float()

    def condition_score(self, cond_fn, p_mean_var, x, t, model_kwargs=None):
        """Score-based conditioning for DDIM (Dhariwal & Nichol 2021, Algorithm 2)."""
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - (1 - alpha_bar).sqrt() * cond_fn(x, t, **(model_kwargs or {}))
        out = p_mean_var.copy()
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # ------------------------------------------------------------------ ancestral (DDPM) sampling

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                 temperature=1.0):
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2). Returns {'sample', 'pred_xstart'}."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs, temperature=temperature)
        noise = torch.randn_like(x)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise at t == 0
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                      model_kwargs=None, device=None, progress=False, temperature=1.0):
        """Generate samples from x_T = noise (or fresh Gaussian noise of `shape`) with every timestep."""
        final = None
        for sample in self.p_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                     denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                     model_kwargs=model_kwargs, device=device, progress=progress,
                                                     temperature=temperature):
            final = sample
        return final["sample"]

    def p_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                                  model_kwargs=None, device=None, progress=False, temperature=1.0):
        """Yield each step's {'sample', 'pred_xstart'} from t = T-1 down to 0."""
        img = self._initial_noise(model, shape, noise, device)
        for i in tqdm(range(self.num_timesteps)[::-1], desc="DDPM", disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                    cond_fn=cond_fn, model_kwargs=model_kwargs, temperature=temperature)
            yield out
            img = out["sample"]

    # ------------------------------------------------------------------ DDIM sampling

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None,
                    eta=0.0, temperature=1.0):
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, Eq. 12; eta=0 is deterministic)."""
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                   model_kwargs=model_kwargs, temperature=temperature)
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from the (possibly clipped) x_0 prediction.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract_into_tensor(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract_into_tensor(self.alphas_cumprod_prev, t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))  # Eq. 16
        noise = torch.randn_like(x)
        mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None,
                         model_kwargs=None, device=None, progress=False, eta=0.0, temperature=1.0):
        """Generate samples with DDIM over this diffusion's timesteps (respace it for fewer steps)."""
        final = None
        for sample in self.ddim_sample_loop_progressive(model, shape, noise=noise, clip_denoised=clip_denoised,
                                                        denoised_fn=denoised_fn, cond_fn=cond_fn,
                                                        model_kwargs=model_kwargs, device=device, progress=progress,
                                                        eta=eta, temperature=temperature):
            final = sample
        return final["sample"]

    def ddim_sample_loop_progressive(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None,
                                     cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0,
                                     temperature=1.0):
        img = self._initial_noise(model, shape, noise, device)
        for i in tqdm(range(self.num_timesteps)[::-1], desc="DDIM", disable=not progress, leave=False):
            t = torch.full((shape[0],), i, device=img.device, dtype=torch.long)
            with torch.no_grad():
                out = self.ddim_sample(model, img, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                                       cond_fn=cond_fn, model_kwargs=model_kwargs, eta=eta, temperature=temperature)
            yield out
            img = out["sample"]

    @staticmethod
    def _initial_noise(model, shape, noise, device):
        if noise is not None:
            if tuple(noise.shape) != tuple(shape):
                raise ValueError(f"initial noise has shape {tuple(noise.shape)}, expected {tuple(shape)}")
            return noise
        if device is None:
            device = next(model.parameters()).device
        return torch.randn(*shape, device=device)

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """One term of the variational bound, in bits per dimension: KL(q || p) for t > 0, the decoder NLL at t = 0."""
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        output = torch.where(t == 0, decoder_nll, kl)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses at timesteps t: a dict with 'loss' and its parts ('mse', 'vb').

        Improved DDPM's hybrid objective (Nichol & Dhariwal 2021, Sec. 3.1): the simple noise MSE plus the variational
        bound, the latter with the mean's gradient stopped so it only trains the variance.
        """
        if model_kwargs is None:
            model_kwargs = {}
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(model=model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False,
                                               model_kwargs=model_kwargs)["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] *= self.num_timesteps
            return terms
        model_output = model(x_t, t, **model_kwargs)
        terms.update(self.hybrid_loss_terms(model_output, x_start, x_t, t, noise))
        return terms

    def hybrid_loss_terms(self, model_output, x_start, x_t, t, noise):
        """The MSE (+ vb) terms for a model output already computed at x_t (training_losses without the forward)."""
        terms = {}
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            B, C = x_t.shape[:2]
            if model_output.shape != (B, C * 2, *x_t.shape[2:]):
                raise ValueError(f"a learned-variance model must output {C * 2} channels, "
                                 f"got shape {tuple(model_output.shape)}")
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            # The bound trains the variance only: the mean's gradient is stopped.
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t,
                                             clip_denoised=False)["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] *= self.num_timesteps / 1000.0  # the bound's scale for 1000 steps
        target = {ModelMeanType.START_X: x_start, ModelMeanType.EPSILON: noise}[self.model_mean_type]
        if model_output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(model_output.shape)} differs from target {tuple(target.shape)}")
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    """Index a float64 numpy array by a batch of timesteps and broadcast to broadcast_shape (as float32)."""
    res = torch.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res.expand(broadcast_shape)
