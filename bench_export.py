"""The export table: file size, error and CPU latency of fp32, int8 and fp16 files, every format, two models; and the
runtime table: the ONNX files in onnxruntime and OpenVINO against torch eager, side by side in this one process.

    python bench_export.py                                   # random weights, files under results/export_bench
    python bench_export.py --digits-ckpt results/digits/checkpoints/0002000.pt --repeats 10

Models: the digits student (DiT-Digits-S on 8x8 pixels, 1 channel, 10 classes) and DiT-S/2 at 256 px (32x32x4 latents,
1000 classes), each exported with export.py (--dynamic-batch, --int8 where the format has it, --fp16 for ONNX) and
checked in a fresh process; latency is the median CPU time per call at batch 1 and 8 in onnxruntime / torch, a format's
files timed interleaved in one process. The DiT-S/2 int8 ONNX is calibrated on N(0, 1) stand-ins for latents.
The runtime table times, interleaved in this process at batch 1 and 8: torch eager fp32 (the model export.py loads),
onnxruntime on the fp32, Q/DQ int8 and dynamic int8-cpu files, OpenVINO on the fp32, fp16 and Q/DQ int8 files; each
row's latency is given against onnxruntime fp32 and torch eager fp32. Its header names the CPU's instruction sets
(AVX2, AVX-512 VNNI, AMX: what decides the int8 kernels); below it, the kernels OpenVINO's profiling saw run for the
int8 file.
Without a checkpoint a model gets random weights: DiT's initialisation with the zero-initialised adaLN-Zero and output
layers drawn from N(0, 0.02), so that the output is not identically zero. The printed markdown goes into README.md.
"""
import argparse
import os
import time

import numpy as np
import torch

import export
import run_exported
from checks import run_script
from models import DiT_models, load_dit_checkpoint

