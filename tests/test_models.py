"""models.py: official sizes and names, a reference forward built from timm's blocks, adaLN-Zero, features, checkpoints.

Everything runs on the CPU on tiny configs; the official sizes are built on the meta device (no memory).
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention as TimmAttention
from timm.models.vision_transformer import Mlp as TimmMlp
from timm.models.vision_transformer import PatchEmbed as TimmPatchEmbed

import models
from models import (DiT, DiT_models, LabelEmbedder, TimestepEmbedder, load_dit_checkpoint, model_config,
                    save_checkpoint_atomic)
from sampling import EPS_SAMPLING

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def count_parameters(model):
    return sum(parameter.numel() for parameter in model.parameters())


def randomize(model, seed=0, std=0.1):
    """Every weight random (pos_embed kept): DiT's own init zeros the adaLN and output layers, which hides mistakes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def random_dit(seed=0, **overrides):
    return randomize(DiT(**(TINY | overrides)), seed).eval()


def model_inputs(model, batch=6, seed=1):
    """Noisy inputs, timesteps (0, fractional, the last) and labels with the null label (num_classes) included."""
    size = model.x_embedder.img_size
    x = torch.randn(batch, model.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([0.0, 1.0, 10.0, 250.5, 500.0, 999.0])[:batch]
    num_classes = model.y_embedder.num_classes
    y = torch.tensor([0, 3, num_classes - 1, num_classes, num_classes, 5])[:batch]
    return x, t, y


# ---------------------------------------------------------------- official sizes and names

@pytest.mark.parametrize("name, expected", [("DiT-S/2", 32_963_360), ("DiT-B/2", 130_512_416),
                                            ("DiT-XL/2", 675_129_632)])
def test_official_parameter_counts(name, expected):
    with torch.device("meta"):
        model = DiT_models[name](input_size=32)
    assert count_parameters(model) == expected  # pos_embed included, as in the DiT paper's counts


def test_registry_holds_official_sizes_and_digits_sizes():
    official = {f"DiT-{size}/{patch}" for size in ("S", "B", "L", "XL") for patch in (2, 4, 8)}
    assert set(DiT_models) == official | {"DiT-Digits-T", "DiT-Digits-S"}
    # The official widths, depths and heads (DiT paper, Table 1).
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name in official:
        size, patch = name[len("DiT-"):].split("/")
        config = model_config(name)
        assert (config["depth"], config["hidden_size"], config["num_heads"]) == expected[size], name
        assert config["patch_size"] == int(patch), name


def test_digits_teacher_has_at_least_four_times_the_student_parameters():
    digits = dict(input_size=8, in_channels=1, num_classes=10)
    with torch.device("meta"):
        teacher, student = DiT_models["DiT-Digits-T"](**digits), DiT_models["DiT-Digits-S"](**digits)
    assert count_parameters(teacher) >= 4 * count_parameters(student)


def test_official_state_dict_names_and_shapes():
    with torch.device("meta"):
        state_dict = DiT_models["DiT-XL/2"]().state_dict()
    expected = {
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "x_embedder.proj.bias": (1152,),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "pos_embed": (1, 256, 1152),
        "blocks.0.attn.qkv.weight": (3456, 1152),
        "blocks.0.attn.proj.weight": (1152, 1152),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.27.adaLN_modulation.1.weight": (6912, 1152),
        "blocks.27.adaLN_modulation.1.bias": (6912,),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "final_layer.linear.weight": (32, 1152),
        "final_layer.linear.bias": (32,),
    }
    for name, shape in expected.items():
        assert name in state_dict, f"missing official key {name}"
        assert tuple(state_dict[name].shape) == shape, name
    assert "blocks.28.attn.qkv.weight" not in state_dict
    # LayerNorms are affine-free in DiT: no norm parameters at all.
    assert not [name for name in state_dict if "norm" in name]
    assert len(state_dict) == 8 + 28 * 10 + 4  # embedders and pos_embed, 10 per block, final layer


def test_model_config_is_plain_data_with_overrides():
    config = model_config("DiT-XL/2", input_size=16, depth=14, num_classes=10)
    assert config == dict(input_size=16, patch_size=2, in_channels=4, hidden_size=1152, depth=14, num_heads=16,
                          mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True,
                          guidance_embed=False)
    with torch.device("meta"):
        assert DiT(**config).config == config


# ---------------------------------------------------------------- reference forward from timm's blocks

class RefTimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        # Transformer sinusoids: [cos(t w_k), sin(t w_k)], w_k = 10000^(-k / half), in float32 as the original does.
        half = self.frequency_size // 2
        k = torch.arange(half, dtype=torch.float32)
        w = torch.exp(k * (-math.log(10000.0) / half))
        angles = t.float().unsqueeze(1) * w.unsqueeze(0)
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class RefLabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden_size):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y):
        return self.embedding_table(y)


