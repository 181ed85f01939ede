"""This project's DiT as diffusers pipeline components: the code a pipeline folder written by
`convert_diffusers.py --to-diffusers --pipeline` carries. convert_diffusers.py writes this module into the folder
(as dit_pipeline.py in each component's subfolder, and at the top for GuidanceEmbeddedDiTPipeline) with its imports
from this project replaced by the definitions they name, so the folder loads with diffusers alone:

    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("dit-pipeline", trust_remote_code=True)  # runs the folder's code
    images = pipe(class_labels=[0, 1, 2], num_inference_steps=20, guidance_scale=1.0).images

- OriginalDiTTransformer2DModel: diffusers' DiTTransformer2DModel computing what the original DiT computes: its
  timestep frequencies 10000^(-i / half) (diffusers' DiT fixes downscale_freq_shift=1 outside its config) and its null
  label at num_classes (DiTPipeline passes 1000 whatever the model's class count). Same weights, same file layout;
  with guidance_range in its config it is a guidance-distilled DiT (Meng et al. 2023) that takes w as an input.
- XEpsDiTTransformer2DModel: a step-distilled student (progressive, consistency), whose two output groups are
  (eps~, x~); it returns its x_0 estimate (and zeros where DiTPipeline expects the learned variance).
- FewStepScheduler: the samplers such students are distilled for (sampling.py's ddim-trailing, consistency, tcd), as
  a diffusers scheduler that takes that x_0, at the timesteps sampling.SAMPLERS declares for them.
- PixelDecoder: the identity in place of the VAE of a pixel-space model (DiTPipeline always decodes).
- GuidanceEmbeddedDiTPipeline: DiTPipeline for a transformer that takes w: guidance_scale goes in as w, one forward
  per step at every w, instead of DiTPipeline's classifier-free guidance.
This module imports only torch, diffusers and the standard library outside this project (the folder's copy must run
without the project).
"""
import inspect

import torch
from diffusers import DiTPipeline, DiTTransformer2DModel, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from models import GUIDANCE_EMBED_SCALE
from sampling import (DIFFUSION_STEPS, TCD_GAMMA, alpha_sigma, consistency_boundary, ddim_step, predict_x0_eps,
                      q_sample, tcd_step, trailing_timesteps)

DIFFUSERS_NULL_LABEL = 1000  # DiTPipeline's null class for guidance, fixed for ImageNet's 1000 classes
DIFFUSERS_DEFAULT_GUIDANCE = 4.0  # DiTPipeline's default guidance_scale
FREQUENCY_EMBEDDING_SIZE = 256  # the sinusoidal width of DiT's timestep (and w) embedders


def use_original_timestep_frequencies(transformer):
    """Make a diffusers DiT embed timesteps as the original DiT does (frequencies 10000^(-i / half)); in place.

    diffusers' CombinedTimestepLabelEmbeddings fixes downscale_freq_shift=1 (frequencies 10000^(-i / (half - 1))).
    The shift is not a config key: this holds for this object only (OriginalDiTTransformer2DModel sets it on load).
    """
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return transformer


def add_guidance_embedding(embeddings, inputs, conditioning):
    """Forward hook of a block's timestep-label embedder: c = t + y + w, w's embedding set by the forward (a function
    of the module alone, so a deep copy of the transformer adds its own)."""
    return conditioning + embeddings.guidance_embedding  # (N, D)


