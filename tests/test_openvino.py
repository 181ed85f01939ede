"""OpenVINO as a runtime of the ONNX files, and the Q/DQ INT8 file's accuracy on every CPU (tiny digits student, CPU).

This machine's CPU has AVX-512 VNNI, so the saturation of AVX2-only CPUs cannot be observed here: it is emulated in
numpy (u8s8_pair_saturated) on the Q/DQ file's own int8 weights and calibrated int8 activations.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
import run_exported
from bench_export import random_weights, runtime_comparison
from models import DiT_models
from test_export import calibration_like_inputs as noised_digits
from test_export import onnx_output as onnxruntime_output

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = dict(input_size=8, in_channels=1, num_classes=10)
QDQ_FUSED_RELATIVE_ERROR = 0.05  # the Q/DQ file in onnxruntime with default options (fused int8 kernels on)
# Two runs of the INT8 file (OpenVINO, onnxruntime's fused kernels, its exact Q/DQ arithmetic) against each other: the
# same int8 products, but the float32 sums before each QuantizeLinear differ in their last bits, which flips a value
# lying on a rounding boundary by one int8 step. Measured 5e-4 to 1.3e-3 (OpenVINO against exact) over five input
# draws, against the file's own quantization error of 1.75e-2; the bound is a quarter of that error.
INT8_RUNTIME_AGREEMENT = 5e-3
OPENVINO_FP32_AGREEMENT = 1e-5  # OpenVINO against onnxruntime on the fp32 file (f32 hint: no bf16)
OPENVINO_FP16_AGREEMENT = 2e-3  # on the fp16 file (OpenVINO computes its fp16 weights in f32 on this CPU)
INT16 = (-2 ** 15, 2 ** 15 - 1)
needs_openvino = pytest.mark.skipif(not export.openvino_installed(),
                                    reason="openvino is not importable (pip install openvino; requirements.txt "
                                           "installs it)")


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """{precision: path} of a random-weight digits student's ONNX files, the 8-bit Q/DQ file beside the 7-bit one
    ("int8-full-range"), and export.main's results."""
    folder = tmp_path_factory.mktemp("openvino")
    torch.manual_seed(0)
    model = random_weights(DiT_models["DiT-Digits-S"](**DIGITS)).eval()
    ckpt = folder / "student.pt"
    torch.save({"config": model.config, "ema": model.state_dict(),
                "data": {"image_size": 8, "latent": False, "vae": None}}, ckpt)
    argv = ["--ckpt", str(ckpt), "--format", "onnx", "--dynamic-batch", "--int8", "--fp16", "--repeats", "1",
            "--threads", "1", "--calib-samples", "64", "--calib-steps", "5", "--out", str(folder / "student.onnx")]
    results = export.main(export.parse_args(argv))
    paths = {result["precision"]: result["path"] for result in results}
    paths["int8-full-range"] = str(folder / "student_int8_full_range.onnx")
    metadata = run_exported.load_denoiser(paths["int8"])[1]
    calibration = dict(np.load(str(folder / "student_calib.npz")))
    export.quantize_onnx_qdq(paths["fp32"], paths["int8-full-range"], metadata, calibration, reduce_range=False)
    return {"paths": paths, "results": results, "calibration": calibration, "argv": argv}


