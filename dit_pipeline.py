"""This project's DiT as diffusers pipeline components: what a DiTPipeline folder written by
`convert_diffusers.py --to-diffusers --pipeline` names in its model_index.json.

    import dit_pipeline  # diffusers loads a component class from outside diffusers only once the caller imported it
    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained("dit-pipeline")
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=20, guidance_scale=1.0).images

- OriginalDiTTransformer2DModel: diffusers' DiTTransformer2DModel computing what the original DiT computes: its
  timestep frequencies 10000^(-i / half) (diffusers' DiT fixes downscale_freq_shift=1 outside its config) and its null
  label at num_classes (DiTPipeline passes 1000 whatever the model's class count). Same weights, same file layout.
- XEpsDiTTransformer2DModel: a step-distilled student (progressive, consistency), whose two output groups are
  (eps~, x~); it returns its x_0 estimate (and zeros where DiTPipeline expects the learned variance).
- FewStepScheduler: the samplers such students are distilled for (sampling.py's ddim-trailing, consistency, tcd), as
  a diffusers scheduler that takes that x_0, at the timesteps sampling.SAMPLERS declares for them.
- PixelDecoder: the identity in place of the VAE of a pixel-space model (DiTPipeline always decodes).
"""
import functools

import torch
from diffusers import DiTTransformer2DModel, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from sampling import (DIFFUSION_STEPS, SAMPLERS, TCD_GAMMA, SamplingSpec, alpha_sigma, consistency_boundary,
                      ddim_step, predict_x0_eps, q_sample, tcd_step)

DIFFUSERS_NULL_LABEL = 1000  # DiTPipeline's null class for guidance, fixed for ImageNet's 1000 classes


def use_original_timestep_frequencies(transformer):
    """Make a diffusers DiT embed timesteps as the original DiT does (frequencies 10000^(-i / half)); in place.

    diffusers' CombinedTimestepLabelEmbeddings fixes downscale_freq_shift=1 (frequencies 10000^(-i / (half - 1))).
    The shift is not a config key: this holds for this object only (OriginalDiTTransformer2DModel sets it on load).
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


class OriginalDiTTransformer2DModel(DiTTransformer2DModel):
    """DiTTransformer2DModel with the original DiT's timestep frequencies and null label (see the module docstring)."""

    @functools.wraps(DiTTransformer2DModel.__init__)  # the parent's signature: diffusers reads the config keys from it
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        use_original_timestep_frequencies(self)

    def forward(self, hidden_states, timestep=None, class_labels=None, *args, **kwargs):
        num_classes = self.config.num_embeds_ada_norm
        if class_labels is not None and num_classes != DIFFUSERS_NULL_LABEL:
            class_labels = torch.where(class_labels == DIFFUSERS_NULL_LABEL, num_classes, class_labels)
        return super().forward(hidden_states, timestep, class_labels, *args, **kwargs)


class XEpsDiTTransformer2DModel(OriginalDiTTransformer2DModel):
    """A step-distilled student (x-eps, Salimans & Ho 2022, App. D): returns (x_0, zeros), 2C channels, for
    FewStepScheduler (DiTPipeline keeps the first C of a learned-sigma model's output)."""

    def forward(self, hidden_states, timestep=None, class_labels=None, *args, return_dict=True, **kwargs):
        output = super().forward(hidden_states, timestep, class_labels, *args, **kwargs).sample  # (N, 2C, H, W)
        t = timestep.expand(len(hidden_states)) if timestep.dim() else timestep.repeat(len(hidden_states))
        x0, _ = predict_x0_eps(output, hidden_states.float(), t, "x-eps")
        sample = torch.cat([x0, torch.zeros_like(x0)], dim=1).to(output.dtype)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