class OriginalDiTTransformer2DModel(DiTTransformer2DModel):
    """DiTTransformer2DModel with the original DiT's timestep frequencies and null label (see the module docstring).

    guidance_range: (low, high) of the w a guidance-distilled DiT takes (None: no w input). Its w embedder is the
    DiT's (w * GUIDANCE_EMBED_SCALE, sinusoids, two-layer MLP), added to every block's conditioning as the DiT adds
    it to c = t + y; w comes from forward's guidance_scale, else from the attribute guidance_scale (the pipeline's).
    """

    def __init__(self, *args, guidance_range=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_to_config(guidance_range=None if guidance_range is None else [float(w) for w in guidance_range])
        use_original_timestep_frequencies(self)
        self.guidance_scale = None
        if guidance_range is not None:
            width = self.config.num_attention_heads * self.config.attention_head_dim
            self.guidance_proj = Timesteps(FREQUENCY_EMBEDDING_SIZE, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.guidance_embedder = TimestepEmbedding(FREQUENCY_EMBEDDING_SIZE, width)
            for block in self.transformer_blocks:  # block 0's also makes the final layer's conditioning
                block.norm1.emb.guidance_embedding = None
                block.norm1.emb.register_forward_hook(add_guidance_embedding)

    # The config keys diffusers reads from the signature: the parent's and guidance_range.
    __init__.__signature__ = inspect.signature(DiTTransformer2DModel.__init__).replace(parameters=[
        *inspect.signature(DiTTransformer2DModel.__init__).parameters.values(),
        inspect.Parameter("guidance_range", inspect.Parameter.KEYWORD_ONLY, default=None)])

    def forward(self, hidden_states, timestep=None, class_labels=None, *args, guidance_scale=None, **kwargs):
        num_classes = self.config.num_embeds_ada_norm
        if class_labels is not None and num_classes != DIFFUSERS_NULL_LABEL:
            class_labels = torch.where(class_labels == DIFFUSERS_NULL_LABEL, num_classes, class_labels)
        w = self.guidance_scale if guidance_scale is None else guidance_scale
        if (w is None) != (self.config.guidance_range is None):
            raise ValueError("this guidance-distilled DiT takes the guidance scale w as an input: pass guidance_scale"
                             if w is None else "this DiT was not guidance-distilled: it takes no guidance_scale")
        if w is None:
            return super().forward(hidden_states, timestep, class_labels, *args, **kwargs)
        w = torch.as_tensor(w, dtype=torch.float32, device=hidden_states.device).expand(len(hidden_states))  # (N,)
        frequencies = self.guidance_proj(w * GUIDANCE_EMBED_SCALE)  # (N, 256)
        embedding = self.guidance_embedder(frequencies.to(self.guidance_embedder.linear_1.weight.dtype))  # (N, D)
        for block in self.transformer_blocks:
            block.norm1.emb.guidance_embedding = embedding
        try:
            return super().forward(hidden_states, timestep, class_labels, *args, **kwargs)
        finally:
            for block in self.transformer_blocks:
                block.norm1.emb.guidance_embedding = None


class XEpsDiTTransformer2DModel(OriginalDiTTransformer2DModel):
    """A step-distilled student (x-eps, Salimans & Ho 2022, App. D): returns (x_0, zeros), 2C channels, for
    FewStepScheduler (DiTPipeline keeps the first C of a learned-sigma model's output)."""

    def forward(self, hidden_states, timestep=None, class_labels=None, *args, guidance_scale=None, return_dict=True,
                **kwargs):
        output = super().forward(hidden_states, timestep, class_labels, *args, guidance_scale=guidance_scale,
                                 **kwargs).sample  # (N, 2C, H, W)
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
        """The timesteps SAMPLERS declares for this sampler: the trailing grid, every consistency_skip-th timestep
        for a consistency or TCD student (a test holds the two equal)."""
        stride = 1 if self.config.sampler == "ddim-trailing" else self.config.consistency_skip
        return trailing_timesteps(num_steps, stride)

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


class GuidanceEmbeddedDiTPipeline(DiTPipeline):
    """DiTPipeline for a guidance-distilled transformer (config guidance_range): guidance_scale is its input w, one
    forward per step at every w (DiTPipeline's own call, run unguided with the transformer reading w)."""

    @torch.no_grad()
    def __call__(self, class_labels, guidance_scale=None, generator=None, num_inference_steps=50, output_type="pil",
                 return_dict=True):
        """As DiTPipeline's call; guidance_scale None: DiTPipeline's default 4 clamped into the distilled range."""
        guidance_range = self.transformer.config.guidance_range
        if guidance_range is None:
            raise ValueError("GuidanceEmbeddedDiTPipeline needs a transformer that takes w (config guidance_range); "
                             "load this folder with DiTPipeline")
        low, high = guidance_range
        w = min(max(DIFFUSERS_DEFAULT_GUIDANCE, low), high) if guidance_scale is None else float(guidance_scale)
        if not low <= w <= high:
            raise ValueError(f"guidance_scale {w} is outside the range this student was distilled for [{low}, {high}]")
        self.transformer.guidance_scale = w
        try:  # guidance_scale 1: DiTPipeline neither doubles the batch nor guides
            return super().__call__(class_labels, 1.0, generator, num_inference_steps, output_type, return_dict)
        finally:
            self.transformer.guidance_scale = None