def relative_error(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_qdq_file_holds_with_fused_kernels_on(onnx_files):
    """Default onnxruntime options, as a user runs the file; the 7-bit file computes exactly what the fused-off
    path does, and what 7 bits cost against 8 (what TensorRT, which has no saturation, gives up) stays small."""
    paths, inputs = onnx_files["paths"], noised_digits()
    reference = onnxruntime_output(paths["fp32"], inputs)
    fused = onnxruntime_output(paths["int8"], inputs)
    exact = onnxruntime_output(paths["int8"], inputs, exact_qdq=True)
    assert 1e-3 < relative_error(fused, reference) <= QDQ_FUSED_RELATIVE_ERROR
    assert relative_error(fused, exact) < INT8_RUNTIME_AGREEMENT
    full_range = relative_error(onnxruntime_output(paths["int8-full-range"], inputs, exact_qdq=True), reference)
    assert full_range < relative_error(exact, reference) < full_range + 0.01  # 1.4% -> 1.7% measured


def int8_matmuls(path, calibration, rows=16):
    """[(int8 activations (M, K), int8 weights (K, N))] of every MatMul between two DequantizeLinear in a Q/DQ file,
    the activations as its QuantizeLinear nodes make them on calibration rows (onnxruntime, exact Q/DQ)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    weights = {tensor.name: tensor for tensor in model.graph.initializer}
    producer = {output: node for node in model.graph.node for output in node.output}
    pairs = []
    for node in model.graph.node:
        sources = [producer.get(name) for name in node.input[:2]]
        if node.op_type == "MatMul" and all(s is not None and s.op_type == "DequantizeLinear" for s in sources):
            activation, weight = sources[0].input[0], numpy_helper.to_array(weights[sources[1].input[0]])
            pairs.append((activation, weight))
    for name, _ in pairs:
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT8, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    activations = session.run([name for name, _ in pairs], {k: v[:rows] for k, v in calibration.items()})
    return [(a.reshape(-1, a.shape[-1]), w) for a, (_, w) in zip(activations, pairs)]


def u8s8_pair_saturated(activations, weights):
    """(int32 (M, N), saturated pair count): an int8 x int8 MatMul as AVX2-only x86 CPUs run it (Intel's
    VPMADDUBSW): activations shifted to uint8 (+128), each adjacent pair of u8 x s8 products summed into an int16 with
    saturation, the pair sums added in int32, the shift's 128 * sum(w) taken off again."""
    unsigned = activations.astype(np.int64) + 128  # (M, K)
    weights = weights.astype(np.int64)  # (K, N)
    if unsigned.shape[1] % 2:
        unsigned, weights = np.pad(unsigned, ((0, 0), (0, 1))), np.pad(weights, ((0, 1), (0, 0)))
    pair = unsigned[:, 0::2, None] * weights[None, 0::2] + unsigned[:, 1::2, None] * weights[None, 1::2]  # (M,K/2,N)
    saturated = np.clip(pair, *INT16)
    return saturated.sum(axis=1) - 128 * weights.sum(axis=0), int((saturated != pair).sum())


def test_u8s8_reference_is_exact_without_saturation():
    """The reference against the plain integer product, where no pair can saturate, and on a pair that must."""
    generator = np.random.default_rng(0)
    activations = generator.integers(-128, 128, (5, 33))
    weights = generator.integers(-64, 65, (33, 7))
    product, count = u8s8_pair_saturated(activations, weights)
    assert count == 0 and (product == activations @ weights).all()
    product, count = u8s8_pair_saturated(np.array([[127, 127]]), np.array([[127], [127]]))
    assert count == 1 and product[0, 0] == INT16[1] - 128 * 254 != 127 * 127 * 2


def test_full_range_weights_saturate_on_avx2_and_7_bit_weights_cannot(onnx_files):
    """On the Q/DQ files' own weights and calibrated activations: the 8-bit file's pair sums saturate (per-layer
    error of ~10%); the default file's weights lie in [-64, 64], where no pair sum can (2 * 255 * 64 < 2 ** 15), so
    every layer equals the exact integer product."""
    calibration = onnx_files["calibration"]
    full_range = int8_matmuls(onnx_files["paths"]["int8-full-range"], calibration)
    assert len(full_range) == 4 * 4 + 1  # qkv, proj, fc1, fc2 per block, the final layer
    errors = []
    for activations, weights in full_range:
        product, count = u8s8_pair_saturated(activations, weights)
        exact = activations.astype(np.int64) @ weights.astype(np.int64)
        errors.append(relative_error(product, exact) if count else 0.0)
    assert np.abs(weights).max() == 127 and sum(e > 0.01 for e in errors) >= 8  # measured 0.05-0.18 on 16 of 17
    for activations, weights in int8_matmuls(onnx_files["paths"]["int8"], calibration):
        assert -64 <= weights.min() and weights.max() <= 64 and 2 * 255 * 64 <= INT16[1]
        product, count = u8s8_pair_saturated(activations, weights)
        assert count == 0 and (product == activations.astype(np.int64) @ weights.astype(np.int64)).all()


@needs_openvino
def test_openvino_matches_onnxruntime_on_every_file(onnx_files):
    """OpenVINO on the INT8 file equals onnxruntime's exact Q/DQ arithmetic (fused kernels off), so it holds on any
    CPU where that holds; the fp32 and fp16 files match onnxruntime's runs of them."""
    paths, inputs = onnx_files["paths"], noised_digits()
    bounds = {"int8": INT8_RUNTIME_AGREEMENT, "fp32": OPENVINO_FP32_AGREEMENT, "fp16": OPENVINO_FP16_AGREEMENT}
    for precision, bound in bounds.items():
        denoise, metadata = run_exported.load_denoiser(paths[precision], threads=1, runtime="openvino")
        assert metadata["precision"] == precision
        ours = denoise(inputs["x"], inputs["t"], inputs["y"])
        again = denoise(inputs["x"][:8], inputs["t"][:8], inputs["y"][:8])  # another batch size, the same request
        reference = onnxruntime_output(paths[precision], inputs, exact_qdq=precision == "int8")
        assert ours.dtype == np.float32 and relative_error(ours, reference) < bound
        np.testing.assert_allclose(again, ours[:8], rtol=1e-5, atol=1e-6)


@needs_openvino
def test_export_checks_and_times_the_onnx_files_in_openvino(onnx_files):
    """export.py's fresh-process check: an OpenVINO run beside every ONNX file's onnxruntime run, its rows in the
    table, and OpenVINO's profiling of the INT8 file showing int8 Linear kernels (on x86: brgemm / jit_gemm _i8)."""
    results = onnx_files["results"]
    assert [r["runtime"] for r in results] == ["onnxruntime"] * 4
    for result in results:
        run = result["openvino"]
        assert run["runtime"] == "openvino" and set(run["latency_s"]) == {1, 8} and run["kernels"]
        assert run["relative_error"] < export.TOLERANCES[result["precision"]]
    int8 = next(r for r in results if r["precision"] == "int8")["openvino"]["kernels"]
    fully_connected = {k["kernel"] for k in int8 if k["node"].startswith("FullyConnected")}
    if "avx2" in run_exported.cpu_description()["features"]:
        assert any(kernel.endswith("i8") for kernel in fully_connected), fully_connected
    table = export.results_table([dict(r, model="m") for r in results])
    assert table.count("| openvino |") == 4 and table.count("| onnxruntime |") == 4
    assert "in OpenVINO" in export.kernels_summary([dict(r, model="m") for r in results])


def test_cpu_description_names_the_int8_instruction_sets():
    cpu = run_exported.cpu_description()
    assert set(cpu["features"]) <= set(run_exported.CPU_FEATURES)
    line = run_exported.describe_cpu(cpu)
    assert line.startswith("CPU ") and all(feature in line for feature in cpu["features"])
    if os.path.exists("/proc/cpuinfo"):
        flags = open("/proc/cpuinfo").read().split()
        assert ("avx512_vnni" in cpu["features"]) == ("avx512_vnni" in flags)


def run_runner(*argv, blocked=None):
    """run_exported.py as a process; blocked: a module its Python cannot import."""
    code = ("import runpy, sys; " + (f"sys.modules[{blocked!r}] = None; " if blocked else "")
            + "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, os.path.join(ROOT, "run_exported.py"), *argv],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@needs_openvino
def test_runner_samples_with_openvino_as_with_onnxruntime(onnx_files, tmp_path):
    common = ["--num-steps", "10", "--class-labels", "1", "2", "3", "--seed", "0", "--threads", "1"]
    for precision in ("fp32", "int8"):
        path = onnx_files["paths"][precision]
        for runtime in run_exported.RUNTIMES:
            process = run_runner(path, *common, "--runtime", runtime, "--out", str(tmp_path / f"{runtime}.npz"))
            assert process.returncode == 0, process.stderr
        ours, theirs = (np.load(tmp_path / f"{runtime}.npz")["arr_0"] for runtime in ("openvino", "onnxruntime"))
        assert ours.shape == (3, 8, 8, 1) and np.abs(ours.astype(int) - theirs).max() <= 1


def test_runtime_openvino_errors(onnx_files, tmp_path):
    """Without OpenVINO: one error line naming the install; a non-ONNX file or an unknown runtime: an error."""
    path = onnx_files["paths"]["int8"]
    process = run_runner(path, "--runtime", "openvino", "--out", str(tmp_path / "a.npz"), blocked="openvino")
    lines = process.stderr.strip().splitlines()
    assert process.returncode == 1 and lines == [f"error: {run_exported.OPENVINO_MISSING}"]
    assert "pip install openvino" in run_exported.OPENVINO_MISSING
    ts = tmp_path / "model.ts"
    ts.write_bytes(b"")
    with pytest.raises(ValueError, match="runs ONNX files"):
        run_exported.load_denoiser(str(ts), runtime="openvino")
    with pytest.raises(ValueError, match="unknown runtime"):
        run_exported.load_denoiser(path, runtime="tensorrt")
    process = run_runner(path, "--runtime", "tensorrt")
    assert process.returncode == 2 and "invalid choice: 'tensorrt'" in process.stderr


def test_bench_runtime_table_times_every_runtime_side_by_side(onnx_files):
    rows, kernels, bits = runtime_comparison("digits", onnx_files["argv"], onnx_files["paths"], repeats=1,
                                             threads=1)
    assert bits[8] < bits[7] < bits[8] + 0.01  # what 7-bit weights cost, computed exactly
    expected = [("torch eager", "fp32")] + [r for r in [("onnxruntime", "fp32"), ("onnxruntime", "int8"),
                                                        ("onnxruntime", "int8-full"), ("onnxruntime", "int8-cpu"),
                                                        ("openvino", "fp32"), ("openvino", "fp16"),
                                                        ("openvino", "int8"), ("openvino", "int8-full")]
                                            if r[0] != "openvino" or export.openvino_installed()]
    assert [(row["runtime"], row["precision"]) for row in rows] == expected
    for row in rows:
        assert set(row["latency_s"]) == {1, 8} and all(s > 0 for s in row["latency_s"].values())
        assert row["relative_error"] < (1e-5 if row["precision"] == "fp32" else 0.05)
    from bench_export import runtime_table
    table = runtime_table(rows)
    assert table.count("\n| digits |") == len(rows) and "| 1.00 |" in table
    assert (kernels is not None) == export.openvino_installed()