DIGITS_CONFIG = dict(input_size=8, in_channels=1, num_classes=10)  # the embedded default's student
DIT_S2_IMAGE_SIZE = 256
# (runtime, precision of the ONNX file) rows of the runtime table, after torch eager fp32
RUNTIME_ROWS = [("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("onnxruntime", "int8-full"),
                ("onnxruntime", "int8-cpu"), ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8"),
                ("openvino", "int8-full")]
BATCH_SIZES = export.VERIFY_BATCH_SIZES  # 1 and 8


def random_weights(model, seed=0):
    """Fill DiT's zero-initialised tensors (adaLN-Zero modulation, output layer) with N(0, 0.02), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


def random_digits_checkpoint(folder):
    """A training checkpoint of the digits student with random weights (pixel space, no VAE)."""
    torch.manual_seed(0)  # DiT's own initialisation draws from the global generator
    model = random_weights(DiT_models["DiT-Digits-S"](**DIGITS_CONFIG))
    path = os.path.join(folder, "digits_student_random.pt")
    torch.save({"config": model.config, "ema": model.state_dict(),
                "data": {"image_size": DIGITS_CONFIG["input_size"], "latent": False, "vae": None}}, path)
    return path


def random_dit_s2_state_dict(folder):
    """A raw DiT-S/2 256px state_dict with random weights, like the official checkpoints (no config)."""
    torch.manual_seed(0)
    model = random_weights(DiT_models["DiT-S/2"](input_size=DIT_S2_IMAGE_SIZE // 8))
    path = os.path.join(folder, "dit_s2_random.pt")
    torch.save(model.state_dict(), path)
    return path


def full_int8_file(args, model, data, path):
    """The full-INT8 Q/DQ file (every Linear, as export.py writes a quantization-aware checkpoint) of model, with the
    scales quantization-aware distillation starts from (MinMax on export.py's calibration set, 64 rows): its size and
    speed are the trained file's; its error is before any training (the shipped digits student's, trained, is in the
    main job's report)."""
    from models import quantization_aware_copy
    from quantization import DEFAULT_WEIGHT_BITS, calibrate
    student = quantization_aware_copy(model, DEFAULT_WEIGHT_BITS)
    rows = export.calibration_set(model.config, data, 64, export.CALIB_DDIM_STEPS)
    batches = [tuple(torch.from_numpy(rows[k][i:i + 16]) for k in "xty") for i in range(0, 64, 16)]
    calibrate(student, lambda m, batch: m(*batch), batches)
    example = tuple(torch.from_numpy(rows[k][:2]) for k in "xty")
    metadata = export.export_metadata(student, data, argparse.Namespace(**dict(vars(args), int8_scales="learned")),
                                      "int8")
    export.write_learned_qdq(student.eval(), None, example, path, metadata, dynamic=True)
    return path


def runtime_comparison(name, export_argv, onnx_files, repeats, threads=None):
    """Rows of the runtime table for one model: torch eager fp32 and RUNTIME_ROWS ({precision: path} of its ONNX
    files), timed interleaved in this process (median of repeats per batch size after warm-up runs), each with its
    relative error against eager on verification inputs. OpenVINO rows only where it is installed."""
    args = export.parse_args(export_argv)
    model, data = load_dit_checkpoint(args.ckpt, args.model, args.image_size, args.num_classes)
    onnx_files["int8-full"] = full_int8_file(args, model, data, onnx_files["fp32"][:-len(".onnx")] + "_full_int8.onnx")
    eager = export.Denoiser(model).eval()
    if threads:
        torch.set_num_threads(threads)

    def run_eager(x, t, y):
        with torch.inference_mode():
            return eager(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()

    runs = [("torch eager", "fp32", "-", run_eager)]
    for runtime, precision in RUNTIME_ROWS:
        if runtime == "openvino" and not export.openvino_installed():
            continue
        path = onnx_files[precision]
        runs.append((runtime, precision, os.path.basename(path),
                     run_exported.load_denoiser(path, "cpu", threads, runtime)[0]))
    inputs = export.verification_inputs(model.config, BATCH_SIZES)
    feeds = {b: tuple(inputs[f"{k}_{b}"] for k in "xty") for b in BATCH_SIZES}
    reference = {b: run_eager(*feeds[b]) for b in BATCH_SIZES}
    sizes = {precision: export.file_size(path) for precision, path in onnx_files.items()}
    rows = [{"model": name, "runtime": runtime, "file": file, "precision": precision,
             "fp32_size_ratio": sizes["fp32"] / sizes[precision] if precision in sizes else 1.0,
             "relative_error": export.compare({b: run(*feeds[b]) for b in BATCH_SIZES}, reference)[1],
             "latency_s": {}} for runtime, precision, file, run in runs]
    for b in BATCH_SIZES:
        for _, _, _, run in runs:
            for _ in range(run_exported.WARMUP_RUNS):
                run(*feeds[b])
        times = [[] for _ in runs]
        for _ in range(repeats):
            for i, (_, _, _, run) in enumerate(runs):
                start = time.perf_counter()
                run(*feeds[b])
                times[i].append(time.perf_counter() - start)
        for row, samples in zip(rows, times):
            row["latency_s"][b] = float(np.median(samples))
    kernels = None
    if export.openvino_installed():
        kernels = run_exported.openvino_kernels(onnx_files["int8"], dict(zip("xty", feeds[BATCH_SIZES[-1]])),
                                                threads)
    return rows, kernels, weight_bits_errors(onnx_files, feeds, reference, threads)


def weight_bits_errors(onnx_files, feeds, reference, threads=None):
    """{7: error, 8: error}: relative error against eager of the Q/DQ file (7-bit weights) and of the same file
    quantized with full-range 8-bit weights, both computed exactly (onnxruntime with its fused int8 kernels off:
    DequantizeLinear, then fp32 MatMul), as TensorRT computes them: what 7 bits cost where nothing saturates."""
    import onnxruntime as ort

    int8 = onnx_files["int8"]
    full_range = int8[:-len(".onnx")] + "_8bit.onnx"
    calibration = dict(np.load(onnx_files["fp32"][:-len(".onnx")] + "_calib.npz"))
    export.quantize_onnx_qdq(onnx_files["fp32"], full_range, run_exported.load_denoiser(int8)[1], calibration,
                             reduce_range=False)
    errors = {}
    for bits, path in ((7, int8), (8, full_range)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        outputs = {b: session.run(None, dict(zip("xty", feeds[b])))[0] for b in BATCH_SIZES}
        errors[bits] = export.compare(outputs, reference)[1]
    return errors


def runtime_table(rows):
    """Markdown: one row per model and runtime; latency against onnxruntime fp32 and torch eager fp32 of its model."""
    header = ["model", "runtime", "file", "precision", "fp32 size / size", "rel err vs eager"]
    for b in BATCH_SIZES:
        header += [f"ms, batch {b}", f"/ onnxruntime fp32, batch {b}", f"/ torch eager, batch {b}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        same = [r for r in rows if r["model"] == row["model"]]
        onnxruntime = next(r for r in same if (r["runtime"], r["precision"]) == ("onnxruntime", "fp32"))
        eager = next(r for r in same if r["runtime"] == "torch eager")
        cells = [row["model"], row["runtime"], row["file"], row["precision"], f"{row['fp32_size_ratio']:.2f}x",
                 f"{row['relative_error']:.2e}"]
        for b in BATCH_SIZES:
            latency = row["latency_s"][b]
            cells += [f"{1e3 * latency:.1f}", f"{latency / onnxruntime['latency_s'][b]:.2f}",
                      f"{latency / eager['latency_s'][b]:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args):
    start = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    models = [("digits", args.digits_ckpt or random_digits_checkpoint(args.out_dir), []),
              ("dit_s2", args.dit_s2_ckpt or random_dit_s2_state_dict(args.out_dir),
               ["--model", "DiT-S/2", "--image-size", str(DIT_S2_IMAGE_SIZE)])]
    results, runtime_rows, kernels, bits = [], [], {}, {}
    for name, ckpt, extra in models:
        for fmt, extension in export.EXTENSIONS.items():
            argv = ["--ckpt", ckpt, "--format", fmt, "--dynamic-batch", "--repeats", str(args.repeats),
                    "--out", os.path.join(args.out_dir, name + extension)] + extra
            argv += ["--threads", str(args.threads)] if args.threads else []
            if fmt != "exported":
                argv.append("--int8")
            if fmt == "onnx":
                argv += ["--fp16", "--calib-samples", "64"]  # a small calibration set keeps this quick
            print(f"\n## python export.py {' '.join(argv)}")
            for result in export.main(export.parse_args(argv)):
                results.append(dict(result, model=name))
            if fmt == "onnx":
                onnx_files = {r["precision"]: r["path"] for r in results if r["model"] == name and r["format"] == fmt}
                rows, kernels[name], bits[name] = runtime_comparison(name, argv, onnx_files, args.repeats,
                                                                     args.threads)
                runtime_rows += rows
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    cpu = run_exported.describe_cpu(run_exported.cpu_description())
    print(f"\n# Export benchmark ({time.perf_counter() - start:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {threads}; median of {args.repeats} runs)\n{cpu}\n")
    print(export.results_table(results))
    print(f"\n# Runtimes side by side in one process ({threads}; median of {args.repeats} runs)\n{cpu}\n")
    print(runtime_table(runtime_rows))
    if not export.openvino_installed():
        print("\nOpenVINO is not installed, so its rows are left out: pip install openvino")
    print("\nThe Q/DQ file computed exactly (onnxruntime, fused int8 kernels off, as TensorRT computes it), relative "
          "error against torch eager fp32:")
    for name, errors in bits.items():
        print(f"- {name}_int8.onnx: 7-bit weights (the file) {errors[7]:.2e}, full-range 8-bit weights "
              f"{errors[8]:.2e}")
    for name, found in kernels.items():
        if found:
            total = sum(k["ms"] for k in found) or 1.0
            print(f"\nOpenVINO's profiling of {name}_int8.onnx at batch {BATCH_SIZES[-1]} (layer type, kernel, "
                  f"count, share of its time):")
            for k in found[:8]:
                print(f"- {k['node']} {k['kernel']} x{k['count']}: {k['ms']:.2f} ms ({100 * k['ms'] / total:.0f}%)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits-ckpt", default=None,
                        help="a trained digits student checkpoint (default: random weights)")
    parser.add_argument("--dit-s2-ckpt", default=None,
                        help="a raw DiT-S/2 256px state_dict (default: random weights)")
    parser.add_argument("--out-dir", default="results/export_bench", help="folder for the checkpoints and exports")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per batch size; the median is reported")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the timed runs (default: one per core; 1 on a shared machine)")
    args = parser.parse_args(argv)
    for flag, path in (("--digits-ckpt", args.digits_ckpt), ("--dit-s2-ckpt", args.dit_s2_ckpt)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{flag} {path} does not exist")
    if args.repeats < 1 or args.threads is not None and args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
