"""How a DiT samples, in one place: DiT's schedule, classifier-free guidance, every sampler, and the record a
checkpoint keeps of how it samples.

- The schedule: DIFFUSION_STEPS, alpha_sigma, q_sample, ddim_step, and the grids: leading_timesteps (the original
  DiT's "ddimN" respacing), respaced_timesteps (its "N" respacing for DDPM) and trailing_timesteps (few steps).
- The DiT's output: classifier_free_guidance (written once: models.py's forward_with_cfg, model_output and
  export.py's Denoiser call it), model_output, predict_x0_eps / denoise (the eps and x-eps parametrisations), the
  consistency function with LCM's boundary scalings and TCD's trajectory consistency function built on it.
- Rectified flow's straight path x_s = s x + (1 - s) z in DiT's schedule: flow_timestep (the time map), velocity (any
  DiT as a velocity model, v = x_0 - eps) and the flow-euler sampler of reflow and InstaFlow students.
- SamplingSpec: the checkpoint's "sampling" entry as a frozen record, read by SamplingSpec.from_checkpoint_entry
  alone and written back as the same plain dict by to_dict (old checkpoints load, old tools read new ones).
- SAMPLERS: every sampler once, name -> Sampler (the function, what it needs, the step counts it takes, and the
  timesteps it calls the model at), used by sample.py, sample_ddp.py, train.py's sample grids, export.py's
  calibration and dit_pipeline.py; resolve_sampling picks a checkpoint's defaults, check_step_count the counts.
run_exported.py keeps a numpy copy of the schedule and the samplers (a device has no torch there); a test holds the
two equal.

Parametrisation of the progressive and consistency students ("x-eps", Salimans & Ho 2022, Sec. 4 and App. D): the
DiT's two output channel groups become (eps~, x~) and x_0 = sigma_t^2 x~ + alpha_t (x_t - sigma_t eps~). At low
noise this is the usual eps-prediction, at t ~ T it is direct x_0-prediction: well posed at every noise level, where
eps alone divides by alpha_T = 0.006 at DiT's last timestep.
"""
import dataclasses
import functools
from typing import Callable, Collection, Optional, Tuple

import torch
from tqdm.auto import tqdm

from checks import UserError
from diffusion import create_diffusion
from diffusion.gaussian_diffusion import get_named_beta_schedule
from diffusion.respace import space_timesteps

DIFFUSION_STEPS = 1000  # DiT's training schedule (linear betas)
# LCM's boundary scalings (Luo et al. 2023, Sec. 4.2): c_skip = sigma_data^2 / ((s t)^2 + sigma_data^2),
# c_out = s t / sqrt((s t)^2 + sigma_data^2): exactly the identity at t = 0, the model's x_0 soon after.
CONSISTENCY_SIGMA_DATA = 0.5
CONSISTENCY_TIMESTEP_SCALE = 10.0
TCD_GAMMA = 0.3  # the stochasticity of TCD's strategic stochastic sampling (diffusers' TCDScheduler default)

_ALPHA_BAR = torch.from_numpy(get_named_beta_schedule("linear", DIFFUSION_STEPS)).neg().add(1).cumprod(0)
# Index t + 1: position 0 is "t = -1", the clean end of every sampling grid (alpha 1, sigma 0).
_ALPHA_BAR_WITH_CLEAN = torch.cat([torch.ones(1, dtype=torch.float64), _ALPHA_BAR])


#################################################################################
#                          DiT's schedule and its grids                         #
#################################################################################

def alpha_sigma(t, ndim=4):
    """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) for integer t in [-1, 1000), shaped to broadcast."""
    alpha_bar = _ALPHA_BAR_WITH_CLEAN.to(t.device)[t.long() + 1]
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha_bar.sqrt().float().view(shape), (1 - alpha_bar).sqrt().float().view(shape)


def q_sample(x0, t, noise):
    """x_t = alpha_t x_0 + sigma_t eps (DDPM Eq. 4)."""
    alpha, sigma = alpha_sigma(t)
    return alpha * x0 + sigma * noise


def ddim_step(x0, eps, s):
    """DDIM's deterministic update to timestep s (Song et al. 2021, Eq. 12 with eta = 0); s = -1 returns x_0."""
    alpha_s, sigma_s = alpha_sigma(s)
    return alpha_s * x0 + sigma_s * eps


def leading_timesteps(num_steps):
    """The original DiT's "ddimN" grid, from the last visited step down: every (1000 // N)-th timestep from t = 0
    ("leading" spacing), for the counts an integer stride gives exactly (a ValueError otherwise)."""
    return sorted(space_timesteps(DIFFUSION_STEPS, f"ddim{num_steps}"), reverse=True)


