"""DiT: Diffusion Transformers with adaLN-Zero conditioning.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023). Parameter names and shapes follow the
official release, so its raw state_dicts (e.g. DiT-XL-2-256x256.pt) load with strict=True and give the same outputs.
Additions for distillation: every block's output from the same forward pass (`return_features=True`), optional
gradient checkpointing, and conversion to and from diffusers' DiTTransformer2DModel layout.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checks import UserError, read_file, write_atomically
from quantization import fake_quantize_linears
from sampling import SamplingSpec, classifier_free_guidance, guided_channels


# The guidance scale is embedded as w * 1000 (as LCM does): the sinusoidal frequencies were made for timesteps
# in [0, 1000), and w in e.g. [1, 4] alone would hardly turn the slowest ones.
GUIDANCE_EMBED_SCALE = 1000.0


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                       Embedding layers for timesteps and labels               #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency embedding of scalar timesteps followed by a two-layer MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Transformer sinusoidal embedding of (possibly fractional) timesteps: (N,) -> (N, dim), [cos, sin]."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]  # (N, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        weight = self.mlp[0].weight  # a method, not a tensor, once export.py quantizes the layer to int8
        return self.mlp(t_freq.to(weight.dtype) if isinstance(weight, torch.Tensor) else t_freq)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class-label embedding; index num_classes is the 'null' label used for classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        """Replace labels by the null label, at random (training) or where force_drop_ids == 1."""
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class PatchEmbed(nn.Module):
    """Image to patch tokens with one strided convolution (the parameter names of timm's PatchEmbed)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"DiT was built for {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (the parameter names of timm's Attention)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, C / H)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, C / H)
        x = x.transpose(1, 2).reshape(B, T, C)  # (N, T, D)
        return self.proj(x)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (the parameter names of timm's Mlp)."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """A DiT block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    """adaLN-modulated layer norm and a linear map from tokens to patches."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x)  # (N, T, p * p * C_out)


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone."""

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        guidance_embed=False,
        weight_bits=None,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        # Plain data describing the architecture: stored in checkpoints so sample.py / export.py need no --model.
        self.config = dict(input_size=input_size, patch_size=patch_size, in_channels=in_channels,
                           hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           class_dropout_prob=class_dropout_prob, num_classes=num_classes, learn_sigma=learn_sigma,
                           guidance_embed=guidance_embed)
        if weight_bits is not None:  # quantization-aware (quantization.py); absent from every other config
            self.config["weight_bits"] = weight_bits
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.gradient_checkpointing = False

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Guidance distillation (Meng et al. 2023): the guidance scale w as an input, embedded like a timestep and
        # added to the conditioning. Absent (None) in every model that is not guidance-distilled, so the official
        # state_dicts keep their exact keys.
        self.w_embedder = TimestepEmbedder(hidden_size) if guidance_embed else None
        num_patches = self.x_embedder.num_patches
        # Fixed sin-cos embedding, kept as a frozen parameter so official state_dicts (which contain it) load.
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if weight_bits is not None:  # every Linear simulates INT8 (weights of weight_bits bits, int8 inputs)
            fake_quantize_linears(self, weight_bits)
        self.initialize_weights()

    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        grid_size = int(self.x_embedder.num_patches ** 0.5)
        pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))

        # Patch embedding initialised like a linear layer (xavier on the flattened kernel).
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.proj.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.w_embedder is not None:
            self.zero_init_guidance_embedding()

        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def zero_init_guidance_embedding(self):
        """The w-embedding's last layer at zero: it adds nothing to the conditioning until trained, so a loaded DiT
        with a new w input gives exactly its old outputs."""
        nn.init.normal_(self.w_embedder.mlp[0].weight, std=0.02)
        nn.init.constant_(self.w_embedder.mlp[0].bias, 0)
        nn.init.constant_(self.w_embedder.mlp[2].weight, 0)
        nn.init.constant_(self.w_embedder.mlp[2].bias, 0)

    def unpatchify(self, x):
        """(N, T, p * p * C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y, return_features=False, force_drop_ids=None, w=None):
        """
        x: (N, C, H, W) noisy images or latents; t: (N,) timesteps; y: (N,) class labels (num_classes = null label).
        w: (N,) guidance scales, for a guidance-distilled model only (which needs it; 1 is the conditional model).
        return_features=True also returns the list of every block's output, each (N, T, D), from this same pass.
        force_drop_ids: (N,) 1 where the label is replaced by the null label, instead of the random dropout of
        training mode (so a teacher and its student can drop the same labels).
        """
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D), T = H * W / p ** 2
        t = self.t_embedder(t)  # (N, D)
        y = self.y_embedder(y, self.training, force_drop_ids)  # (N, D)
        c = t + y  # (N, D)
        if (w is None) != (self.w_embedder is None):
            raise ValueError("a guidance-distilled DiT needs the guidance scale w (1: no guidance); another DiT "
                             "takes none" if w is None else "this DiT was not guidance-distilled: it takes no w")
        if w is not None:
            c = c + self.w_embedder(w * GUIDANCE_EMBED_SCALE)  # (N, D)
        features = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)  # (N, T, D)
            else:
                x = block(x, c)  # (N, T, D)
            if return_features:
                features.append(x)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        x = self.unpatchify(x)  # (N, C_out, H, W)
        return (x, features) if return_features else x

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=None):
        """
        Classifier-free guidance in one batched pass: the first half of x is used twice, y holds the conditional
        labels for the first half and null labels for the second. cfg_channels: how many leading output channels are
        guided (default: sampling.guided_channels, min(3, in_channels): the original's 3 for latents).
        """
        half = x[: len(x) // 2]
        combined = torch.cat([half, half], dim=0)  # (2N, C, H, W)
        model_out = self.forward(combined, t, y)  # (2N, C_out, H, W)
        cond, uncond = torch.split(model_out, len(model_out) // 2, dim=0)  # each (N, C_out, H, W)
        guided = classifier_free_guidance(cond, uncond, cfg_scale, self.in_channels, cfg_channels)  # (N, C_out, H, W)
        # As the original: both halves carry the guided channels, each half its own unguided (variance) channels.
        g = guided_channels(self.in_channels, cfg_channels)
        return torch.cat([guided, torch.cat([guided[:, :g], uncond[:, g:]], dim=1)], dim=0)  # (2N, C_out, H, W)

    def enable_gradient_checkpointing(self, enabled=True):
        self.gradient_checkpointing = enabled
        return self


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################
# MAE's 2-D sin-cos embedding: half the channels encode one grid axis, half the other.

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """Returns a float64 array (grid_size * grid_size, embed_dim)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape(2, 1, grid_size, grid_size)  # w first
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])  # (H * W, D / 2)
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])  # (H * W, D / 2)
    return np.concatenate([emb_h, emb_w], axis=1)  # (H * W, D)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))  # (D / 2,)
    out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (M, D / 2)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # (M, D)


#################################################################################
#                                   DiT Configs                                  #
#################################################################################

def DiT_XL_2(**kwargs): return DiT(**dict(depth=28, hidden_size=1152, patch_size=2, num_heads=16) | kwargs)
def DiT_XL_4(**kwargs): return DiT(**dict(depth=28, hidden_size=1152, patch_size=4, num_heads=16) | kwargs)
def DiT_XL_8(**kwargs): return DiT(**dict(depth=28, hidden_size=1152, patch_size=8, num_heads=16) | kwargs)
def DiT_L_2(**kwargs): return DiT(**dict(depth=24, hidden_size=1024, patch_size=2, num_heads=16) | kwargs)
def DiT_L_4(**kwargs): return DiT(**dict(depth=24, hidden_size=1024, patch_size=4, num_heads=16) | kwargs)
def DiT_L_8(**kwargs): return DiT(**dict(depth=24, hidden_size=1024, patch_size=8, num_heads=16) | kwargs)
def DiT_B_2(**kwargs): return DiT(**dict(depth=12, hidden_size=768, patch_size=2, num_heads=12) | kwargs)
def DiT_B_4(**kwargs): return DiT(**dict(depth=12, hidden_size=768, patch_size=4, num_heads=12) | kwargs)
def DiT_B_8(**kwargs): return DiT(**dict(depth=12, hidden_size=768, patch_size=8, num_heads=12) | kwargs)
def DiT_S_2(**kwargs): return DiT(**dict(depth=12, hidden_size=384, patch_size=2, num_heads=6) | kwargs)
def DiT_S_4(**kwargs): return DiT(**dict(depth=12, hidden_size=384, patch_size=4, num_heads=6) | kwargs)
def DiT_S_8(**kwargs): return DiT(**dict(depth=12, hidden_size=384, patch_size=8, num_heads=6) | kwargs)
# Entries accept overrides, e.g. DiT_XL_2(depth=14) for a shallower student of the teacher's width.
# Small sizes for the embedded digits default (8x8 pixels, 1 channel); the teacher has >4x the student's parameters.
def DiT_Digits_T(**kwargs): return DiT(**dict(depth=8, hidden_size=128, patch_size=2, num_heads=4) | kwargs)
def DiT_Digits_S(**kwargs): return DiT(**dict(depth=4, hidden_size=64, patch_size=2, num_heads=2) | kwargs)


DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-Digits-T": DiT_Digits_T, "DiT-Digits-S": DiT_Digits_S,
}


def model_config(name, **overrides):
    """The plain-data config of a registry entry, with overrides (input_size, in_channels, depth, ...)."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(DiT_models)}")
    with torch.device("meta"):  # no memory, no initialisation cost
        return DiT_models[name](**overrides).config


#################################################################################
#                                  Checkpoints                                  #
#################################################################################

VAE_DOWNSAMPLE = 8  # the Stable Diffusion VAE maps 8x8 pixels to one latent: 256px images are 32x32 latents


def load_dit_checkpoint(path, model_name=None, image_size=None, num_classes=None):
    """(model, data) from a training checkpoint ({"config", "ema" and/or "model"}; "ema" preferred) or a raw state_dict.

    A raw state_dict (e.g. the official DiT-XL-2-256x256.pt) carries no config: give model_name and image_size
    (in image pixels, latents are image_size / 8) and num_classes (default 1000), as the original sample.py does.
    data describes what the model denoises and how it samples: {"image_size": pixels, "latent": bool, "vae": name or
    path or None (None: the checkpoint does not say which VAE; a raw state_dict is taken as a latent model),
    "sampling": the checkpoint's sampling entry as a plain dict, read by sampling.SamplingSpec (the eps defaults,
    EPS_SAMPLING, for what an older checkpoint lacks)}.
    """
    checkpoint = read_file(path, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                           "truncated, or not a DiT checkpoint: pass a complete one (a run keeps its older ones)")
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise UserError(f"{path} holds no DiT weights (a {type(checkpoint).__name__}, not a state_dict or a "
                        f"training checkpoint)")
    is_training_checkpoint = "ema" in checkpoint or "model" in checkpoint
    state_dict = checkpoint.get("ema", checkpoint.get("model")) if is_training_checkpoint else checkpoint
    config = checkpoint.get("config") if is_training_checkpoint else None
    if config is not None:
        if (model_name, image_size, num_classes) != (None, None, None):
            raise UserError(f"{path} carries its model config; drop --model, --image-size and --num-classes")
        data = checkpoint.get("data") or {"image_size": config["input_size"] * VAE_DOWNSAMPLE, "latent": True,
                                          "vae": None}
    else:
        if model_name is None or image_size is None:
            raise UserError(f"{path} has no model config (a raw state_dict): pass --model and --image-size "
                            f"(train.py --step-distillation: --teacher-model; the data gives the size)")
        if image_size % VAE_DOWNSAMPLE:
            raise UserError(f"--image-size {image_size} is not a multiple of the VAE's {VAE_DOWNSAMPLE}")
        config = model_config(model_name, input_size=image_size // VAE_DOWNSAMPLE,
                              num_classes=1000 if num_classes is None else num_classes)
        data = {"image_size": image_size, "latent": True, "vae": None}
    model = DiT(**config)
    load_state_dict_strict(model, state_dict, f"{path} (for a raw state_dict check --model, --image-size and "
                                              f"--num-classes)")
    sampling = checkpoint.get("sampling") if is_training_checkpoint else None
    return model.eval(), dict(data, sampling=SamplingSpec.from_checkpoint_entry(sampling).to_dict())


def quantization_aware_copy(model, weight_bits):
    """A DiT of model's config with every Linear fake-quantized (quantization.py) and model's weights; its input
    scales are the initial ones until quantization.calibrate sets them."""
    copy = DiT(**dict(model.config, weight_bits=weight_bits))
    load_state_dict_strict(copy, {**copy.state_dict(), **model.state_dict()}, "the full-precision model")
    return copy


def load_state_dict_strict(model, state_dict, source):
    """load_state_dict(strict=True), with an error that lists the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        def listing(keys):
            return ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "") if keys else "none"
        raise UserError(f"the weights in {source} do not fit the model {model.config}:\n"
                        f"  missing keys: {listing(missing)}\n  unexpected keys: {listing(unexpected)}\n"
                        f"  shape mismatches: {listing(mis_shaped)}")
    model.load_state_dict(state_dict, strict=True)


def save_checkpoint_atomic(obj, path):
    """torch.save through checks.write_atomically: the file at `path` is always a complete checkpoint."""
    write_atomically(path, lambda temporary: torch.save(obj, temporary))


@torch.no_grad()
def update_ema(ema_model, model, decay):
    """ema <- decay * ema + (1 - decay) * model (one fused op), over all parameters (pos_embed is fixed).

    train.py's EMA of the weights, and step_distill.py's consistency target network.
    """
    ema_params = dict(ema_model.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    torch._foreach_lerp_([ema_params[n] for n in names], [p.data for _, p in model.named_parameters()], 1 - decay)


#################################################################################
#                         FLOPs counted from the architecture                    #
#################################################################################

def multiply_adds_per_forward(config):
    """Multiply-adds of one DiT forward pass for one sample, from its matrix products (the DiT paper's 'GFLOPs').

    Elementwise work (norms, modulation, GELU, softmax) is left out, as in the paper's count.
    """
    p, channels, width = config["patch_size"], config["in_channels"], config["hidden_size"]
    tokens = (config["input_size"] // p) ** 2
    mlp_width = int(width * config["mlp_ratio"])
    out_channels = 2 * channels if config["learn_sigma"] else channels
    frequency_size = 256  # TimestepEmbedder's sinusoidal embedding size
    block = (3 * tokens * width * width  # qkv
             + 2 * tokens * tokens * width  # q k^T and the attention-weighted sum of v
             + tokens * width * width  # attention output projection
             + 2 * tokens * width * mlp_width  # MLP
             + width * 6 * width)  # adaLN modulation, once per sample
    patch_embed = tokens * p * p * channels * width
    timestep_embed = frequency_size * width + width * width
    final_layer = width * 2 * width + tokens * width * p * p * out_channels
    return config["depth"] * block + patch_embed + timestep_embed + final_layer


def flops_per_forward(config):
    """FLOPs of one forward pass for one sample: two per multiply-add. A training step costs three times this."""
    return 2 * multiply_adds_per_forward(config)


def projection_flops(student_config, teacher_config):
    """FLOPs of the feature projections (one Linear per student block, where the widths differ) for one sample."""
    if student_config["hidden_size"] == teacher_config["hidden_size"]:
        return 0
    tokens = (student_config["input_size"] // student_config["patch_size"]) ** 2
    return 2 * student_config["depth"] * tokens * student_config["hidden_size"] * teacher_config["hidden_size"]
