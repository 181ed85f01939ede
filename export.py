"""Export a DiT denoiser (TorchScript, ONNX, torch.export), optionally in int8 or fp16, and check it in a fresh process.

    python export.py --ckpt results/digits/checkpoints/0002000.pt --format onnx --int8 --fp16 --dynamic-batch
    python export.py --ckpt DiT-S-2.pt --model DiT-S/2 --image-size 256 --format torchscript --int8 --cfg-scale 4

The exported function is the denoiser: x_t (N, C, H, W) float32, t (N,) float32 timesteps in [0, 1000), y (N,) int32
labels -> the DiT output (N, C_out, H, W) (eps, then the variance channels of a learned-sigma model). With --cfg-scale
the graph also runs the null-label batch and returns the guided output (classifier-free guidance folded in).
Files written: OUT (fp32) and beside it, with --int8, OUT_int8 (ONNX: also OUT_int8_cpu.onnx and OUT_calib.npz), with
--fp16 (ONNX only) OUT_fp16.onnx. Each file carries the metadata run_exported.py needs (image size, channels, classes,
learned sigma, folded guidance, pixel or latent, how the model samples): embedded (dit_export.json inside TorchScript
and .pt2 archives, metadata_props["dit_export"] in ONNX) and as OUT.json beside it. Every file takes and returns
float32, so run_exported.py runs them all alike.
  torchscript  torch.jit.trace, then torch.jit.freeze; what libtorch loads, e.g. on a Jetson's CPU. int8: torch.ao
               dynamic quantization of the Linear layers (int8 weights per tensor, activations quantized per call),
               CPU only.
  onnx         torch.onnx.export(dynamo=True), opset 18; for onnxruntime, and for TensorRT on a Jetson's GPU.
               int8: OUT_int8.onnx, explicit INT8 as TensorRT's strongly typed networks take it: QuantizeLinear /
               DequantizeLinear pairs (zero point 0) around the Linear layers on tokens, scales calibrated by
               onnxruntime's quantize_static on OUT_calib.npz (training data forward-noised at the timesteps the
               model's sampler visits; keep it to re-quantize on the device). OUT_int8_cpu.onnx: onnxruntime's dynamic
               int8 (MatMulInteger), faster on x86 / ARM CPUs, which TensorRT cannot parse.
               fp16: OUT_fp16.onnx, fp16 weights and arithmetic in the graph, the sinusoidal timestep embedding and the
               LayerNorms kept in fp32, inputs and output float32.
  exported     torch.export's ExportedProgram saved with torch.export.save (.pt2); fp32 only (INT8_EXPORTED_UNSUPPORTED
               below says why).
Right after it is written, every file is loaded and run in a fresh Python process that can import nothing of the
project (a copy of run_exported.py in an empty folder), compared with the eager fp32 model and timed on the CPU; ONNX
files run there in onnxruntime and, where it is installed, in OpenVINO (the table's openvino rows, with the kernels
OpenVINO's profiling saw).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from checks import UserError, check_output_path, non_negative_float, positive_int, run_script
from data import LATENT_SCALE, DigitsDataset, LatentsDataset
from diffusion.gaussian_diffusion import get_named_beta_schedule
from models import DiT, DiT_models, load_dit_checkpoint
from quantization import linear_mode, quantized_linears
from run_exported import METADATA_FILE, METADATA_KEY, describe_cpu, quiet_torchscript_deprecation
from sampling import DIFFUSION_STEPS, SAMPLERS, SamplingSpec, classifier_free_guidance, leading_timesteps, q_sample

EXTENSIONS = {"torchscript": ".ts", "onnx": ".onnx", "exported": ".pt2"}
# The dynamo exporter's lowest native opset. Asking it for 17 runs a version converter that (torch 2.14, onnx 1.23)
# leaves opset-18 Split attributes in the graph, a model onnx.checker rejects.
ONNX_OPSET = 18
ONNX_PROTOBUF_LIMIT = 2 ** 31 - 1  # bigger ONNX files keep their weights in OUT.data beside them
VERIFY_BATCH_SIZES = (1, 8)  # a dynamic-batch export is checked and timed at these (it is traced at batch 2)
FP32_TOLERANCE = 1e-4  # relative error an fp32 export may have against the eager model
FP16_TOLERANCE = 0.01  # an fp16 export further than this from fp32 is broken (the digits student: 4e-4)
INT8_TOLERANCE = 0.2  # an int8 export further than this from fp32 is broken, not merely quantized
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE, "int8": INT8_TOLERANCE, "int8-cpu": INT8_TOLERANCE}
CALIB_SAMPLES = 256  # default rows of OUT_calib.npz
CALIB_DDIM_STEPS = 50  # default DDIM steps whose timesteps calibrate a plain (not step-distilled) model
NOISE_SEED = 0  # seed of the calibration set's data draw, timesteps order and noise
NEAR_ZERO_RMS = 1e-3  # below this RMS the reference output counts as zero and errors are measured absolutely
INT8_EXPORTED_UNSUPPORTED = (
    "--int8 is not available with --format exported: torch.export cannot serialise torch.ao's dynamically "
    "quantized Linear layers (their packed weights are TorchScript objects), and torch's replacement, torchao, needs "
    "torchao installed wherever the .pt2 is loaded and torch.compile to be fast. Use --format torchscript --int8 "
    "for the CPU, or --format onnx --int8 (onnxruntime, and TensorRT's int8 on a Jetson)")
RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_exported.py")


#################################################################################
#                               What is exported                                #
#################################################################################

class Denoiser(nn.Module):
    """(x, t, y) -> DiT output; with cfg_scale, classifier-free guidance (Ho & Salimans 2022, Eq. 6) folded in."""

    def __init__(self, model, cfg_scale=None):
        super().__init__()
        self.model = model
        self.cfg_scale = cfg_scale
        self.null_label = model.config["num_classes"]

    def forward(self, x, t, y, w=None):
        if w is not None:  # a guidance-distilled model: the guidance scale is an input, one forward
            return self.model(x, t, y, w=w)  # (N, C_out, H, W)
        if self.cfg_scale is None:
            return self.model(x, t, y)  # (N, C_out, H, W)
        # forward_with_cfg halves its batch with len(x), which a trace would freeze; this is its first half.
        null = torch.full_like(y, self.null_label)
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))  # (2N, C_out, H, W)
        cond, uncond = out.unflatten(0, (2, -1)).unbind(0)  # each (N, C_out, H, W)
        return classifier_free_guidance(cond, uncond, self.cfg_scale, self.model.in_channels)  # (N, C_out, H, W)


def quantize_int8(model):
    """A copy of model whose Linear layers run in int8 on the CPU (torch.ao dynamic quantization).

    Weights are int8 (per tensor); activations are quantized per call from their observed range.
    """
    model = full_precision_copy(model)  # torch.ao converts exact nn.Linear types only
    names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, whose int8 needs torch.compile and does not trace
        # to TorchScript; quantize_dynamic is still the int8 path libtorch runs on a CPU, so we use it knowingly.
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor", category=UserWarning)
        return torch.ao.quantization.quantize_dynamic(model, names, dtype=torch.qint8, inplace=False)


def full_precision_copy(model):
    """The model itself, or for a quantization-aware one a plain DiT with its weights (no fake quantization)."""
    if not quantized_linears(model):
        return model
    config = {k: v for k, v in model.config.items() if k != "weight_bits"}
    plain = DiT(**config)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith(".input_log_scale")})
    return plain.eval()


def int8_scheme(model, args, precision):
    """How the int8 file of this export is quantized, in words (its metadata's "quantization")."""
    if precision == "int8-cpu":
        return "onnxruntime dynamic int8 of the MatMuls (activations quantized per call), CPU only"
    if args.format != "onnx":
        return "torch.ao dynamic int8 of every Linear (per-tensor weights, activations quantized per call), CPU only"
    if args.int8_scales == "learned":
        return (f"learned Q/DQ on every Linear (quantization-aware distillation): {model.config['weight_bits']}-bit "
                f"per-channel weights, int8 per-tensor inputs, zero points 0")
    return "calibrated Q/DQ on the token Linears (post-training quantize_static on OUT_calib.npz), zero points 0"


def export_metadata(model, data, args, precision):
    """The plain-data description run_exported.py needs (and a person reading OUT.json)."""
    config = model.config
    betas = get_named_beta_schedule("linear", DIFFUSION_STEPS)
    size, channels = config["input_size"], config["in_channels"]
    spec = SamplingSpec.from_checkpoint_entry(data["sampling"])
    takes_w = model.w_embedder is not None
    w_input = {"w": f"float32 (N,) guidance scales in {list(spec.guidance_range)}"} if takes_w else {}
    head = ("eps~ then x~ (x-eps: x_0 = sigma_t^2 x~ + alpha_t (x_t - sigma_t eps~))"
            if spec.parametrisation == "x-eps" else
            "eps" + (", then the learned variance" if config["learn_sigma"] else ""))
    return {
        "format": args.format, "precision": precision,
        # a trace records the CPU for the tensors it creates; MatMulInteger is onnxruntime's CPU int8
        "device": "any" if args.format == "onnx" and precision != "int8-cpu" else "cpu",
        "input_size": size, "in_channels": channels, "out_channels": model.out_channels,
        "learn_sigma": config["learn_sigma"], "num_classes": config["num_classes"],
        "latent": data["latent"], "image_size": data["image_size"], "vae": data["vae"],
        "latent_scale": LATENT_SCALE if data["latent"] else None,
        "cfg_scale": args.cfg_scale, "batch_size": None if args.dynamic_batch else args.batch_size,
        "inputs": {"x": f"float32 (N, {channels}, {size}, {size})", "t": "float32 (N,) timesteps in [0, 1000)",
                   "y": f"int32 (N,) class labels in [0, {config['num_classes']})", **w_input},
        "output": f"float32 (N, {model.out_channels}, {size}, {size}): {head}"
                  + (f", guided with scale {args.cfg_scale}" if args.cfg_scale is not None else ""),
        "sampling": spec.to_dict(),
        "diffusion": {"schedule": "linear", "num_timesteps": len(betas), "beta_start": float(betas[0]),
                      "beta_end": float(betas[-1])},
        "model_config": config, "source": os.path.basename(args.ckpt), "torch": torch.__version__,
        **({"quantization": int8_scheme(model, args, precision)} if precision.startswith("int8") else {}),
    }


#################################################################################
#                                    Writers                                    #
#################################################################################

def batch_dims(dynamic, names="xty"):
    """torch.export dynamic_shapes: one symbolic batch size shared by x, t, y (and w) (None: all static)."""
    if not dynamic:
        return None
    batch = torch.export.Dim("batch", min=1, max=4096)
    return {name: {0: batch} for name in names}


def write_torchscript(denoiser, example, path, metadata, dynamic):
    """torch.jit.trace, then torch.jit.freeze; the trace keeps the batch size symbolic either way (metadata says what
    was asked for). Freezing inlines the submodules into one graph with the weights as constants: the same numbers,
    and a file without the per-module code (about 240 KB for a small DiT, which would otherwise dwarf its int8
    weights)."""
    with quiet_torchscript_deprecation(), warnings.catch_warnings():
        # The tracer flags models.py's reads of the spatial size and token count, fixed per model (PatchEmbed rejects
        # other sizes); the batch size stays symbolic, which the fresh-process check at other batch sizes confirms.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module="models")
        traced = torch.jit.freeze(torch.jit.trace(denoiser.eval(), example))
        torch.jit.save(traced, path, _extra_files={METADATA_FILE: json.dumps(metadata)})


def write_exported(denoiser, example, path, metadata, dynamic):
    program = torch.export.export(denoiser, example, dynamic_shapes=batch_dims(dynamic, "xtyw"[:len(example)]))
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(metadata)})