def respaced_timesteps(num_steps):
    """The original DiT's "N" respacing for DDPM (improved DDPM, Sec. 4): N steps evenly over [0, 999], high first."""
    return sorted(space_timesteps(DIFFUSION_STEPS, str(num_steps)), reverse=True)


def trailing_timesteps(num_steps, stride=1, num_timesteps=DIFFUSION_STEPS):
    """num_steps timesteps from the last one down, evenly spaced ("trailing", Lin et al. 2024, Sec. 3.3).

    On the grid of every stride-th timestep (stride - 1, 2 * stride - 1, ..., num_timesteps - 1): t_i =
    stride * round(P (N - i) / N) - 1 with P = num_timesteps / stride points, rounded half up in integers. 4 steps:
    999, 749, 499, 249; 1 step: 999. The grid of N / 2 steps is every other point of the grid of N (N a power of 2).
    """
    points = num_timesteps // stride
    if not 1 <= num_steps <= points:
        raise ValueError(f"cannot place {num_steps} steps on a grid of {points} timesteps")
    return [stride * ((points * (num_steps - i) + num_steps // 2) // num_steps) - 1 for i in range(num_steps)]


#################################################################################
#           The DiT's output: guidance, parametrisation, consistency            #
#################################################################################

def unwrap(model):
    """The DiT inside DDP and torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def guided_channels(in_channels, channels=None):
    """How many leading output channels guidance guides: min(3, in_channels) unless `channels` says. The original
    guides 3 of the 4 latent channels (kept for reproducibility); capped so that a 1-channel pixel model never guides
    its variance channel."""
    return min(3, in_channels) if channels is None else channels


def classifier_free_guidance(cond, uncond, w, in_channels, channels=None):
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6): uncond + w (cond - uncond) on the guided_channels, the
    rest (a learned variance) the conditional model's. cond, uncond: (N, C_out, H, W); w: a number or (N,) scales."""
    g = guided_channels(in_channels, channels)
    w = w.float().view(-1, 1, 1, 1) if torch.is_tensor(w) else w
    guided = uncond[:, :g] + w * (cond[:, :g] - uncond[:, :g])
    return torch.cat([guided, cond[:, g:]], dim=1)  # (N, C_out, H, W)


def model_output(model, x_t, t, y, w=None, drop=None, temperature=1.0):
    """The DiT's output at x_t for labels y and guidance scales w (N,) (None: no guidance), divided by temperature.

    A guidance-distilled DiT takes w as its input: one forward. Any other DiT given w runs classifier-free
    guidance on the conditional and the null batch in one forward. drop: (N,) 1 where the label is replaced by the
    null label.
    """
    dit = unwrap(model)
    drop = torch.zeros_like(y) if drop is None else drop  # always given: a DiT in train mode would drop at random
    if dit.w_embedder is not None:
        w = torch.ones(len(x_t), device=x_t.device) if w is None else w
        return model(x_t, t, y, force_drop_ids=drop, w=w) / temperature
    if w is None:
        return model(x_t, t, y, force_drop_ids=drop) / temperature
    null = torch.full_like(y, dit.config["num_classes"])
    out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, null]),
                force_drop_ids=torch.zeros_like(torch.cat([y, y])))  # (2N, C_out, H, W)
    cond, uncond = out.chunk(2)
    return classifier_free_guidance(cond, uncond, w, dit.in_channels) / temperature  # (N, C_out, H, W)


def predict_x0_eps(output, x_t, t, parametrisation, clip=False):
    """(x_0, eps) from a DiT output. clip: clamp x_0 to [-1, 1] (pixels) and re-derive eps from it, as DDIM does."""
    return x0_eps_at(output, x_t, *alpha_sigma(t), parametrisation, clip)


def x0_eps_at(output, x_t, alpha, sigma, parametrisation, clip=False):
    """predict_x0_eps at given alpha, sigma (N, 1, 1, 1) (a straight-path point's, between DiT's timesteps)."""
    C = x_t.shape[1]
    output = output.float()
    if parametrisation == "eps":
        eps = output[:, :C]
        x0 = (x_t - sigma * eps) / alpha
    elif parametrisation == "x-eps":  # Salimans & Ho 2022, App. D: sigma^2 x~ + alpha (x_t - sigma eps~)
        eps_tilde, x_tilde = output[:, :C], output[:, C:2 * C]
        x0 = sigma ** 2 * x_tilde + alpha * (x_t - sigma * eps_tilde)
        eps = None
    else:
        raise ValueError(f"unknown parametrisation {parametrisation!r}")
    if clip:
        x0 = x0.clamp(-1, 1)
    if clip or eps is None:
        eps = (x_t - alpha * x0) / sigma
    return x0, eps


