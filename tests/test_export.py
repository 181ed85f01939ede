"""export.py and run_exported.py on the tiny digits student (DiT-Digits-S, 8x8 pixels, 1 channel), CPU only.

Every export is checked by export.py itself in a fresh process (it raises otherwise); these tests also check the
numbers it reports, run the files again here, and run the standalone runner as a subprocess.
"""
import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
import run_exported
from bench_export import random_weights
from diffusion import create_diffusion
from models import DiT_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = dict(input_size=8, in_channels=1, num_classes=10)
INT8_RELATIVE_ERROR = 0.05  # random-weight digits student: about 0.01-0.02 in both runtimes
QDQ_RELATIVE_ERROR = 0.05  # the Q/DQ file computed exactly (no fused kernel): measured 0.014
FP16_RELATIVE_ERROR = 2e-3  # the fp16 file against the fp32 file, both in onnxruntime: measured 3.9e-4
PRECISIONS = {"torchscript": ["fp32", "int8"], "onnx": ["fp32", "int8", "int8-cpu", "fp16"], "exported": ["fp32"]}
# The Q/DQ file run by onnxruntime's fused int8 kernels: export.py's broken-or-not limit only, because those kernels
# differ by CPU (u8s8 saturation without VNNI); its quantization error is bounded exactly in test_qdq_error_is_bounded.
BOUNDS = {"fp32": 1e-5, "int8": export.INT8_TOLERANCE, "int8-cpu": INT8_RELATIVE_ERROR, "fp16": FP16_RELATIVE_ERROR}
INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm",
               "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QAttention"}