def write_onnx(denoiser, example, path, metadata, dynamic):
    """torch.onnx.export with the dynamo exporter, the default and maintained one (the TorchScript-based exporter
    is deprecated); its graph matches eager to ~1e-6 at every batch size for DiT. Weights over 2 GB go to OUT.data."""
    with warnings.catch_warnings():
        # x, t and y share one batch symbol; the exporter notes that it keeps a single name for it.
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        names = list("xtyw"[:len(example)])  # w: the guidance scale of a guidance-distilled model
        program = torch.onnx.export(denoiser, example, None, input_names=names, output_names=["out"],
                                    opset_version=ONNX_OPSET, dynamo=True,
                                    dynamic_shapes=batch_dims(dynamic, names), verbose=False)
    for node in program.model.graph:  # drop the per-node debug records (stack traces with local paths, FX names)
        node.metadata_props.clear()
    program.model.metadata_props[METADATA_KEY] = json.dumps(metadata)
    weight_bytes = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    program.save(path, external_data=weight_bytes > ONNX_PROTOBUF_LIMIT)


WRITERS = {"torchscript": write_torchscript, "onnx": write_onnx, "exported": write_exported}


def gemm_to_matmul(model):
    """Rewrite Gemm nodes with constant weights as MatMul + Add, in place, on an onnx.ModelProto.

    onnxruntime's dynamic quantization covers MatMul but not Gemm, which the exporter emits for the Linear layers on
    (N, D) inputs: the timestep MLP and every adaLN modulation, a third of DiT's weights.
    """
    from onnx import helper, numpy_helper

    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = (attributes.get("alpha", 1.0), attributes.get("beta", 1.0), attributes.get("transA", 0)) == (1, 1, 0)
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(weights[node.input[1]])
        weight = weight.T if attributes.get("transB", 0) else weight  # (in, out)
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), node.name + "_weight"))
        product = node.output[0] + "_matmul"
        nodes.append(helper.make_node("MatMul", [node.input[0], node.name + "_weight"], [product], node.name + "_mm"))
        if len(node.input) > 2 and node.input[2]:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], node.name + "_bias"))
        else:
            nodes.append(helper.make_node("Identity", [product], [node.output[0]], node.name + "_out"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {name for node in model.graph.node for name in node.input}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def staged_onnx(fp32_path, metadata, folder, rewrite=None, prepare=False):
    """A copy of the fp32 ONNX file in folder carrying metadata (and rewritten by rewrite), for a quantizer to read;
    weights beside it as the fp32 file has them. prepare: run the symbolic shape inference onnxruntime's quantizers
    ask for, without graph optimisation (which could fuse MatMul + Add back into Gemm). Returns (path, external)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = onnx.load(fp32_path)
    if rewrite is not None:
        rewrite(model)
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(metadata))  # onnxruntime's quantizers carry it over
    external = os.path.exists(fp32_path + ".data")  # as write_onnx chose for the fp32 file
    staged, prepared = os.path.join(folder, "staged.onnx"), os.path.join(folder, "prepared.onnx")
    onnx.save(model, staged, save_as_external_data=external)
    if not prepare:
        return staged, external
    quant_pre_process(staged, prepared, skip_optimization=True, save_as_external_data=external,
                      all_tensors_to_one_file=True)
    return prepared, external


def quantize_onnx_cpu(fp32_path, int8_path, metadata):
    """onnxruntime dynamic int8 of the MatMuls with constant weights (the Linear layers; attention stays fp32), for
    CPUs only: TensorRT cannot parse its DynamicQuantizeLinear / MatMulInteger nodes.

    QInt8 weights, per tensor like torch's quantize_dynamic (per channel measured ~10% less error but 1.5x the batch-8
    latency on DiT-S/2); activations are quantized per call by DynamicQuantizeLinear, which produces uint8 only, so
    the products run as uint8 x int8 MatMulInteger.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        prepared, external = staged_onnx(fp32_path, metadata, tmp, rewrite=gemm_to_matmul, prepare=True)
        # reduce_range: 7-bit weights. On x86 CPUs without AVX-512 VNNI, onnxruntime's u8s8 MatMulInteger runs on
        # VPMADDUBSW, whose int16 sums saturate with full-range weights (relative error 0.09 instead of 0.01 on an
        # AVX2-only machine, as onnxruntime's quantization guide warns); 7 bits cannot saturate there.
        quantize_dynamic(prepared, int8_path, op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=True,
                         weight_type=QuantType.QInt8, use_external_data_format=external)


def token_linear_nodes(model):
    """Names of the MatMuls with a constant weight: the Linear layers on tokens (qkv, proj, fc1, fc2, final)."""
    weights = {tensor.name for tensor in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and node.input[1] in weights]


def quantize_onnx_qdq(fp32_path, int8_path, metadata, calibration, reduce_range=True):
    """Explicit INT8 for TensorRT and CPUs: QuantizeLinear / DequantizeLinear around the Linear layers on tokens,
    nothing else added (onnxruntime's quantize_static, QDQ format; TensorRT fuses each Q/DQ pair with its MatMul into
    an int8 GEMM, onnxruntime and OpenVINO run it as an int8 MatMul).

    Symmetric int8 everywhere (zero points 0, as TensorRT requires): weights per output channel, activations per
    tensor with the max |value| seen on the calibration rows. The timestep / adaLN Gemms (one row per image, a third
    of DiT's weights), the patch embedding and attention's two activation products stay fp32, as ModelOpt's ONNX PTQ
    leaves them too: quantizing the Gemms that read the timestep embedding raised the error from 3% to 14% on inputs
    away from the calibrated timesteps (digits student).

    reduce_range (the default): 7-bit weights, in [-64, 64] (scale max |w| / 64 per channel). On x86 CPUs without
    AVX-512 VNNI / AVX-VNNI (AVX2 only) onnxruntime's fused int8 kernels, and OpenVINO's legacy int8 path, shift the
    int8 activations to uint8 (+128) and multiply with VPMADDUBSW, which adds each pair of u8 x s8 products into an
    int16 with saturation: with full-range weights (|w| <= 127) a pair reaches 2 * 255 * 127 = 64770 and saturates
    (9.8% error measured on a digits Q/DQ file on such a CPU, issue 21); with |w| <= 64 it stays within 2 * 255 * 64
    = 32640 < 32767, so the file computes the same numbers on every CPU. One 7-bit file serves every target, TensorRT
    included, rather than one file per target: TensorRT (no saturation) would gain only the finer weight grid of 8
    bits, 0.2-0.3 points of relative error computed exactly (1.7% against 1.4-1.5%, digits student and DiT-S/2,
    README), and a file that is silently wrong on the CPU it happens to meet is worse than one slightly less exact
    everywhere. reduce_range=False writes full-range weights (for that measurement).
    """
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    batch = metadata["batch_size"] or 1
    rows = len(calibration["t"])
    feeds = [{name: column[np.arange(start, start + batch) % rows] for name, column in calibration.items()}
             for start in range(0, rows, batch)]  # a fixed-batch file is fed its own batch size (wrapping around)

    class CalibrationRows(CalibrationDataReader):  # quantize_static asks for a reader object, not a list
        def get_next(self):
            return feeds.pop(0) if feeds else None

    with tempfile.TemporaryDirectory() as tmp:
        staged, external = staged_onnx(fp32_path, metadata, tmp, prepare=True)
        quantize_static(staged, int8_path, CalibrationRows(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], nodes_to_quantize=token_linear_nodes(onnx.load(staged)),
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=external,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})