def denoise(model, parametrisation, x_t, t, y, w=None, drop=None, clip=False, temperature=1.0):
    """(x_0, eps) of a DiT at x_t: model_output and predict_x0_eps in one call."""
    return predict_x0_eps(model_output(model, x_t, t, y, w, drop, temperature), x_t, t, parametrisation, clip)


def consistency_function(model, x_t, t, y, w=None, drop=None, clip=False):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x_0(x_t, t) (Song et al. 2023, Eq. 3); f(x, 0) = x exactly."""
    x0, _ = denoise(model, "x-eps", x_t, t, y, w, drop, clip)
    return consistency_boundary(x_t, t, x0)


def consistency_boundary(x_t, t, x0):
    """c_skip(t) x_t + c_out(t) x_0 with LCM's scalings (above): the consistency function from an x_0 estimate."""
    scaled = CONSISTENCY_TIMESTEP_SCALE * t.double().clamp(min=0).view(-1, 1, 1, 1)
    c_skip = CONSISTENCY_SIGMA_DATA ** 2 / (scaled ** 2 + CONSISTENCY_SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + CONSISTENCY_SIGMA_DATA ** 2).sqrt()
    return c_skip.float() * x_t + c_out.float() * x0


def trajectory_jump(x_t, t, s, x0):
    """The first-order trajectory consistency function from an x_0 estimate (Zheng et al. 2024, TCD: the exponential
    integrator's first-order step, x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) x_0 with h = lambda_s -
    lambda_t), i.e. DDIM's x_s = alpha_s x_0 + sigma_s eps(x_t, x_0), written so that s = t gives x_t exactly and
    s = -1 (the clean end) gives x_0 exactly. t, s: (N,) integer timesteps, s <= t."""
    alpha_t, sigma_t = alpha_sigma(t)
    alpha_s, sigma_s = alpha_sigma(s)
    ratio = sigma_s / sigma_t
    return ratio * x_t + (alpha_s - alpha_t * ratio) * x0


def trajectory_consistency_function(model, x_t, t, s, y, w=None, drop=None, clip=False):
    """TCD's f(x_t, t, s): the jump from t to s with the consistency function's x_0 (c_skip x_t + c_out x_0(x_t, t)).
    The identity at s = t (TCD's broadened boundary condition) and the consistency function at s = -1. Departure:
    TCD's x_0 is the model's own (c_skip = 0, c_out = 1); LCM's scalings differ from that by < 1e-5 at every t >= 19
    (the grid points), make f the identity at t = 0 as in our consistency distillation, and make a consistency
    student's f the s = -1 case. clip: x_0 clamped to [-1, 1] (pixels), as consistency_sample does."""
    f = consistency_function(model, x_t, t, y, w, drop, clip)
    return trajectory_jump(x_t, t, s, f.clamp(-1, 1) if clip else f)


def tcd_s(t_next, gamma):
    """TCD's jump target s = floor((1 - gamma) t_next) for the next grid point t_next (0 after the last), rounded in
    float32 as diffusers' TCDScheduler rounds it, so that both pick the same s."""
    return int(torch.floor((1 - gamma) * torch.tensor(t_next)))


def tcd_step(x_t, t, f, t_next, gamma, noise=None):
    """One step of strategic stochastic sampling: the jump from t to s = tcd_s(t_next, gamma) with x_0 = f, then
    forward noise from s to t_next with `noise` (N, C, H, W) (None: the last step, which returns x_s at s = 0)."""
    s = tcd_s(t_next, gamma)
    x_s = trajectory_jump(x_t, t, torch.full_like(t, s), f)
    if noise is None:
        return x_s
    alpha_next, _ = alpha_sigma(torch.full_like(t, t_next))
    alpha_s, _ = alpha_sigma(torch.full_like(t, s))
    keep = alpha_next / alpha_s  # q(x_t_next | x_s) = N(keep x_s, (1 - keep^2) I)
    return keep * x_s + (1 - keep ** 2).clamp(min=0).sqrt() * noise


