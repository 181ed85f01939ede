"""Quantization-aware distillation to full INT8: simulated INT8 on every Linear layer of a DiT, and the training method
that fine-tunes a model through it to match its own full-precision predictions.

Every nn.Linear (qkv, proj, fc1, fc2, each adaLN modulation, the timestep / w embedders' MLPs, the final layer)
becomes a FakeQuantLinear, which computes what the exported Q/DQ ONNX computes (QuantizeLinear / DequantizeLinear
with zero points 0, the form TensorRT --stronglyTyped and OpenVINO take):
- its input quantized per tensor to int8 in [-128, 127] (QuantizeLinear's saturation) with a scale calibrated on the
  sampler's inputs (max |x| / 127) and then learned (LSQ, Esser et al. 2020: the straight-through gradient of the
  rounding gives the scale its gradient, round(x / s) - x / s inside the range, the bound outside);
- its weight quantized per output channel, symmetric, scale max |w_row| / q_max tracked from the weight itself, with
  q_max = 63 (7-bit weights) by default: on x86 CPUs without AVX-512 VNNI, onnxruntime's and OpenVINO's int8 kernels
  add pairs of u8 x s8 products into int16 (VPMADDUBSW), which saturates with full-range weights (255 * 127 * 2 >
  32767) and never with 7-bit ones (255 * 63 * 2 = 32130); the one file then holds on every CPU, and TensorRT, which
  does not saturate, loses one weight bit that the fine-tuning learns around (README: the INT8 table measures it);
- straight-through gradients for the weights and the inputs (zero outside the clipping range).
The patch embedding (a convolution), the label table and attention's two activation products stay floating point.

torch.ao's QAT is deprecated and its fake-quant ops do not go through the dynamo ONNX exporter (pytorch#167063), so
the fake quantization is the few lines below; the export uses torch's quantized_decomposed ops, which the exporter
writes as QuantizeLinear / DequantizeLinear with int8 weights (FakeQuantLinear.mode = "export", export.py).

The method (train.py --step-distillation qat --teacher-ckpt CKPT): the student is CKPT's own model with every Linear
fake-quantized, started from its weights; the teacher is CKPT in full precision, frozen. The loss is the mean
squared difference of their outputs on training data forward-noised at the timesteps the model's sampler visits (its
few-step grid, or DDIM --qat-ddim-steps for a plain diffusion model), with w drawn over its guidance range: it
composes after any step-distillation method, guidance included, and keeps the sampler, steps and guidance range.
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATION_QMIN, ACTIVATION_QMAX = -128, 127  # int8, as ONNX QuantizeLinear saturates
DEFAULT_WEIGHT_BITS = 7  # safe on AVX2-only x86 CPUs (module docstring)
SCALE_FLOOR = 1e-8  # the smallest calibrated scale: a layer whose calibration saw only zeros keeps a finite grid


def round_ste(x):
    """round(x) forward (half to even, as ONNX), identity backward (the straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


# ONNX QuantizeLinear then DequantizeLinear with zero point 0: saturate(round(x / scale)) * scale; LSQ's gradient.
def fake_quantize(x, scale, qmin, qmax):
    """x quantized to the integer grid scale * [qmin, qmax] and back; scale broadcasts against x."""
    return round_ste(torch.clamp(x / scale, qmin, qmax)) * scale


def weight_scale(weight, qmax):
    """(out, 1): symmetric per-output-channel scales max |w_row| / qmax (a function of the weight, not learned)."""
    return weight.detach().abs().amax(dim=1, keepdim=True).clamp(min=SCALE_FLOOR) / qmax


def quantized_weight(weight, qmax):
    """(int8 (out, in) integers, float (out,) scales) of a weight, exactly as FakeQuantLinear uses it."""
    scale = weight_scale(weight, qmax)
    return torch.clamp(torch.round(weight.detach() / scale), -qmax, qmax).to(torch.int8), scale.flatten()


class FakeQuantLinear(nn.Linear):
    """nn.Linear with simulated INT8 (module docstring), its parameters named as nn.Linear's plus input_log_scale.

    mode: "fake" (training and sampling: the INT8 result in floating point), "float" (the plain Linear: the model's
    fp32 export) or "export" (torch's quantized_decomposed ops, which the dynamo ONNX exporter writes as Q/DQ).
    """

    def __init__(self, in_features, out_features, bias=True, weight_bits=DEFAULT_WEIGHT_BITS):
        super().__init__(in_features, out_features, bias)
        self.weight_qmax = 2 ** (weight_bits - 1) - 1
        # log of the input's step size: set by calibrate(), learned after; as a log it stays positive and AdamW's
        # steps change it relatively, whatever its magnitude (adaLN inputs have steps of 1e-4, token ones of 1e-2)
        self.input_log_scale = nn.Parameter(torch.zeros(()))
        self.mode = "fake"

    def scale(self):
        return self.input_log_scale.exp()

    def forward(self, x):
        if self.mode == "float":
            return super().forward(x)
        if self.mode == "export":
            return self.export_forward(x)
        x = fake_quantize(x, self.scale(), ACTIVATION_QMIN, ACTIVATION_QMAX)
        weight = fake_quantize(self.weight, weight_scale(self.weight, self.weight_qmax), -self.weight_qmax,
                               self.weight_qmax)
        return F.linear(x, weight, self.bias)

    def freeze_for_export(self):
        """The constants export_forward reads: the input scale as a number, the int8 weight (in, out) and its
        per-channel scales, computed once from the parameters. Called before the export starts, so that torch's
        quantized_decomposed ops are registered when the ONNX exporter builds its table of translations."""
        import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
        integers, scales = quantized_weight(self.weight, self.weight_qmax)
        self.exported = (self.scale().item(), integers.t().contiguous(), scales,
                         torch.zeros_like(scales, dtype=torch.int64))

    def export_forward(self, x):
        """The same numbers through QuantizeLinear / DequantizeLinear: int8 weights stored (in, out), dequantized
        per output channel (axis 1) and multiplied with MatMul, so no Transpose sits between a DQ and its MatMul."""
        ops, (scale, integers, scales, zeros) = torch.ops.quantized_decomposed, self.exported
        low, high, q = ACTIVATION_QMIN, ACTIVATION_QMAX, self.weight_qmax
        x = ops.dequantize_per_tensor(ops.quantize_per_tensor(x, scale, 0, low, high, torch.int8), scale, 0, low,
                                      high, torch.int8)
        weight = ops.dequantize_per_channel(integers, scales, zeros, 1, -q, q, torch.int8)  # (in, out)
        out = torch.matmul(x, weight)  # (..., out)
        return out + self.bias if self.bias is not None else out


def fake_quantize_linears(model, weight_bits):
    """Replace every nn.Linear of model by a FakeQuantLinear with the same weights, in place; returns model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                quantized = FakeQuantLinear(child.in_features, child.out_features, child.bias is not None,
                                            weight_bits)
                quantized.load_state_dict(child.state_dict(), strict=False)  # input_log_scale: calibrate()
                setattr(module, name, quantized)
    return model


def quantized_linears(model):
    """{name: FakeQuantLinear} of model (empty for a model that was not made quantization-aware)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@contextlib.contextmanager
def linear_mode(model, mode):
    """Every FakeQuantLinear of model in `mode` ("fake", "float" or "export") inside the block."""
    layers = quantized_linears(model).values()
    previous = [layer.mode for layer in layers]
    for layer in layers:
        layer.mode = mode
        if mode == "export":
            layer.freeze_for_export()
    try:
        yield model
    finally:
        for layer, old in zip(layers, previous):
            layer.mode = old
            layer.__dict__.pop("exported", None)  # export_forward's constants, derived from the parameters


@torch.no_grad()
def calibrate(model, forward, batches):
    """Each FakeQuantLinear's input scale <- max |input| / 127 over forward(batch) for batch in batches, the model in
    full precision (MinMax calibration, the start that LSQ then learns from). Returns {name: scale}."""
    layers = quantized_linears(model)
    if not layers:
        raise ValueError("the model has no FakeQuantLinear to calibrate: build it with quantization")
    peaks = dict.fromkeys(layers, 0.0)

    def record(name):
        def hook(module, inputs):
            peaks[name] = max(peaks[name], inputs[0].detach().abs().max().item())
        return hook
    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:
        with linear_mode(model, "float"):
            for batch in batches:
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        layer.input_log_scale.fill_(math.log(max(peaks[name], SCALE_FLOOR * ACTIVATION_QMAX) / ACTIVATION_QMAX))
    return {name: layer.scale().item() for name, layer in layers.items()}