def digits_student(seed=0, **overrides):
    torch.manual_seed(seed)  # DiT's own initialisation draws from the global generator
    return random_weights(DiT_models["DiT-Digits-S"](**(DIGITS | overrides)), seed).eval()


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A training checkpoint (config, EMA weights, data description) of a random-weight digits student."""
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    model = digits_student()
    torch.save({"config": model.config, "ema": model.state_dict(),
                "data": {"image_size": 8, "latent": False, "vae": None}}, path)
    return str(path)


@pytest.fixture(scope="module")
def exports(digits_ckpt, tmp_path_factory):
    """{format: export.main's results} for every format, dynamic batch, with --int8 where the format has it."""
    folder = tmp_path_factory.mktemp("exports")
    results = {}
    for fmt, extension in export.EXTENSIONS.items():
        argv = ["--ckpt", digits_ckpt, "--format", fmt, "--dynamic-batch", "--repeats", "1", "--threads", "1",
                "--out", str(folder / f"student{extension}")]
        argv += {"torchscript": ["--int8"], "exported": [],
                 "onnx": ["--int8", "--fp16", "--calib-samples", "64", "--calib-steps", "5"]}[fmt]
        results[fmt] = export.main(export.parse_args(argv))
    return results


def eager(x, t, y, seed=0):
    with torch.no_grad():
        return digits_student(seed)(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()


def relative_error(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("fmt", list(export.EXTENSIONS))
def test_every_format_exports_verifies_and_matches_eager(exports, fmt):
    assert [result["precision"] for result in exports[fmt]] == PRECISIONS[fmt]
    fp32, *others = exports[fmt]
    assert fp32["relative_error"] < 1e-5 and fp32["max_abs_error"] < 1e-5
    for result in others:
        assert 1e-5 < result["relative_error"] < BOUNDS[result["precision"]]
    for result in exports[fmt]:
        metadata = json.load(open(result["path"] + ".json"))
        assert metadata["format"] == fmt and metadata["batch_size"] is None and not metadata["latent"]
        assert metadata["precision"] == result["precision"] and metadata["model_config"]["depth"] == 4
        assert metadata["sampling"]["sampler"] is None and metadata["diffusion"]["num_timesteps"] == 1000
        assert set(result["latency_s"]) == {1, 8}  # traced at batch 2, checked and timed at 1 and 8
        _, embedded = run_exported.load_denoiser(result["path"])
        assert embedded == metadata


@pytest.mark.parametrize("fmt", list(export.EXTENSIONS))
def test_dynamic_batch_runs_at_other_batch_sizes(exports, fmt):
    generator = np.random.default_rng(0)
    x = generator.standard_normal((5, 1, 8, 8), dtype=np.float32)
    t = np.array([0, 10, 250, 700, 999], dtype=np.float32)
    y = np.array([0, 3, 5, 9, 1], dtype=np.int32)
    reference = eager(x, t, y)
    for result in exports[fmt]:
        denoise, _ = run_exported.load_denoiser(result["path"])
        out = denoise(x, t, y)
        assert out.shape == (5, 2, 8, 8) and out.dtype == np.float32
        assert relative_error(out, reference) < BOUNDS[result["precision"]]


def test_int8_and_fp16_files_are_smaller(exports):
    fp32, int8 = exports["torchscript"]
    assert os.path.getsize(int8["path"]) < os.path.getsize(fp32["path"]) / 2
    fp32, qdq, cpu, fp16 = (os.path.getsize(result["path"]) for result in exports["onnx"])
    assert cpu < fp32 / 3  # Linear weights are 98% of the digits student: about 3.4x in ONNX
    assert qdq < fp32 / 1.5  # the token Linear layers only: the adaLN and timestep Gemms stay fp32 (1.7x)
    assert fp16 < fp32 / 1.9


def onnx_paths(exports):
    return {result["precision"]: result["path"] for result in exports["onnx"]}


def test_int8_onnx_is_explicit_qdq_only(exports):
    """What TensorRT's strongly typed INT8 takes: Q/DQ pairs with zero point 0 and nothing else added; no integer
    compute op (those are onnxruntime's CPU int8, which TensorRT cannot parse)."""
    import onnx
    from onnx import numpy_helper

    paths = onnx_paths(exports)
    fp32, qdq = onnx.load(paths["fp32"]), onnx.load(paths["int8"])
    added = collections.Counter(n.op_type for n in qdq.graph.node)
    added.subtract(collections.Counter(n.op_type for n in fp32.graph.node))
    assert {op for op, count in added.items() if count} == {"QuantizeLinear", "DequantizeLinear"}
    assert added["QuantizeLinear"] > 0 and all(node.domain in ("", "ai.onnx") for node in qdq.graph.node)
    assert not {node.op_type for node in qdq.graph.node} & INTEGER_OPS
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in qdq.graph.initializer}
    zero_points = [initializers[node.input[2]] for node in qdq.graph.node
                   if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(zero_points) == added["QuantizeLinear"] + added["DequantizeLinear"]  # every one explicit
    assert all(z.dtype == np.int8 and not z.any() for z in zero_points)
    token_matmuls = [node for node in qdq.graph.node if node.op_type == "MatMul" and node.input[1] in initializers
                     or node.op_type == "MatMul" and node.input[1].endswith("DequantizeLinear_Output")]
    assert len(token_matmuls) == 4 * 4 + 1  # qkv, proj, fc1, fc2 per block, and the final layer
    producers = {output: node.op_type for node in qdq.graph.node for output in node.output}
    assert all(producers.get(name) == "DequantizeLinear" for node in token_matmuls for name in node.input)
    cpu = onnx.load(paths["int8-cpu"])
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {node.op_type for node in cpu.graph.node}
    assert json.load(open(paths["int8-cpu"] + ".json"))["device"] == "cpu"


def onnx_output(path, inputs, exact_qdq=False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if exact_qdq:  # run DequantizeLinear -> fp32 MatMul: the int8 arithmetic exactly, as TensorRT does, on any CPU
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def calibration_like_inputs(seed=5, count=64):
    """Digits forward-noised at random timesteps (not only the calibrated ones), random labels."""
    from data import load_digits_arrays
    images, _ = load_digits_arrays("test")
    generator = np.random.default_rng(seed)
    x0 = images[generator.integers(0, len(images), count), None] * 2 - 1
    t = generator.integers(0, 1000, count)
    abar = create_diffusion("").alphas_cumprod[t][:, None, None, None]
    x = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * generator.standard_normal(x0.shape)
    return {"x": x.astype(np.float32), "t": t.astype(np.float32),
            "y": generator.integers(0, 10, count).astype(np.int32)}


def test_qdq_error_is_bounded(exports):
    paths, inputs = onnx_paths(exports), calibration_like_inputs()
    reference = onnx_output(paths["fp32"], inputs)
    exact = onnx_output(paths["int8"], inputs, exact_qdq=True)
    assert 1e-3 < relative_error(exact, reference) < QDQ_RELATIVE_ERROR


def test_fp16_error_is_bounded_and_the_timestep_embedding_stays_fp32(exports):
    import onnx
    from onnx import TensorProto

    paths, inputs = onnx_paths(exports), calibration_like_inputs()
    fp16 = onnx_output(paths["fp16"], inputs)
    assert fp16.dtype == np.float32 and 1e-5 < relative_error(fp16, onnx_output(paths["fp32"], inputs)) \
        < FP16_RELATIVE_ERROR
    model = onnx.load(paths["fp16"])
    kinds = collections.Counter(tensor.data_type for tensor in model.graph.initializer)
    assert kinds[TensorProto.FLOAT16] > 10 * kinds[TensorProto.FLOAT]
    producers = {output: node for node in model.graph.node for output in node.output}
    fp32_ops = [node for node in model.graph.node if node.op_type in ("Cos", "Sin", "LayerNormalization")]
    assert len(fp32_ops) == 2 + 4 * 2 + 1  # the sinusoid, two LayerNorms per block, the final one
    for node in fp32_ops:  # every input comes from the float32 path: a Cast to float32, or t without a cast
        source = producers.get(node.input[0])
        assert source is None or source.op_type != "Cast" or source.attribute[0].i == TensorProto.FLOAT


def test_calibration_set_is_forward_noised_training_data(exports):
    calibration = np.load(exports["onnx"][0]["path"].replace(".onnx", "_calib.npz"))
    assert set(calibration.files) == {"x", "t", "y"}
    assert calibration["x"].shape == (64, 1, 8, 8) and calibration["x"].dtype == np.float32
    assert calibration["t"].dtype == np.float32 and calibration["y"].dtype == np.int32
    # DDIM 5 steps (stride 200): the timesteps the sampler visits, each about as often; labels from the data.
    assert set(calibration["t"].tolist()) == {800, 600, 400, 200, 0}
    assert np.bincount(calibration["t"].astype(int) // 200).min() >= 64 // 5
    assert set(calibration["y"].tolist()) <= set(range(10)) and len(set(calibration["y"].tolist())) > 5
    # No sample beyond what forward noise of [-1, 1] data can give (6 sigma of noise), and not pure noise at t = 0.
    abar = create_diffusion("").alphas_cumprod[calibration["t"].astype(int)]
    bound = np.sqrt(abar) + 6 * np.sqrt(1 - abar)
    assert (np.abs(calibration["x"]).reshape(64, -1).max(axis=1) <= bound).all()
    assert np.abs(calibration["x"][calibration["t"] == 0]).max() < 1.05
    assert 0.5 < calibration["x"][calibration["t"] == 800].std() < 1.5


def test_calibration_of_a_latent_model_draws_its_latents(tmp_path):
    """--calib-latents: rows are the extract_latents.py folder's latents, forward-noised, with their labels."""
    from data import latents_shard_path
    latents = torch.full((3, 4, 2, 2), 0.5) * torch.arange(1, 4).view(3, 1, 1, 1)  # x_0 = 0.5, 1.0, 1.5 per image
    torch.save({"latents": latents, "labels": torch.tensor([7, 8, 9])}, latents_shard_path(tmp_path, 0))
    (tmp_path / "meta.json").write_text(json.dumps({"class_names": list("abcdefghij"), "num_shards": 1,
                                                    "num_images": 3, "image_size": 16}))
    data = {"latent": True, "image_size": 16, "sampling": run_exported.EPS_SAMPLING}
    config = dict(DIGITS, in_channels=4, input_size=2)
    calibration = export.calibration_set(config, data, 6, 10, latents_path=str(tmp_path))
    assert calibration["x"].shape == (6, 4, 2, 2) and sorted(calibration["y"].tolist()) == [7, 7, 8, 8, 9, 9]
    abar = create_diffusion("").alphas_cumprod[calibration["t"].astype(int)]
    x0 = 0.5 * (calibration["y"] - 6)  # each label's constant latent
    noise = (calibration["x"] - np.sqrt(abar)[:, None, None, None] * x0[:, None, None, None]) \
        / np.sqrt(1 - abar)[:, None, None, None]
    assert np.abs(noise).max() < 5 and set(calibration["t"].tolist()) <= set(range(0, 1000, 100))


def test_calibration_timesteps_are_the_few_step_samplers():
    sampling = dict(run_exported.EPS_SAMPLING, method="consistency", sampler="consistency", default_steps=4,
                    consistency_skip=20)
    assert export.sampler_timesteps(sampling, None) == [999, 759, 499, 259]
    assert export.sampler_timesteps(dict(sampling, sampler="ddim-trailing"), None) == [999, 749, 499, 249]
    assert export.sampler_timesteps(dict(sampling, method="tcd", sampler="tcd", gamma=0.3), None) == \
        [999, 759, 499, 259]
    data = {"latent": False, "image_size": 8, "sampling": dict(sampling, guidance_range=[1.0, 3.0])}
    calibration = export.calibration_set(dict(DIGITS, guidance_embed=True), data, 8, None)
    assert set(calibration["t"].tolist()) == {999, 759, 499, 259}
    assert calibration["w"].shape == (8,) and (1 <= calibration["w"]).all() and (calibration["w"] <= 3).all()


def test_cfg_folded_matches_forward_with_cfg(digits_ckpt, tmp_path):
    model = digits_student()
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8, generator=generator), torch.tensor([999.0, 400.0])
    y = torch.tensor([3, 7], dtype=torch.int32)
    null = torch.full_like(y, 10)
    with torch.no_grad():
        expected = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 4.0)[:2]
        assert torch.allclose(export.Denoiser(model, 4.0)(x, t, y), expected, atol=1e-6)
    path = str(tmp_path / "cfg.ts")
    export.main(export.parse_args(["--ckpt", digits_ckpt, "--format", "torchscript", "--batch-size", "2",
                                   "--cfg-scale", "4", "--out", path, "--repeats", "1"]))
    denoise, metadata = run_exported.load_denoiser(path)
    assert metadata["cfg_scale"] == 4.0 and metadata["batch_size"] == 2
    np.testing.assert_allclose(denoise(x.numpy(), t.numpy(), y.numpy()), expected.numpy(), atol=1e-5)


def run_runner(*argv):
    process = subprocess.run([sys.executable, os.path.join(ROOT, "run_exported.py"), *argv],
                             capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    return process


def test_runner_samples_end_to_end_with_torchscript_and_onnx(exports, tmp_path):
    onnx_path, ts_path = exports["onnx"][0]["path"], exports["torchscript"][0]["path"]
    common = ["--num-steps", "10", "--class-labels", "1", "2", "3", "--seed", "0"]
    run_runner(onnx_path, *common, "--out", str(tmp_path / "a.npz"), "--png", str(tmp_path / "grid.png"))
    run_runner(onnx_path, *common, "--out", str(tmp_path / "b.npz"))
    run_runner(ts_path, *common, "--out", str(tmp_path / "c.npz"))
    a, b, c = (np.load(tmp_path / name) for name in ("a.npz", "b.npz", "c.npz"))
    assert a["arr_0"].shape == (3, 8, 8, 1) and a["arr_0"].dtype == np.uint8
    np.testing.assert_array_equal(a["arr_1"], [1, 2, 3])
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # same seed, same images
    assert np.abs(a["arr_0"].astype(int) - c["arr_0"]).max() <= 1  # TorchScript and ONNX agree to rounding
    assert open(tmp_path / "grid.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_runner_samples_the_qdq_and_fp16_files(exports):
    """run_exported.py's sampler on every ONNX file, the same noise: fp16 tracks fp32 closely, int8 roughly."""
    samples = {}
    for precision, path in onnx_paths(exports).items():
        denoise, metadata = run_exported.load_denoiser(path, threads=1)
        samples[precision] = run_exported.sample(denoise, metadata, np.arange(10), num_steps=10, seed=2)
    assert np.abs(samples["fp16"] - samples["fp32"]).max() < 0.02
    for precision in ("int8", "int8-cpu"):
        assert samples[precision].shape == (10, 1, 8, 8) and np.isfinite(samples[precision]).all()
        assert relative_error(samples[precision], samples["fp32"]) < 0.2


def test_runner_num_samples_cycles_through_the_classes(exports, tmp_path):
    out = str(tmp_path / "n.npz")
    run_runner(exports["torchscript"][0]["path"], "--num-steps", "2", "--num-samples", "12", "--out", out)
    np.testing.assert_array_equal(np.load(out)["arr_1"], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])


def test_runner_ddim_matches_the_project_sampler(exports):
    """Pixel models clamp x_0 as sample.py does; latent models do not (DiT's clip_denoised)."""
    denoise, metadata = run_exported.load_denoiser(exports["torchscript"][0]["path"])
    labels = np.array([0, 4, 9])
    noise = np.random.default_rng(3).standard_normal((3, 1, 8, 8), dtype=np.float32)
    diffusion = create_diffusion("ddim25")
    for latent in (False, True):
        ours = run_exported.sample(denoise, {**metadata, "latent": latent}, labels, num_steps=25, seed=3)
        theirs = diffusion.ddim_sample_loop(digits_student(), noise.shape, torch.from_numpy(noise),
                                            clip_denoised=not latent, model_kwargs={"y": torch.from_numpy(labels)},
                                            eta=0.0).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
        if latent:
            assert np.abs(ours - clamped).max() > 1e-2  # the clamp mattered for this model, so both paths are tested
        clamped = ours


def test_fixed_batch_file_is_fed_its_own_batch_size(exports, digits_ckpt, tmp_path):
    path = str(tmp_path / "b3.onnx")
    export.main(export.parse_args(["--ckpt", digits_ckpt, "--batch-size", "3", "--out", path, "--repeats", "1"]))
    fixed, metadata = run_exported.load_denoiser(path)
    assert metadata["batch_size"] == 3
    labels = np.arange(7)  # chunks of 3, the last one padded
    dynamic, dynamic_metadata = run_exported.load_denoiser(exports["onnx"][0]["path"])
    np.testing.assert_allclose(run_exported.sample(fixed, metadata, labels, num_steps=10, seed=1),
                               run_exported.sample(dynamic, dynamic_metadata, labels, num_steps=10, seed=1),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="batch size 3 only"):
        run_exported.sample(fixed, metadata, labels, batch_size=4)


def test_export_from_raw_state_dict_writes_latents(tmp_path):
    raw = DiT_models["DiT-Digits-S"](input_size=8, num_classes=10)  # a latent model: 4 channels, 64 px images
    torch.save(random_weights(raw).state_dict(), tmp_path / "raw.pt")
    path = str(tmp_path / "raw.ts")
    export.main(export.parse_args(["--ckpt", str(tmp_path / "raw.pt"), "--model", "DiT-Digits-S", "--image-size",
                                   "64", "--num-classes", "10", "--format", "torchscript", "--out", path,
                                   "--repeats", "1"]))
    metadata = json.load(open(path + ".json"))
    assert metadata["latent"] and metadata["image_size"] == 64 and metadata["latent_scale"] == 0.18215
    run_exported.main(run_exported.parse_args([path, "--num-steps", "5", "--class-labels", "2", "--out",
                                               str(tmp_path / "latents.npz")]))
    latents = np.load(tmp_path / "latents.npz")
    assert latents["arr_0"].shape == (1, 4, 8, 8) and latents["arr_0"].dtype == np.float32
    with pytest.raises(ValueError, match="latents"):
        run_exported.main(run_exported.parse_args([path, "--png", str(tmp_path / "x.png")]))


def parse_error(parse_args, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors(digits_ckpt, tmp_path, capsys):
    assert "does not exist" in parse_error(export.parse_args, ["--ckpt", str(tmp_path / "missing.pt")], capsys)
    assert "--int8 is not available with --format exported" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--format", "exported", "--int8"], capsys)
    assert "--fp16" in parse_error(export.parse_args, ["--ckpt", digits_ckpt, "--format", "torchscript", "--fp16"],
                                   capsys)
    assert "invalid choice: 'tensorrt'" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--format", "tensorrt"], capsys)
    assert "argument --calib-samples: 0 is not an integer >= 1" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--int8", "--calib-samples", "0"], capsys)
    assert "onnx --int8 only" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--fp16", "--calib-samples", "8"], capsys)
    assert "must end in .ts" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--format", "torchscript", "--out", "x.onnx"], capsys)
    assert "onnx --int8 only" in parse_error(export.parse_args, ["--ckpt", digits_ckpt, "--calib-steps", "10"], capsys)
    assert "not a folder" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--int8", "--calib-latents", str(tmp_path / "none")], capsys)
    assert "not allowed with argument" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--batch-size", "2", "--dynamic-batch"], capsys)
    assert "--calib-steps 300" in parse_error(
        export.parse_args, ["--ckpt", digits_ckpt, "--int8", "--calib-steps", "300"], capsys)
    raw = tmp_path / "raw.pt"
    torch.save(digits_student().state_dict(), raw)
    with pytest.raises(ValueError, match="pass --model and --image-size"):
        export.main(export.parse_args(["--ckpt", str(raw)]))
    no_dropout = digits_student(class_dropout_prob=0.0)
    torch.save({"config": no_dropout.config, "ema": no_dropout.state_dict()}, tmp_path / "no_null.pt")
    with pytest.raises(ValueError, match="drop --cfg-scale"):
        export.main(export.parse_args(["--ckpt", str(tmp_path / "no_null.pt"), "--cfg-scale", "2"]))
    with pytest.raises(FileNotFoundError, match="export.py"):
        run_exported.load_denoiser(str(tmp_path / "missing.onnx"))
    with pytest.raises(ValueError, match="unknown extension"):
        run_exported.load_denoiser(str(raw))
    process = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--ckpt", digits_ckpt, "--format",
                              "torchscript", "--fp16"], capture_output=True, text=True)
    assert process.returncode == 2 and "--fp16" in process.stderr and "--format onnx" in process.stderr


def test_freshly_initialised_model_exports_and_verifies(tmp_path):
    """adaLN-Zero: a new DiT outputs exactly 0, where a relative error is 0 / 0; the check measures it absolutely."""
    torch.manual_seed(0)
    model = DiT_models["DiT-Digits-S"](input_size=8, in_channels=1, num_classes=10)
    path = tmp_path / "fresh.pt"
    torch.save({"config": model.config, "ema": model.state_dict(),
                "data": {"image_size": 8, "latent": False, "vae": None}}, path)
    results = export.main(export.parse_args(["--ckpt", str(path), "--format", "onnx", "--int8", "--out",
                                             str(tmp_path / "fresh.onnx"), "--repeats", "1", "--calib-samples", "2",
                                             "--calib-steps", "5"]))
    assert len(results) == 3 and all(r["relative_error"] < 1e-6 for r in results)  # not NaN