#################################################################################
#         Rectified flow's straight path in DiT's schedule: the velocity         #
#################################################################################
# The straight path of rectified flow (Liu et al. 2022, Eq. 1): x_s = s x + (1 - s) z from the noise z (s = 0) to the
# data x (s = 1), velocity v = dx_s / ds = x - z. DiT's VP point x_t = alpha_t x + sigma_t z is the same point scaled:
# x_s = x_t / (alpha_t + sigma_t) at s = alpha_t / (alpha_t + sigma_t). Given s, alpha = s / r and sigma = (1 - s) / r
# with r = sqrt(s^2 + (1 - s)^2) (so alpha^2 + sigma^2 = 1), x_t = x_s / r, and t(s) is the DiT timestep of that
# alpha (linear between DiT's integer timesteps, exact on them). Any DiT is thus a velocity model: its (x_0, eps) at
# (x_t, t(s)) give v = x_0 - eps, and one Euler step s -> s' is x_s + (s' - s)(x_0 - eps) = s' x_0 + (1 - s') eps,
# DDIM's step in the straight path's scale: Euler on the grid s(t_i) of DDIM's timesteps is DDIM, exactly.
# DiT's schedule covers s in [s(999), s(0)] = [0.0064, 0.990]; outside it the model is called at its end timestep
# (as every DiT sampler starts from x_999 = z, treating s(999) as 0).

# s(t) = alpha / (alpha + sigma) at t = -1 .. 999 (index t + 1), decreasing from 1
_FLOW_S = _ALPHA_BAR_WITH_CLEAN.sqrt() / (_ALPHA_BAR_WITH_CLEAN.sqrt() + (1 - _ALPHA_BAR_WITH_CLEAN).sqrt())
FLOW_S_RANGE = (float(_FLOW_S[-1]), float(_FLOW_S[1]))  # s(999), s(0)


def flow_timestep(s):
    """The DiT timestep t(s) (float64 (N,), in [0, 999]) whose alpha / (alpha + sigma) is s, linear between integers."""
    s_up, t_down = _FLOW_S.flip(0).to(s.device), torch.arange(DIFFUSION_STEPS - 1, -2, -1, dtype=torch.float64,
                                                                 device=s.device)  # s ascending, t from 999 to -1
    s = s.double().clamp(*FLOW_S_RANGE)
    i = torch.searchsorted(s_up, s).clamp(1, len(s_up) - 1)
    weight = (s - s_up[i - 1]) / (s_up[i] - s_up[i - 1])
    return t_down[i - 1] + weight * (t_down[i] - t_down[i - 1])


def velocity(model, parametrisation, x_s, s, y, w=None, drop=None, clip=False, temperature=1.0):
    """v(x_s, s) = x_0 - eps of a DiT at the VP point of straight-path point x_s (N, C, H, W), s (N,) in [0, 1]."""
    s = s.double().clamp(*FLOW_S_RANGE).view(-1, 1, 1, 1)
    r = (s ** 2 + (1 - s) ** 2).sqrt()
    alpha, sigma = (s / r).float(), ((1 - s) / r).float()
    x_t = x_s / r.float()  # (N, C, H, W) in DiT's scale
    t = flow_timestep(s.flatten()).float()
    output = model_output(model, x_t, t, y, w, drop, temperature)
    x0, eps = x0_eps_at(output, x_t, alpha, sigma, parametrisation, clip)
    return x0 - eps


def flow_grid(num_steps):
    """Euler's uniform grid on the straight path, noise to data: s_i = i / N, i = 0 .. N."""
    return [i / num_steps for i in range(num_steps + 1)]


def flow_timesteps(num_steps):
    """The DiT timesteps flow-euler calls the model at (floats: t(s_i) for its first N grid points)."""
    return flow_timestep(torch.tensor(flow_grid(num_steps)[:-1], dtype=torch.float64)).float().tolist()


#################################################################################
#               How a checkpoint samples: its "sampling" entry                  #
#################################################################################