class FewStepScheduler(SchedulerMixin, ConfigMixin):
    """sampling.py's few-step samplers on DiT's schedule, fed the x_0 of XEpsDiTTransformer2DModel:
    - "ddim-trailing" (progressive students): deterministic DDIM on the trailing grid, ending at x_0;
    - "consistency": multistep consistency sampling (Song et al. 2023, Algorithm 1) on the trailing grid of every
      consistency_skip-th timestep, f = c_skip x_t + c_out x_0, re-noised with torch's global RNG between steps
      (DiTPipeline passes no generator to step);
    - "tcd": TCD's strategic stochastic sampling (sampling.tcd_step) on the same grid with that f, at gamma (None:
      TCD's default 0.3), forward-noised from the same RNG.
    clip_sample (pixel models): x_0 clamped to [-1, 1], as sample.py clamps it.
    """
    order = 1

    @register_to_config
    def __init__(self, sampler="consistency", consistency_skip=1, clip_sample=False,
                 num_train_timesteps=DIFFUSION_STEPS, gamma=None):
        if sampler not in ("ddim-trailing", "consistency", "tcd"):
            raise ValueError(f"FewStepScheduler samples 'ddim-trailing', 'consistency' or 'tcd', not {sampler!r}")
        if num_train_timesteps != DIFFUSION_STEPS:
            raise ValueError(f"DiT's schedule has {DIFFUSION_STEPS} timesteps, not {num_train_timesteps}")
        self.init_noise_sigma = 1.0
        self.timesteps = torch.tensor(self.sampler_timesteps(1))
        self.num_inference_steps = None

    def sampler_timesteps(self, num_steps):
        """The timesteps SAMPLERS declares for this sampler (a consistency student's grid of consistency_skip)."""
        spec = SamplingSpec(parametrisation="x-eps", sampler=self.config.sampler,
                            consistency_skip=self.config.consistency_skip)
        return SAMPLERS[self.config.sampler].timesteps(num_steps, spec)

    def set_timesteps(self, num_inference_steps, device=None):
        self.timesteps = torch.tensor(self.sampler_timesteps(num_inference_steps), device=device)
        self.num_inference_steps = num_inference_steps

    def scale_model_input(self, sample, timestep=None):
        return sample

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        """One step from `timestep` given the model's x_0 estimate (N, C, H, W); the last step returns x_0 (tcd: x at
        s = 0)."""
        grid = self.timesteps.tolist()
        index = grid.index(int(timestep))
        t = torch.full((len(sample),), int(timestep), device=sample.device)
        s = torch.full_like(t, grid[index + 1] if index + 1 < len(grid) else -1)
        x0 = model_output.float().clamp(-1, 1) if self.config.clip_sample else model_output.float()
        if self.config.sampler == "ddim-trailing":
            alpha, sigma = alpha_sigma(t)
            previous = ddim_step(x0, (sample.float() - alpha * x0) / sigma, s)
        else:
            previous = consistency_boundary(sample.float(), t, x0)
            previous = previous.clamp(-1, 1) if self.config.clip_sample else previous
            noise = None
            if index + 1 < len(grid):  # the draw sample.py makes: on the CPU, then moved
                noise = torch.randn(sample.shape, generator=generator, dtype=torch.float32).to(sample.device)
            if self.config.sampler == "tcd":
                gamma = TCD_GAMMA if self.config.gamma is None else self.config.gamma
                t_next = max(int(s[0]), 0)  # the next grid point, 0 after the last (TCD ends at s = 0)
                previous = tcd_step(sample.float(), t, previous, t_next, gamma, noise)
            elif noise is not None:
                previous = q_sample(previous, s, noise)
        previous = previous.to(sample.dtype)
        return SchedulerOutput(prev_sample=previous) if return_dict else (previous,)

    def __len__(self):
        return self.config.num_train_timesteps


class PixelDecoder(ModelMixin, ConfigMixin):
    """The identity as the "VAE" of a pixel-space DiT: DiTPipeline divides by scaling_factor (1) and decodes."""

    @register_to_config
    def __init__(self, scaling_factor=1.0):
        super().__init__()
        self.register_buffer("scale", torch.ones(()))  # a tensor, so the pipeline can read a device and dtype

    def decode(self, z, return_dict=True):
        return DecoderOutput(sample=z) if return_dict else (z,)