#################################################################################
#                            fp16 written into the ONNX                         #
#################################################################################

FP32_OPS = {"LayerNormalization", "Cast", "Constant", "ConstantOfShape", "Range"}  # normalisations; typed sources


def timestep_embedding_nodes(graph):
    """Nodes from the inputs t (and w) up to the first Gemm / MatMul they feed: the sinusoidal embeddings, whose
    arguments reach t * 1 = 999, where fp16's spacing is 0.5 (a cos of anything)."""
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found, frontier = set(), [tensor.name for tensor in graph.input if tensor.name in ("t", "w")]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type not in ("Gemm", "MatMul") and node.name not in found:
                found.add(node.name)
                frontier.extend(node.output)
    return found


def cast_node(name, to_fp16):
    from onnx import TensorProto, helper

    cast = f"{name}_{'fp16' if to_fp16 else 'fp32'}"
    return helper.make_node("Cast", [name], [cast], cast + "_cast",
                            to=TensorProto.FLOAT16 if to_fp16 else TensorProto.FLOAT)


def convert_to_fp16(model):
    """An onnx.ModelProto with fp16 weights and arithmetic, except the timestep embedding and the FP32_OPS nodes;
    a Cast wherever a float tensor crosses between the two, inputs and outputs kept float32."""
    import onnx
    from onnx import TensorProto, numpy_helper

    graph = onnx.shape_inference.infer_shapes(model).graph
    floats = {tensor.name for tensor in list(graph.input) + list(graph.value_info) + list(graph.output)
              if tensor.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {tensor.name for tensor in graph.initializer if tensor.data_type == TensorProto.FLOAT}
    fp32_nodes = timestep_embedding_nodes(graph) | {node.name for node in graph.node if node.op_type in FP32_OPS}
    fp16_nodes = [node for node in graph.node if node.name not in fp32_nodes]
    halves = {name for node in fp16_nodes for name in node.output if name in floats}  # tensors held in fp16
    fp16_inputs = {name for node in fp16_nodes for name in node.input}
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT and tensor.name in fp16_inputs:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
            halves.add(tensor.name)
    outputs = {tensor.name for tensor in graph.output}
    nodes, casts = [], {}
    for node in graph.node:
        to_fp16 = node.name not in fp32_nodes
        for i, name in enumerate(node.input):
            if name in floats and (name in halves) != to_fp16:
                if (name, to_fp16) not in casts:
                    casts[name, to_fp16] = cast_node(name, to_fp16)
                    nodes.append(casts[name, to_fp16])
                node.input[i] = casts[name, to_fp16].output[0]
        renamed = [name for name in node.output if name in outputs and name in halves]
        for i, name in enumerate(node.output):
            node.output[i] = name + "_fp16" if name in renamed else name
        nodes.append(node)
        for name in renamed:  # the graph's output, back to float32
            nodes.append(cast_node(name + "_fp16", to_fp16=False))
            nodes[-1].output[0] = name
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale types; onnxruntime and TensorRT infer them again
    model.graph.CopyFrom(graph)


def write_onnx_fp16(fp32_path, fp16_path, metadata):
    """OUT_fp16.onnx from the fp32 file: convert_to_fp16, checked by onnx.checker. Hand-written with onnx's helpers:
    ModelOpt's AutoCast does the same, but its install pins onnx and onnxruntime-gpu versions (README)."""
    import onnx

    with tempfile.TemporaryDirectory() as tmp:
        staged, _ = staged_onnx(fp32_path, metadata, tmp, rewrite=convert_to_fp16)
        model = onnx.load(staged)
    external = model.ByteSize() > ONNX_PROTOBUF_LIMIT  # half the fp32 file's weights: often under the limit
    onnx.save(model, fp16_path, save_as_external_data=external, location=os.path.basename(fp16_path) + ".data")
    onnx.checker.check_model(fp16_path)


#################################################################################
#                        Calibration set for the INT8 file                      #
#################################################################################

def sampler_timesteps(sampling, ddim_steps):
    """The timesteps the model's own sampler calls it at (SAMPLERS' own list): a step-distilled student's few-step
    grid at its default steps, else those of DDIM with ddim_steps steps."""
    spec = SamplingSpec.from_checkpoint_entry(sampling)
    if spec.sampler is None:
        return SAMPLERS["ddim"].timesteps(ddim_steps, spec)
    return SAMPLERS[spec.sampler].timesteps(spec.default_steps, spec)


def training_data(config, data, num_samples, latents_path, generator):
    """num_samples (x_0 float32 (N, C, H, W), labels) drawn from the data the model was trained on: digits pixels in
    [-1, 1], or latents written by extract_latents.py; a latent model without latents_path gets N(0, 1) stand-ins
    (the latent scale makes latents about unit variance)."""
    if not data["latent"]:
        dataset = DigitsDataset("train", data["image_size"])
    elif latents_path is not None:
        dataset = LatentsDataset(latents_path)
    else:
        print("no --calib-latents: calibrating on N(0, 1) stand-ins for the latents; pass the extract_latents.py "
              "folder the model was trained on for a calibration from its own data")
        shape = (num_samples, config["in_channels"], config["input_size"], config["input_size"])
        labels = torch.randint(0, config["num_classes"], (num_samples,), generator=generator)
        return torch.randn(shape, generator=generator), labels
    indices = torch.randperm(len(dataset), generator=generator)[torch.arange(num_samples) % len(dataset)]
    x0, labels = zip(*(dataset[int(i)] for i in indices))
    return torch.stack(x0).float(), torch.stack(labels)


def calibration_set(config, data, num_samples, ddim_steps, latents_path=None, seed=NOISE_SEED):
    """Inputs as the exported graph meets them in sampling: training data forward-noised, x_t = q_sample(x_0, t)
    (DDPM Eq. 4), t cycling over the timesteps the model's sampler visits, labels from the data; w spread over the
    guidance range of a guidance-distilled model. Returns {"x": float32 (N, C, H, W), "t": float32 (N,), "y": int32
    (N,)[, "w": float32 (N,)]}."""
    generator = torch.Generator().manual_seed(seed)
    x0, labels = training_data(config, data, num_samples, latents_path, generator)
    timesteps = torch.tensor(sampler_timesteps(data["sampling"], ddim_steps))
    t = timesteps[torch.randperm(num_samples, generator=generator) % len(timesteps)]
    noise = torch.randn(x0.shape, generator=generator)
    x = q_sample(x0, t, noise)
    calibration = {"x": x.float().numpy(), "t": t.float().numpy(), "y": labels.int().numpy()}
    if config.get("guidance_embed"):
        low, high = SamplingSpec.from_checkpoint_entry(data["sampling"]).guidance_range
        calibration["w"] = (low + (high - low) * torch.rand(num_samples, generator=generator)).numpy()
    return calibration


#################################################################################
#                     Verification in a fresh process, table                    #
#################################################################################

def verification_inputs(config, batch_sizes, seed=0, guidance_range=None):
    """Fixed inputs {x_<B>, t_<B>, y_<B>} per batch size: unit Gaussian x, spread timesteps and labels; and w_<B>,
    guidance scales spread over guidance_range, for a guidance-distilled model."""
    generator = torch.Generator().manual_seed(seed)
    size, channels, classes = config["input_size"], config["in_channels"], config["num_classes"]
    inputs = {}
    for batch in batch_sizes:
        inputs[f"x_{batch}"] = torch.randn(batch, channels, size, size, generator=generator).numpy()
        inputs[f"t_{batch}"] = torch.randint(0, DIFFUSION_STEPS, (batch,), generator=generator).float().numpy()
        inputs[f"y_{batch}"] = torch.randint(0, classes, (batch,), generator=generator).int().numpy()
        if guidance_range is not None:
            low, high = guidance_range
            inputs[f"w_{batch}"] = (low + (high - low) * torch.rand(batch, generator=generator)).numpy()
    return inputs


def file_size(path):
    """Bytes on disk, counting an ONNX file's external weights (OUT.data)."""
    return os.path.getsize(path) + (os.path.getsize(path + ".data") if os.path.exists(path + ".data") else 0)


def run_in_fresh_process(paths, inputs, repeats=0, threads=None):
    """Load and run files in a new Python that can import run_exported.py only (a copy, in an empty folder).

    Returns (outputs, latencies): per file, {B: output} for every batch size B in inputs and {B: median CPU seconds}
    (empty unless repeats > 0; the files are timed interleaved, in the same process, with threads CPU threads).
    """
    outputs, report = fresh_process_report(paths, inputs, repeats, threads)
    return outputs, report["latency_s"]


def fresh_process_report(paths, inputs, repeats=0, threads=None, runtimes=None):
    """run_in_fresh_process, with runtimes (per file: onnxruntime or openvino, see run_exported.run_files); returns
    (outputs, run_files' report with integer batch sizes)."""
    runtimes = runtimes or ["onnxruntime"] * len(paths)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(RUNNER, tmp)
        inputs_path = os.path.join(tmp, "inputs.npz")
        np.savez(inputs_path, **inputs)
        code = ("import json, sys, run_exported; repeats, threads, inputs, folder, runtimes, *paths = sys.argv[1:]; "
                "print(json.dumps(run_exported.run_files(paths, inputs, folder, int(repeats), int(threads), "
                "runtimes.split(','))))")
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        command = [sys.executable, "-c", code, str(repeats), str(threads or 0), inputs_path, tmp, ",".join(runtimes)]
        command += [os.path.abspath(path) for path in paths]
        process = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if process.returncode:
            raise RuntimeError(f"{', '.join(paths)} did not load and run in a fresh process:\n"
                               f"{process.stderr[-4000:]}")
        report = json.loads(process.stdout.strip().splitlines()[-1])
        outputs = []
        for i in range(len(paths)):
            with np.load(os.path.join(tmp, f"{i}.npz")) as saved:
                outputs.append({int(key[4:]): saved[key] for key in saved.files})
    if report["modules"]:
        raise RuntimeError(f"running {', '.join(paths)} imported {report['modules']}, which they must not need")
    report["latency_s"] = [{int(b): s for b, s in latency.items()} for latency in report["latency_s"]]
    return outputs, report


def compare(outputs, reference):
    """(max abs error, relative error ||a - b|| / ||b||) over all batch sizes, in float64.

    A (near) zero reference, e.g. a freshly initialised adaLN-Zero DiT whose output is exactly 0, has no relative
    error to speak of: there the error is the RMS difference, an absolute error on the scale of a unit-variance output.
    """
    exported = np.concatenate([outputs[b].ravel() for b in sorted(reference)]).astype(np.float64)
    eager = np.concatenate([reference[b].ravel() for b in sorted(reference)]).astype(np.float64)
    difference = np.linalg.norm(exported - eager)
    scale = max(np.linalg.norm(eager), NEAR_ZERO_RMS * np.sqrt(eager.size))
    return float(np.abs(exported - eager).max()), float(difference / scale)


def openvino_installed():
    import importlib.util
    return importlib.util.find_spec("openvino") is not None


def verify(files, inputs, reference, repeats, threads=None):
    """Check freshly written files: in one fresh process each must load, run, and match the eager fp32 model.

    files: [(path, metadata)]. The same process times them (interleaved); ONNX files run in onnxruntime and, where
    OpenVINO is installed, in OpenVINO too (checked alike; result["openvino"], with the kernels its profiling saw).
    Returns (one result dict per file, run_exported.cpu_description() of the CPU that ran them).
    """
    runs = [(path, metadata, "onnxruntime") for path, metadata in files]
    if any(metadata["format"] == "onnx" for _, metadata in files):
        if openvino_installed():
            runs += [(path, metadata, "openvino") for path, metadata in files if metadata["format"] == "onnx"]
        else:
            print("OpenVINO is not installed, so the ONNX files are not checked in it: pip install openvino")
    outputs, report = fresh_process_report([path for path, _, _ in runs], inputs, repeats, threads,
                                           [runtime for _, _, runtime in runs])
    results = {}
    for (path, metadata, runtime), output, latency, kernels in zip(runs, outputs, report["latency_s"],
                                                                   report["kernels"]):
        max_abs, relative = compare(output, reference)
        precision = metadata["precision"]
        tolerance = TOLERANCES[precision]
        where = " in OpenVINO" if runtime == "openvino" else ""
        if not relative <= tolerance:  # also catches NaN
            raise RuntimeError(f"{path}{where} differs from the eager fp32 model by a relative error of "
                               f"{relative:.3g} (allowed {tolerance}); the export is broken"
                               + ("" if precision == "fp32" else f", or this model does not survive {precision}: "
                                                                 f"use fp32"))
        print(f"{path} ({file_size(path) / 1e6:.2f} MB) loads and runs{where} in a fresh process without the "
              f"project's code; relative error against the eager fp32 model {relative:.2e}")
        result = {"path": path, "format": metadata["format"], "precision": precision,
                  "size_bytes": file_size(path), "max_abs_error": max_abs, "relative_error": relative,
                  "latency_s": latency}
        if runtime == "openvino":
            results[path]["openvino"] = dict(result, runtime="openvino", kernels=kernels)
        else:
            results[path] = dict(result, runtime="torch" if metadata["format"] != "onnx" else "onnxruntime")
    return list(results.values()), report["cpu"]


def results_table(results):
    """Markdown: one row per file and runtime (a file's OpenVINO run below its onnxruntime one); int8, fp16 and
    OpenVINO rows give size and CPU latency relative to the fp32 file of their format in its first runtime
    (onnxruntime for ONNX)."""
    rows = [row for r in results for row in (r, *([dict(r["openvino"], model=r["model"])] if "openvino" in r else []))]
    batches = sorted({b for r in rows for b in r["latency_s"]})
    header = ["file", "format", "runtime", "precision", "size (MB)", "fp32 size / size", "max abs err",
              "rel err vs eager fp32"]
    for b in batches:
        header += [f"CPU ms, batch {b}", f"latency / fp32, batch {b}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        key = (r["model"], r["format"], "fp32")
        base = next(f for f in results if (f["model"], f["format"], f["precision"]) == key)
        row = [os.path.basename(r["path"]), r["format"], r.get("runtime", "-"), r["precision"],
               f"{r['size_bytes'] / 1e6:.2f}", f"{base['size_bytes'] / r['size_bytes']:.2f}x",
               f"{r['max_abs_error']:.2e}", f"{r['relative_error']:.2e}"]
        for b in batches:
            if b in r["latency_s"]:
                row += [f"{1e3 * r['latency_s'][b]:.1f}", f"{r['latency_s'][b] / base['latency_s'][b]:.2f}"]
            else:
                row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def kernels_summary(results, top=4):
    """Lines naming what OpenVINO's profiling saw run for each ONNX file: its slowest kernels and their share."""
    lines = []
    for r in results:
        if "openvino" not in r:
            continue
        kernels = r["openvino"]["kernels"]
        total = sum(k["ms"] for k in kernels) or 1.0
        named = ", ".join(f"{k['node']} {k['kernel']} x{k['count']} {100 * k['ms'] / total:.0f}%"
                          for k in kernels[:top])
        lines.append(f"- {os.path.basename(r['path'])} in OpenVINO: {named}")
    return "\n".join(lines)


#################################################################################
#                                     Main                                      #
#################################################################################

def output_paths(args):
    """{"fp32", "int8", "int8-cpu", "fp16", "calib": path} from --out or the checkpoint's name."""
    extension = EXTENSIONS[args.format]
    out = args.out or os.path.splitext(args.ckpt)[0] + extension
    stem = out[: -len(extension)]
    return {"fp32": out, "int8": stem + "_int8" + extension, "int8-cpu": stem + "_int8_cpu" + extension,
            "fp16": stem + "_fp16" + extension, "calib": stem + "_calib.npz"}


def write_learned_qdq(model, cfg_scale, example, path, metadata, dynamic):
    """A quantization-aware model's INT8 ONNX: every Linear as QuantizeLinear / DequantizeLinear with exactly the
    scales it learned (int8 weights stored, zero points 0): FakeQuantLinear's "export" mode, through write_onnx."""
    with linear_mode(model, "export"):
        write_onnx(Denoiser(model, cfg_scale).eval(), example, path, metadata, dynamic)


def write_variants(args, model, fp32, data, example):
    """Write the fp32 file (of the Denoiser fp32) and the int8 / fp16 files the flags ask for; returns
    [(path, metadata)], fp32 first."""
    paths = output_paths(args)
    files = [(paths["fp32"], export_metadata(model, data, args, "fp32"))]
    WRITERS[args.format](fp32, example, *files[0], args.dynamic_batch)
    if args.int8 and args.format != "onnx":
        files.append((paths["int8"], export_metadata(model, data, args, "int8")))
        int8 = Denoiser(quantize_int8(model), args.cfg_scale).eval()
        WRITERS[args.format](int8, example, *files[-1], args.dynamic_batch)
    elif args.int8 and args.int8_scales == "learned":
        files.append((paths["int8"], export_metadata(model, data, args, "int8")))
        write_learned_qdq(model, args.cfg_scale, example, *files[-1], args.dynamic_batch)
        files.append((paths["int8-cpu"], export_metadata(model, data, args, "int8-cpu")))
        quantize_onnx_cpu(paths["fp32"], *files[-1])
    elif args.int8:
        calibration = calibration_set(model.config, data, args.calib_samples, args.calib_steps or CALIB_DDIM_STEPS,
                                      args.calib_latents)
        np.savez(paths["calib"], **calibration)
        print(f"wrote {paths['calib']}: {args.calib_samples} training inputs forward-noised at the timesteps "
              f"{sorted(set(calibration['t'].astype(int).tolist()), reverse=True)[:8]}... of the model's sampler")
        files.append((paths["int8"], export_metadata(model, data, args, "int8")))
        quantize_onnx_qdq(paths["fp32"], *files[-1], calibration)
        files.append((paths["int8-cpu"], export_metadata(model, data, args, "int8-cpu")))
        quantize_onnx_cpu(paths["fp32"], *files[-1])
    if args.fp16:
        files.append((paths["fp16"], export_metadata(model, data, args, "fp16")))
        write_onnx_fp16(paths["fp32"], *files[-1])
    return files


def check_int8_scales(args, model):
    """--int8-scales: learned (the default for a quantization-aware checkpoint) or calibrated (post-training)."""
    quantization_aware = bool(quantized_linears(model))
    if args.int8_scales == "learned" and not quantization_aware:
        raise UserError(f"--int8-scales learned: {args.ckpt} was not trained with quantization-aware distillation, "
                        f"so it has no learned scales; run train.py --step-distillation qat --teacher-ckpt "
                        f"{args.ckpt} first, or drop --int8-scales for post-training calibration")
    if args.int8_scales is not None and not (args.int8 and args.format == "onnx"):
        raise UserError("--int8-scales chooses the scales of the Q/DQ file of --format onnx --int8 only")
    args.int8_scales = args.int8_scales or ("learned" if quantization_aware else "calibrated")
    if args.int8_scales == "learned" and args.calib_given:
        raise UserError("--calib-samples, --calib-steps and --calib-latents calibrate post-training INT8; this "
                        "checkpoint's scales are learned: drop them, or pass --int8-scales calibrated")


@torch.no_grad()
def main(args):
    """Export, verify and time; returns the list of per-file results (also printed as a markdown table)."""
    model, data = load_dit_checkpoint(args.ckpt, args.model, args.image_size, args.num_classes)
    config = model.config
    if args.cfg_scale is not None and config["class_dropout_prob"] <= 0:
        raise ValueError("--cfg-scale needs the null label, but this model was trained without label dropout "
                         "(class_dropout_prob 0); drop --cfg-scale")
    spec = SamplingSpec.from_checkpoint_entry(data["sampling"])
    if args.cfg_scale is not None and model.w_embedder is not None:
        raise ValueError(f"{args.ckpt} is guidance-distilled: the guidance scale is an input of the exported file "
                         f"(w, in {list(spec.guidance_range)}); drop --cfg-scale")
    if args.calib_steps is not None and spec.sampler is not None:
        raise ValueError(f"{args.ckpt} samples with its own {spec.sampler} sampler, whose timesteps "
                         f"calibrate it; drop --calib-steps")
    guidance_range = spec.guidance_range if model.w_embedder is not None else None
    keys = "xtyw" if guidance_range else "xty"
    check_int8_scales(args, model)
    for layer in quantized_linears(model).values():  # a quantization-aware model's fp32 file: its plain weights
        layer.mode = "float"
    os.makedirs(os.path.dirname(os.path.abspath(output_paths(args)["fp32"])), exist_ok=True)

    if args.dynamic_batch:  # traced at batch 2 (torch.export would fix a batch of 1), checked at other sizes
        example_batch, batch_sizes = 2, VERIFY_BATCH_SIZES
    else:
        example_batch, batch_sizes = args.batch_size, (args.batch_size,)
    example = verification_inputs(config, (example_batch,), seed=1, guidance_range=guidance_range)
    example = tuple(torch.from_numpy(example[f"{k}_{example_batch}"]) for k in keys)
    inputs = verification_inputs(config, batch_sizes, guidance_range=guidance_range)
    fp32 = Denoiser(model, args.cfg_scale).eval()
    reference = {b: fp32(*(torch.from_numpy(inputs[f"{k}_{b}"]) for k in keys)).numpy() for b in batch_sizes}

    files = write_variants(args, model, fp32, data, example)
    for path, metadata in files:
        with open(path + ".json", "w") as f:
            json.dump(metadata, f, indent=2)
    results, cpu = verify(files, inputs, reference, args.repeats, args.threads)
    for result in results:
        result["model"] = os.path.basename(args.ckpt)
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    print(f"\nCPU latency: median of {args.repeats} runs per batch size, files interleaved in one fresh process, "
          f"{threads}; {describe_cpu(cpu)}")
    print(results_table(results))
    if any("openvino" in result for result in results):
        print(f"\nOpenVINO's profiling at batch {max(batch_sizes)} (layer type, kernel, count, share of its time):")
        print(kernels_summary(results))
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("checkpoint")
    source.add_argument("--ckpt", required=True, help="a training checkpoint (config read from it, EMA weights) or "
                        "an official raw state_dict (then also --model and --image-size)")
    source.add_argument("--model", choices=list(DiT_models), default=None,
                        help="architecture of a raw state_dict (training checkpoints carry their own)")
    source.add_argument("--image-size", type=positive_int, default=None,
                        help="image size in pixels of a raw state_dict (latents are image-size / 8)")
    source.add_argument("--num-classes", type=positive_int, default=None,
                        help="classes of a raw state_dict (default 1000)")
    output = parser.add_argument_group("export")
    output.add_argument("--format", choices=list(EXTENSIONS), default="onnx",
                        help="torchscript (.ts), onnx (.onnx) or exported (torch.export, .pt2); default onnx")
    output.add_argument("--int8", action="store_true", help="also write OUT_int8 with int8 Linear layers (torchscript: "
                        "dynamic int8 for the CPU; onnx: explicit Q/DQ INT8 for TensorRT, OUT_int8_cpu.onnx with "
                        "onnxruntime's dynamic int8 for CPUs, and OUT_calib.npz); not with --format exported")
    output.add_argument("--fp16", action="store_true", help="also write OUT_fp16.onnx, fp16 in the graph (the timestep "
                        "embedding and LayerNorms in fp32) for TensorRT's strongly typed builds; --format onnx only")
    output.add_argument("--out", default=None,
                        help="output file, ending in the format's extension (default: the checkpoint's path with it)")
    batch = output.add_mutually_exclusive_group()
    batch.add_argument("--batch-size", type=positive_int, default=1,
                       help="fixed batch size of the exported graph (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="export with a symbolic batch size instead")
    output.add_argument("--cfg-scale", type=non_negative_float, default=None,
                        help="fold classifier-free guidance with this scale "
                        "into the graph (it runs the conditional and the null-label batch); default: not folded")
    output.add_argument("--int8-scales", choices=["learned", "calibrated"], default=None,
                        help="scales of the Q/DQ file: learned (every Linear, the scales of a checkpoint trained "
                             "with train.py --step-distillation qat; its default) or calibrated (post-training, the "
                             "token Linears; the default for any other checkpoint)")
    calibration = parser.add_argument_group("INT8 calibration set, OUT_calib.npz (--format onnx --int8)")
    calibration.add_argument("--calib-samples", type=positive_int, default=None,
                             help=f"training inputs forward-noised at the timesteps the model's sampler visits "
                                  f"(default {CALIB_SAMPLES})")
    calibration.add_argument("--calib-steps", type=positive_int, default=None,
                             help=f"DDIM steps whose timesteps calibrate a plain model (default {CALIB_DDIM_STEPS}); "
                                  f"a step-distilled one uses its own sampler's")
    calibration.add_argument("--calib-latents", default=None, help="the extract_latents.py folder a latent model was "
                             "trained on (default: N(0, 1) stand-ins); pixel models use the digits they trained on")
    check = parser.add_argument_group("check")
    check.add_argument("--repeats", type=positive_int, default=5,
                       help="timed CPU runs per batch size in the fresh process; the median is reported")
    check.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads for the timed runs (default: one per "
                       "core; on a machine shared with other jobs, 1 avoids stalls of threads waiting on each other)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.ckpt):
        parser.error(f"--ckpt {args.ckpt} does not exist; pass a training checkpoint or a raw DiT state_dict")
    if args.int8 and args.format == "exported":
        parser.error(INT8_EXPORTED_UNSUPPORTED)
    if args.fp16 and args.format != "onnx":
        parser.error(f"--fp16 writes fp16 into an ONNX graph (for TensorRT's strongly typed builds); it is not "
                     f"available with --format {args.format}: use --format onnx")
    if args.out is not None and not args.out.endswith(EXTENSIONS[args.format]):
        parser.error(f"--out {args.out} must end in {EXTENSIONS[args.format]} for --format {args.format}")
    if args.out is not None:
        check_output_path(parser, "--out", args.out)
    if args.batch_size < 1 or args.repeats < 1 or args.threads is not None and args.threads < 1:
        parser.error("--batch-size, --repeats and --threads must be at least 1")
    calibrating = args.int8 and args.format == "onnx"
    if not calibrating and (args.calib_samples, args.calib_steps, args.calib_latents) != (None, None, None):
        parser.error("--calib-samples, --calib-steps and --calib-latents shape the calibration set of --format onnx "
                     "--int8 only")
    args.calib_given = (args.calib_samples, args.calib_steps, args.calib_latents) != (None, None, None)
    args.calib_samples = CALIB_SAMPLES if args.calib_samples is None else args.calib_samples
    if args.calib_steps is not None:
        try:
            leading_timesteps(args.calib_steps)
        except ValueError as error:
            parser.error(f"--calib-steps {args.calib_steps}: {error}; try 10, 25 or 50")
    if args.calib_latents is not None and not os.path.isdir(args.calib_latents):
        parser.error(f"--calib-latents {args.calib_latents} is not a folder; pass the one extract_latents.py wrote")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