class RefBlock(nn.Module):
    """adaLN-Zero block (DiT paper, Fig. 3): LayerNorm, scale/shift from c, attention or MLP, gate from c, residual."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.attn = TimmAttention(dim, num_heads=num_heads, qkv_bias=True)
        self.attn.fused_attn = False  # timm's explicit softmax(q k^T / sqrt(d)) v path: independent of SDPA
        self.mlp = TimmMlp(in_features=dim, hidden_features=4 * dim, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        D = x.shape[-1]
        m = self.adaLN_modulation(c)
        # The official release's order: shift, scale, gate for attention, then for the MLP.
        shift1, scale1, gate1, shift2, scale2, gate2 = (m[:, i * D:(i + 1) * D, None].transpose(1, 2) for i in range(6))
        h = F.layer_norm(x, (D,), eps=1e-6)
        x = x + gate1 * self.attn(h * (1 + scale1) + shift1)
        h = F.layer_norm(x, (D,), eps=1e-6)
        return x + gate2 * self.mlp(h * (1 + scale2) + shift2)


class RefFinalLayer(nn.Module):
    def __init__(self, dim, out_size):
        super().__init__()
        self.linear = nn.Linear(dim, out_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        D = x.shape[-1]
        m = self.adaLN_modulation(c)
        shift, scale = m[:, None, :D], m[:, None, D:]
        return self.linear(F.layer_norm(x, (D,), eps=1e-6) * (1 + scale) + shift)


class RefDiT(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, num_classes):
        super().__init__()
        self.input_size, self.patch_size = input_size, patch_size
        self.out_channels = 2 * in_channels
        self.x_embedder = TimmPatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = RefTimestepEmbedder(hidden_size)
        self.y_embedder = RefLabelEmbedder(num_classes, hidden_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, (input_size // patch_size) ** 2, hidden_size))
        self.blocks = nn.ModuleList([RefBlock(hidden_size, num_heads) for _ in range(depth)])
        self.final_layer = RefFinalLayer(hidden_size, patch_size * patch_size * self.out_channels)

    def forward(self, x, t, y):
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        patches = self.final_layer(tokens, c)  # (N, T, p * p * C) with (p, q, C) order inside a patch
        N, T, _ = patches.shape
        p, C = self.patch_size, self.out_channels
        # Unpatchify with fold, a second path: fold wants (N, C * p * p, T) with (C, p, q) order.
        columns = patches.reshape(N, T, p, p, C).permute(0, 4, 2, 3, 1).reshape(N, C * p * p, T)
        return F.fold(columns, output_size=(self.input_size, self.input_size), kernel_size=p, stride=p)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        cond, uncond = out[: len(x) // 2, :cfg_channels], out[len(x) // 2:, :cfg_channels]
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), out[:, cfg_channels:]], dim=1)


def test_forward_matches_reference_built_from_timm_blocks():
    config = dict(TINY, depth=3)
    model = random_dit(**config)
    reference = RefDiT(**{k: config[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                                                 "num_heads", "num_classes")})
    reference.load_state_dict(model.state_dict(), strict=True)
    reference.eval()
    x, t, y = model_inputs(model)
    with torch.no_grad():
        out, expected = model(x, t, y), reference(x, t, y)
    assert out.shape == (6, 8, 8, 8)
    assert expected.abs().max() > 0.1  # a meaningful comparison, not zeros against zeros
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    # Classifier-free guidance on the first 3 of 4 latent channels, as the original.
    y_cfg = torch.tensor([1, 4, 7, 10, 10, 10])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y_cfg, cfg_scale=4.0)
        expected = reference.forward_with_cfg(x, t, y_cfg, cfg_scale=4.0, cfg_channels=3)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(guided[:3, :3], guided[3:, :3])  # both halves carry the guided prediction


def test_timestep_embedding_matches_float64_sinusoids():
    t = torch.tensor([0.0, 1.0, 2.5, 999.0])
    emb = TimestepEmbedder.timestep_embedding(t, 256).double()
    half = 128
    w = np.exp(-np.log(10000.0) * np.arange(half) / half)
    angles = t.double().numpy()[:, None] * w[None]
    expected = np.concatenate([np.cos(angles), np.sin(angles)], axis=1)
    # float32 angles up to 999 rad carry an absolute error of ~1e-4
    np.testing.assert_allclose(emb.numpy(), expected, atol=2e-4)
    np.testing.assert_allclose(emb[:3].numpy(), expected[:3], atol=1e-6)
    odd = TimestepEmbedder.timestep_embedding(t, 7)
    assert odd.shape == (4, 7) and torch.all(odd[:, -1] == 0)


# ---------------------------------------------------------------- sin-cos positional embedding

def mae_sincos_1d(positions, dim):
    """MAE's 1-D embedding in float64: [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (dim / 2)), k < dim / 2."""
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.asarray(positions, dtype=np.float64)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@pytest.mark.parametrize("grid_size, dim", [(4, 64), (5, 32), (16, 1152)])
def test_pos_embed_equals_mae_formula(grid_size, dim):
    tokens = np.arange(grid_size * grid_size)
    row, column = tokens // grid_size, tokens % grid_size  # patches are flattened row-major from the conv output
    # The original stacks np.meshgrid(grid_w, grid_h) and embeds grid[0] (the column index, which varies along
    # a row) in the first half of the channels and grid[1] (the row index) in the second half.
    expected = np.concatenate([mae_sincos_1d(column, dim // 2), mae_sincos_1d(row, dim // 2)], axis=1)
    np.testing.assert_allclose(models.get_2d_sincos_pos_embed(dim, grid_size), expected, rtol=0, atol=1e-12)
    if grid_size == 4:
        model = DiT(**(TINY | dict(hidden_size=dim)))
        np.testing.assert_allclose(model.pos_embed[0].double().numpy(), expected, atol=1e-7)
        assert not model.pos_embed.requires_grad
        # Token 1 is row 0, column 1: only the first half of the channels moves away from position 0's values.
        first_half, second_half = slice(0, dim // 2), slice(dim // 2, dim)
        assert not np.allclose(expected[1, first_half], expected[0, first_half])
        np.testing.assert_array_equal(expected[1, second_half], expected[0, second_half])


# ---------------------------------------------------------------- adaLN-Zero and features

def test_adaln_zero_initialisation():
    torch.manual_seed(0)
    model = DiT(**TINY).eval()
    x, t, y = model_inputs(model)
    with torch.no_grad():
        out, features = model(x, t, y, return_features=True)
        embedded = model.x_embedder(x) + model.pos_embed  # (N, T, D)
    assert out.shape == (6, 8, 8, 8) and torch.count_nonzero(out) == 0
    assert len(features) == TINY["depth"]
    for feature in features:  # every block is the identity at init
        assert torch.equal(feature, embedded)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    # The rest is not zero: the zeros come from adaLN-Zero, not from a dead model.
    assert torch.count_nonzero(model.blocks[0].attn.qkv.weight) > 0
    assert torch.count_nonzero(model.t_embedder.mlp[0].weight) > 0


def all_forward_hooks(model):
    return [name for name, module in model.named_modules()
            if module._forward_hooks or module._forward_pre_hooks]


def test_return_features_are_block_outputs_of_the_same_pass():
    model = random_dit(depth=3)
    x, t, y = model_inputs(model)
    with torch.no_grad():
        plain = model(x, t, y)
        out, features = model(x, t, y, return_features=True)
        assert torch.equal(out, plain)
        assert len(features) == 3 and all(f.shape == (6, 16, 64) for f in features)
        # Recompute the chain by hand: each feature is its block applied to the previous one.
        c = model.t_embedder(t) + model.y_embedder(y, False)
        h = model.x_embedder(x) + model.pos_embed
        for block, feature in zip(model.blocks, features):
            h = block(h, c)
            torch.testing.assert_close(feature, h, rtol=0, atol=1e-6)
        torch.testing.assert_close(model.unpatchify(model.final_layer(features[-1], c)), out, rtol=0, atol=1e-6)
    assert all_forward_hooks(model) == [], "return_features left hooks behind"


def test_gradient_checkpointing_gives_same_loss_and_gradients(monkeypatch):
    def loss_and_grads(checkpointing):
        model = random_dit(seed=3, class_dropout_prob=0.0).train()
        model.enable_gradient_checkpointing(checkpointing)
        x, t, y = model_inputs(model)
        y = y.clamp(max=9)  # no null label without dropout
        out, features = model(x, t, y, return_features=True)
        loss = out.square().mean() + sum(f.square().mean() for f in features)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    calls = []
    original = models.checkpoint
    monkeypatch.setattr(models, "checkpoint", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    loss_plain, grads_plain = loss_and_grads(False)
    assert calls == []
    loss_ckpt, grads_ckpt = loss_and_grads(True)
    assert len(calls) == TINY["depth"], "gradient checkpointing was enabled but no block went through checkpoint()"
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=0, atol=1e-6)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-6, atol=1e-6, msg=name)
    # eval / no_grad never checkpoints
    model = random_dit().enable_gradient_checkpointing()
    with torch.no_grad():
        model.train()(*model_inputs(model))
    assert len(calls) == TINY["depth"]


# ---------------------------------------------------------------- classifier-free guidance and labels

def test_cfg_scale_one_equals_conditional_forward():
    model = random_dit()
    x, t, y = model_inputs(model, batch=4)
    x = torch.cat([x[:2], x[:2]])
    t = torch.tensor([10.0, 500.0, 10.0, 500.0])
    y = torch.tensor([2, 7, 10, 10])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=1.0)
        direct = model(x, t, y)
    torch.testing.assert_close(guided[:2, :3], direct[:2, :3], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(guided[2:, :3], direct[:2, :3], rtol=1e-6, atol=1e-6)
    # unguided channels are passed through from each half
    torch.testing.assert_close(guided[:, 3:], direct[:, 3:], rtol=1e-6, atol=1e-6)


def test_cfg_guides_only_the_eps_channel_of_a_one_channel_model():
    model = random_dit(in_channels=1)
    assert model.out_channels == 2
    x, _, _ = model_inputs(model, batch=2)
    x = torch.cat([x, x])
    t = torch.tensor([100.0, 900.0, 100.0, 900.0])
    y = torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        guided = model.forward_with_cfg(x, t, y, cfg_scale=3.0)
        direct = model(x, t, y)
    expected_eps = direct[2:, :1] + 3.0 * (direct[:2, :1] - direct[2:, :1])
    torch.testing.assert_close(guided[:2, :1], expected_eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[2:, :1], expected_eps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided[:, 1:], direct[:, 1:], rtol=1e-6, atol=1e-6,
                               msg="the variance channel of a 1-channel model must not be guided")
    assert not torch.allclose(guided[:2, :1], direct[:2, :1])  # the guidance did something
    # an explicit cfg_channels overrides the default
    with torch.no_grad():
        both = model.forward_with_cfg(x, t, y, cfg_scale=3.0, cfg_channels=2)
    torch.testing.assert_close(both[:2, 1:], direct[2:, 1:] + 3.0 * (direct[:2, 1:] - direct[2:, 1:]),
                               rtol=1e-5, atol=1e-5)


def test_label_dropout():
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.1)
    assert embedder.embedding_table.num_embeddings == 11  # one extra row: the null label
    labels = torch.tensor([1, 2, 3, 4])
    dropped = embedder.token_drop(labels, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert dropped.tolist() == [10, 2, 10, 4]
    with torch.no_grad():
        torch.testing.assert_close(embedder(labels, train=False, force_drop_ids=torch.tensor([1, 0, 1, 0])),
                                   embedder.embedding_table(dropped))
        torch.testing.assert_close(embedder(labels, train=False), embedder.embedding_table(labels))
    assert LabelEmbedder(10, 8, dropout_prob=0.0).embedding_table.num_embeddings == 10

    # train mode with class_dropout_prob=1 always uses the null class; eval mode never drops
    model = random_dit(class_dropout_prob=1.0)
    x, t, _ = model_inputs(model)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    null = torch.full_like(labels, 10)
    with torch.no_grad():
        train_out = model.train()(x, t, labels)
        null_out = model.eval()(x, t, null)
        eval_out = model.eval()(x, t, labels)
    torch.testing.assert_close(train_out, null_out, rtol=0, atol=0)
    assert not torch.allclose(eval_out, null_out)

    # forward(..., force_drop_ids) drops exactly the marked labels, in eval mode too (teacher and student agree)
    force = torch.tensor([1, 0, 0, 1, 0, 1])
    with torch.no_grad():
        forced = model.eval()(x, t, labels, force_drop_ids=force)
        expected = model(x, t, torch.where(force == 1, null, labels))
    torch.testing.assert_close(forced, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- checkpoints

def test_load_raw_state_dict_with_model_name_and_image_size(tmp_path):
    source = randomize(DiT(**model_config("DiT-Digits-S", input_size=8, num_classes=1000)), seed=5)
    path = tmp_path / "raw.pt"
    torch.save(source.state_dict(), path)
    loaded, data = load_dit_checkpoint(path, model_name="DiT-Digits-S", image_size=64)  # 64 px -> 8x8 latents
    assert data == {"image_size": 64, "latent": True, "vae": None, "sampling": EPS_SAMPLING}
    assert not loaded.training
    assert loaded.config == source.config
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    with pytest.raises(ValueError, match="do not fit"):
        load_dit_checkpoint(path, model_name="DiT-Digits-T", image_size=64)
    with pytest.raises(ValueError, match="do not fit"):
        load_dit_checkpoint(path, model_name="DiT-Digits-S", image_size=128)
    with pytest.raises(ValueError, match="do not fit"):
        load_dit_checkpoint(path, model_name="DiT-Digits-S", image_size=64, num_classes=10)
    with pytest.raises(ValueError, match="--model"):
        load_dit_checkpoint(path)
    with pytest.raises(ValueError, match="multiple"):
        load_dit_checkpoint(path, model_name="DiT-Digits-S", image_size=60)


def test_load_training_checkpoint_prefers_ema(tmp_path):
    model = random_dit(seed=1, in_channels=1)
    ema = random_dit(seed=2, in_channels=1)
    path = tmp_path / "0000100.pt"
    torch.save({"config": model.config, "model": model.state_dict(), "ema": ema.state_dict(), "step": 100}, path)
    assert isinstance(torch.load(path, weights_only=True), dict)  # plain data
    loaded, data = load_dit_checkpoint(path)
    assert data == {"image_size": 64, "latent": True, "vae": None, "sampling": EPS_SAMPLING}  # no "data" key: a latent model is assumed
    assert loaded.config == model.config and not loaded.training
    for name, tensor in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), f"{name} was not loaded from 'ema'"
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(loaded.state_dict()[qkv], model.state_dict()[qkv])

    # without 'ema', 'model' is used
    digits = {"image_size": 8, "latent": False, "vae": None}
    torch.save({"config": model.config, "model": model.state_dict(), "data": digits}, path)
    loaded, data = load_dit_checkpoint(path)
    assert torch.equal(loaded.state_dict()[qkv], model.state_dict()[qkv])
    assert data == dict(digits, sampling=EPS_SAMPLING)
    with pytest.raises(ValueError, match="carries its model config"):
        load_dit_checkpoint(path, model_name="DiT-Digits-S", image_size=64)

    # a state dict that does not fit the stored config names the problem
    broken = dict(model.state_dict())
    del broken["blocks.1.mlp.fc2.bias"]
    torch.save({"config": model.config, "ema": broken}, path)
    with pytest.raises(ValueError, match=r"do not fit(.|\n)*blocks\.1\.mlp\.fc2\.bias"):
        load_dit_checkpoint(path)
    wrong_shape = dict(model.state_dict(), **{"pos_embed": torch.zeros(1, 4, 64)})
    torch.save({"config": model.config, "ema": wrong_shape}, path)
    with pytest.raises(ValueError, match=r"do not fit(.|\n)*pos_embed"):
        load_dit_checkpoint(path)


def test_save_checkpoint_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint_atomic({"step": 1, "weight": torch.ones(3)}, path)
    assert sorted(os.listdir(tmp_path / "sub")) == ["ckpt.pt"]
    assert torch.load(path, weights_only=True)["step"] == 1

    def failing_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint_atomic({"step": 2, "weight": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "sub")) == ["ckpt.pt"], "a temporary file was left behind"
    previous = torch.load(path, weights_only=True)
    assert previous["step"] == 1 and torch.equal(previous["weight"], torch.ones(3))

    save_checkpoint_atomic({"step": 3}, path)  # overwriting works
    assert torch.load(path, weights_only=True)["step"] == 3
    assert sorted(os.listdir(tmp_path / "sub")) == ["ckpt.pt"]


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs_raise():
    model = random_dit()
    x, t, y = model_inputs(model)
    with pytest.raises(ValueError, match="8x8"):
        model(x[..., :6, :6], t, y)
    with pytest.raises(ValueError, match="8x8"):
        model(torch.randn(6, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match="unknown model"):
        model_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="divisible"):
        DiT(**(TINY | dict(input_size=9)))
    with pytest.raises(ValueError, match="divisible"):
        DiT(**(TINY | dict(num_heads=5)))