@dataclasses.dataclass(frozen=True)
class SamplingSpec:
    """A checkpoint's "sampling" entry (and an exported file's metadata["sampling"]). The defaults are what every
    DiT trained on the diffusion loss says, the official ones included; step-distilled checkpoints carry their own.

    method: the method that made it (plain, size-distillation, progressive, consistency, tcd, guidance, dmd2,
    adversarial, reflow, instaflow); parametrisation: eps or x-eps (a reflow or InstaFlow student's velocity is x_0 -
    eps of that output); sampler: the sampler it was distilled for (None: any eps sampler); steps: the step
    counts it samples in (None: any); default_steps; guidance_range: (low, high) of its w input (None: no w);
    consistency_skip: the consistency grid's stride (consistency and TCD); gamma: TCD's default stochasticity (TCD
    students only: the key is absent from every other entry, so old entries read and write back unchanged).
    """
    method: str = "plain"
    parametrisation: str = "eps"
    sampler: Optional[str] = None
    steps: Optional[Tuple[int, ...]] = None
    default_steps: Optional[int] = None
    guidance_range: Optional[Tuple[float, float]] = None
    consistency_skip: Optional[int] = None
    gamma: Optional[float] = None

    @classmethod
    def from_checkpoint_entry(cls, entry):
        """The record of a checkpoint's "sampling" dict (or of None: a checkpoint written before it had one; or of a
        SamplingSpec, returned as it is); keys it lacks take the eps defaults."""
        if entry is None or isinstance(entry, cls):
            return entry or cls()
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(entry) - names)
        if unknown:
            raise UserError(f"the checkpoint's sampling entry has unknown keys {unknown} (known: {sorted(names)}) - "
                            f"it was written by another tool: pass a checkpoint this project wrote")
        values = dict(entry)
        for key in ("steps", "guidance_range"):
            values[key] = None if values.get(key) is None else tuple(values[key])
        spec = cls(**values)
        if spec.parametrisation not in ("eps", "x-eps") or spec.sampler not in (None, *SAMPLERS):
            raise UserError(f"the checkpoint's sampling entry names parametrisation {spec.parametrisation!r} and "
                            f"sampler {spec.sampler!r}, which this code does not know - update the project")
        return spec

    def to_dict(self):
        """The plain dict a checkpoint keeps (the same 7 keys as ever, and gamma for a TCD student; lists for
        tuples): torch.load(weights_only) and JSON read it."""
        entry = dataclasses.asdict(self)
        for key in ("steps", "guidance_range"):
            entry[key] = None if entry[key] is None else list(entry[key])
        if entry["gamma"] is None:
            del entry["gamma"]
        return entry


EPS_SAMPLING = SamplingSpec().to_dict()  # the same defaults as a plain dict (models.py, train.py)


#################################################################################
#                Samplers: (model, spec, noise, labels, ...) -> x_0              #
#################################################################################

def check_guidance(model, cfg_scale):
    """A UserError for guidance asked of a model without a null label (trained without label dropout)."""
    if cfg_scale != 1.0 and model.w_embedder is None and model.config["class_dropout_prob"] == 0:
        raise UserError("this model was trained without label dropout, so it has no null label to guide against: "
                        "use --cfg-scale 1")


def guidance_scales(model, cfg_scale, noise):
    """The w (N,) of model_output: None for cfg_scale 1 on a model without a w input (the conditional model)."""
    if cfg_scale == 1 and model.w_embedder is None:
        return None
    return torch.full((len(noise),), float(cfg_scale), device=noise.device)


def sample_batch(model, diffusion, noise, labels, cfg_scale=1.0, sampler="ddpm", temperature=1.0, eta=0.0,
                 progress=False, clip_denoised=False):
    """DDPM or DDIM through `diffusion` (respaced): denoise `noise` (N, C, H, W) into samples for class `labels` (N,);
    returns (N, C, H, W) model-space samples.

    clip_denoised clamps each step's x_0 estimate to [-1, 1]: right for pixels, off for latents (as the original).
    A guidance-distilled model takes cfg_scale as its input w: one forward per step instead of two.
    """
    check_guidance(model, cfg_scale)
    if model.w_embedder is not None:
        w = torch.full((len(noise),), float(cfg_scale), device=noise.device)
        z, model_kwargs, denoiser = noise, dict(y=labels, w=w), model.forward
    elif cfg_scale != 1.0:
        # Classifier-free guidance (Ho & Salimans 2022): the batch is doubled with null labels.
        null = torch.full_like(labels, model.config["num_classes"])
        z = torch.cat([noise, noise], dim=0)  # (2N, C, H, W)
        model_kwargs = dict(y=torch.cat([labels, null], dim=0), cfg_scale=cfg_scale)
        denoiser = model.forward_with_cfg
    else:  # cfg_scale 1 is the conditional model: skip the wasted unconditional half
        z, model_kwargs, denoiser = noise, dict(y=labels), model.forward
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    extra = dict(eta=eta) if sampler == "ddim" else {}
    samples = loop(denoiser, z.shape, z, clip_denoised=clip_denoised, model_kwargs=model_kwargs, progress=progress,
                   device=z.device, temperature=temperature, **extra)
    return samples[: len(noise)]


# Ho et al. 2020, Algorithm 2 (ancestral sampling), on the original's respaced grid (250 steps by default).
def ddpm(model, spec, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    diffusion = create_diffusion(str(num_steps), learn_sigma=model.config["learn_sigma"])
    return sample_batch(model, diffusion, noise, labels, cfg_scale, "ddpm", temperature, progress=progress,
                        clip_denoised=clip)


# Song et al. 2021, Eq. 12 (DDIM, eta the noise), on the original's "ddimN" grid (leading spacing).
def ddim(model, spec, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    diffusion = create_diffusion(f"ddim{num_steps}", learn_sigma=model.config["learn_sigma"])
    return sample_batch(model, diffusion, noise, labels, cfg_scale, "ddim", temperature, eta, progress, clip)


# Song et al. 2021, Eq. 12 with eta = 0, on the trailing grid (Lin et al. 2024): the progressive student's sampler
# (Salimans & Ho 2022), and a teacher's few-step baseline (an eps model at 1 step jumps from t = 999 to its x_0).
@torch.no_grad()
def ddim_trailing_sample(model, parametrisation, noise, y, num_steps, w=None, clip=False, temperature=1.0):
    grid = trailing_timesteps(num_steps) + [-1]
    x = noise
    for t, s in zip(grid[:-1], grid[1:]):
        x0, eps = denoise(model, parametrisation, x, torch.full((len(x),), t, device=x.device), y, w, clip=clip,
                          temperature=temperature)
        x = ddim_step(x0, eps, torch.full((len(x),), s, device=x.device))
    return x


def ddim_trailing(model, spec, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    w = guidance_scales(model, cfg_scale, noise)
    return ddim_trailing_sample(model, spec.parametrisation, noise, labels, num_steps, w, clip, temperature)


# Song et al. 2023, Algorithm 1 (multistep consistency sampling; LCM's Algorithm 3): x_0 = f(x, t_i), re-noised to
# t_{i+1} with step_noise[i], on the trailing grid of the training points. Returns the last x_0.
@torch.no_grad()
def consistency_sample(model, noise, step_noise, y, num_steps, skip, w=None, clip=False):
    grid = trailing_timesteps(num_steps, stride=skip)
    if len(step_noise) < num_steps - 1:
        raise ValueError(f"{num_steps} consistency steps need {num_steps - 1} re-noising draws")
    x = noise
    for i, t in enumerate(grid):
        x0 = consistency_function(model, x, torch.full((len(x),), t, device=x.device), y, w, clip=clip)
        x0 = x0.clamp(-1, 1) if clip else x0
        if i + 1 < num_steps:
            x = q_sample(x0, torch.full((len(x),), grid[i + 1], device=x.device), step_noise[i])
    return x0


def consistency(model, spec, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    w = None if model.w_embedder is None else torch.full((len(noise),), float(cfg_scale), device=noise.device)
    return consistency_sample(model, noise, step_noise, labels, num_steps, spec.consistency_skip, w, clip)


# Zheng et al. 2024, strategic stochastic sampling (TCD's Algorithm 4, as diffusers' TCDScheduler names it): at grid
# point t_i the TCF jumps to s = floor((1 - gamma) t_{i+1}), forward noise (step_noise[i]) takes it back up to t_{i+1};
# gamma = 0 is deterministic, gamma = 1 multistep consistency sampling. The last step jumps to s = 0 and returns x_s
# there (as TCDScheduler does), on the trailing grid of the training points as consistency_sample.
@torch.no_grad()
def tcd_sample(model, noise, step_noise, y, num_steps, skip, gamma=TCD_GAMMA, w=None, clip=False):
    grid = trailing_timesteps(num_steps, stride=skip)
    if len(step_noise) < num_steps - 1:
        raise ValueError(f"{num_steps} TCD steps need {num_steps - 1} re-noising draws")
    x = noise
    for i, t in enumerate(grid):
        t = torch.full((len(x),), t, device=x.device)
        f = consistency_function(model, x, t, y, w, clip=clip)
        f = f.clamp(-1, 1) if clip else f
        last = i + 1 == num_steps
        x = tcd_step(x, t, f, 0 if last else grid[i + 1], gamma, None if last else step_noise[i])
    return x


def tcd(model, spec, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    gamma = TCD_GAMMA if spec.gamma is None else spec.gamma
    return tcd_sample(model, noise, step_noise, labels, num_steps, spec.consistency_skip, gamma,
                      guidance_scales(model, cfg_scale, noise), clip)


# Rectified flow's sampler (Liu et al. 2022, Sec. 2.1: the ODE dx_s / ds = v(x_s, s) by Euler): N uniform steps from
# x_0 = noise (s = 0) to s = 1 on the straight path (above). grid: the s values to step on (default flow_grid(N)).
@torch.no_grad()
def flow_euler_sample(model, parametrisation, noise, y, num_steps, w=None, clip=False, temperature=1.0, grid=None):
    grid = flow_grid(num_steps) if grid is None else grid
    x = noise
    for s, s_next in zip(grid[:-1], grid[1:]):
        times = torch.full((len(x),), s, dtype=torch.float64, device=x.device)  # float64, as the numpy copy
        v = velocity(model, parametrisation, x, times, y, w, clip=clip, temperature=temperature)
        x = x + (s_next - s) * v
    return x


def flow_euler(model, spec, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    w = guidance_scales(model, cfg_scale, noise)
    return flow_euler_sample(model, spec.parametrisation, noise, labels, num_steps, w, clip, temperature)


# DiT's training schedule in diffusers' terms (diffusion.get_named_beta_schedule("linear", 1000)).
DIT_SCHEDULE = dict(num_train_timesteps=DIFFUSION_STEPS, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
# diffusers' solvers, on the trailing grid (999 first, as ddim-trailing): name -> (scheduler class, its options).
SOLVERS = {
    "dpm++2m": ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2)),  # Lu et al. 2022
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2)),  # Zhao et al. 2023, bh2, predictor-corrector
    "euler": ("EulerDiscreteScheduler", {}),  # Karras et al. 2022, Algorithm 1 without churn
}
SOLVER_DEFAULT_STEPS = 20


def solver_scheduler(name, clip=False):
    """The diffusers scheduler of solver `name`, set up for DiT's schedule. clip (pixel models): each x_0 estimate
    is clamped to [-1, 1], through diffusers' dynamic thresholding with sample_max_value 1, whose threshold
    clamp(quantile, 1, sample_max_value) is then always 1. Euler has no x_0 to clamp and runs unclipped."""
    import diffusers
    class_name, options = SOLVERS[name]
    scheduler_class = getattr(diffusers, class_name)
    clipping = dict(thresholding=True, sample_max_value=1.0) if clip and name != "euler" else {}
    return scheduler_class(**DIT_SCHEDULE, timestep_spacing="trailing", **options, **clipping)


def solver_timesteps(name, num_steps, spec=None):
    """The timesteps solver `name` calls the model at (its scheduler's, in order; Euler's are floats)."""
    scheduler = solver_scheduler(name)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.tolist()


# A diffusers solver (SOLVERS[name], each its paper above) on the DiT's eps: the first C output channels, guided as
# model_output guides them (a w input for a guidance-distilled model), over temperature.
def solver(name, model, spec, noise, labels, num_steps, cfg_scale, temperature, eta, clip, step_noise, progress):
    scheduler = solver_scheduler(name, clip)
    scheduler.set_timesteps(num_steps, device=noise.device)
    w = guidance_scales(model, cfg_scale, noise)
    x = noise * scheduler.init_noise_sigma  # Euler works in sigma space: x_T = sigma_max eps
    for t in tqdm(scheduler.timesteps, desc=name, disable=not progress):
        model_input = scheduler.scale_model_input(x, t)  # back to the DiT's x_t (identity but for Euler)
        eps = model_output(model, model_input, t.expand(len(x)), labels, w, temperature=temperature)
        x = scheduler.step(eps[:, :noise.shape[1]].float(), t, x).prev_sample
    return x


ANY_STEP_COUNT = range(1, DIFFUSION_STEPS + 1)
LEADING_STEP_COUNTS = frozenset(len(range(0, DIFFUSION_STEPS, stride)) for stride in range(1, DIFFUSION_STEPS))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """One registered sampler.

    sample(model, spec, noise (N, C, H, W), labels (N,), num_steps, cfg_scale, temperature, eta, clip, step_noise,
    progress) -> samples (N, C, H, W); timesteps(num_steps, spec): the timesteps it calls the model at, in order;
    parametrisations: the model outputs it samples from; renoises: it takes step_noise, num_steps - 1 draws of the
    noise's shape; step_counts: the counts DiT's 1000 steps give it (a checkpoint's spec.steps may narrow them).
    """
    sample: Callable
    timesteps: Callable
    parametrisations: Tuple[str, ...] = ("eps",)
    renoises: bool = False
    step_counts: Collection[int] = ANY_STEP_COUNT


SAMPLERS = {
    "ddpm": Sampler(ddpm, lambda num_steps, spec: respaced_timesteps(num_steps)),
    "ddim": Sampler(ddim, lambda num_steps, spec: leading_timesteps(num_steps), step_counts=LEADING_STEP_COUNTS),
    "ddim-trailing": Sampler(ddim_trailing, lambda num_steps, spec: trailing_timesteps(num_steps),
                             parametrisations=("eps", "x-eps")),
    "consistency": Sampler(consistency, lambda num_steps, spec: trailing_timesteps(num_steps, spec.consistency_skip),
                           parametrisations=("x-eps",), renoises=True),
    "tcd": Sampler(tcd, lambda num_steps, spec: trailing_timesteps(num_steps, spec.consistency_skip),
                   parametrisations=("x-eps",), renoises=True),
    **{name: Sampler(functools.partial(solver, name), functools.partial(solver_timesteps, name)) for name in SOLVERS},
    "flow-euler": Sampler(flow_euler, lambda num_steps, spec: flow_timesteps(num_steps),
                          parametrisations=("eps", "x-eps")),
}


#################################################################################
#                A checkpoint's defaults, and what it can be asked              #
#################################################################################

def resolve_sampling(sampling, sampler=None, num_steps=None, cfg_scale=None, temperature=1.0, default_cfg_scale=1.0,
                     gamma=None):
    """(sampler, steps, cfg_scale) for a checkpoint's sampling entry (a dict, None or a SamplingSpec): its own
    defaults for what is None, and a UserError that says what the model supports when a request does not fit it.
    default_cfg_scale: the scale for a model that takes guidance, clamped into a guidance-distilled model's range (a
    few-step student distilled without guidance samples at 1). gamma: a TCD student's stochasticity (checked here;
    the caller puts it into the spec)."""
    spec = SamplingSpec.from_checkpoint_entry(sampling)
    own = spec.sampler
    sampler = sampler or own or "ddpm"
    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if own and sampler != own:
        raise UserError(f"this checkpoint is a {spec.method}-distilled student made for the {own} sampler; "
                        f"drop --sampler (or pass --sampler {own})")
    if spec.parametrisation not in SAMPLERS[sampler].parametrisations:  # consistency asked of a noise predictor
        raise UserError(f"{sampler} sampling needs a {sampler}-distilled checkpoint; this model predicts noise: "
                        f"use ddpm, ddim or ddim-trailing")
    num_steps = num_steps or spec.default_steps or (SOLVER_DEFAULT_STEPS if sampler in SOLVERS else 250)
    check_step_count(sampler, num_steps)
    if spec.steps and num_steps not in spec.steps:
        supported = spec.steps
        listed = f"{supported[0]}..{supported[-1]}" if len(supported) > 4 else ", ".join(map(str, supported))
        raise UserError(f"this {spec.method}-distilled student samples in {listed} steps, not {num_steps}: "
                        f"drop --num-sampling-steps (default {spec.default_steps})")
    guidance_range = spec.guidance_range
    if cfg_scale is None:
        cfg_scale = 1.0 if own and not guidance_range else default_cfg_scale
        cfg_scale = min(max(cfg_scale, guidance_range[0]), guidance_range[1]) if guidance_range else cfg_scale
    if guidance_range and not guidance_range[0] <= cfg_scale <= guidance_range[1]:
        raise UserError(f"--cfg-scale {cfg_scale} is outside the guidance range this student was distilled for "
                        f"[{guidance_range[0]}, {guidance_range[1]}]")
    if own and not guidance_range and cfg_scale != 1:
        raise UserError(f"this {spec.method}-distilled student was distilled without guidance (no "
                        f"--guidance-range), so it samples at --cfg-scale 1 only")
    if gamma is not None and sampler != "tcd":
        raise UserError(f"--gamma is the stochasticity of TCD's sampler (tcd-distilled students), not of {sampler}: "
                        f"drop --gamma")
    if gamma is not None and not 0 <= gamma <= 1:
        raise UserError(f"--gamma must lie in [0, 1] (0: deterministic, 1: multistep consistency), got {gamma}")
    if temperature != 1 and spec.parametrisation != "eps":  # consistency samples x-eps students only
        raise UserError("--temperature applies to noise-predicting models (ddpm, ddim, ddim-trailing), not to a "
                        "few-step student")
    return sampler, num_steps, cfg_scale


def check_step_count(sampler, num_steps):
    """A UserError when `sampler` cannot run `num_steps` steps on DiT's 1000-step schedule."""
    if not 1 <= num_steps <= DIFFUSION_STEPS:
        raise UserError(f"--num-sampling-steps must lie in [1, {DIFFUSION_STEPS}] (DiT's schedule has "
                        f"{DIFFUSION_STEPS} steps), got {num_steps}")
    if num_steps not in SAMPLERS[sampler].step_counts:  # ddim's leading grid
        raise UserError(f"ddim places its steps every 1000 // N timesteps from t = 0 (the original's grid), "
                        f"which cannot give exactly {num_steps} steps: choose a nearby count, or --sampler "
                        f"ddim-trailing, which places any count from 1")


def forwards_per_step(model, cfg_scale):
    """Model evaluations per image and step: two under classifier-free guidance, one with a w input or without."""
    return 2 if cfg_scale != 1 and model.w_embedder is None else 1
