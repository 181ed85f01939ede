"""The export table: file size, error and CPU latency of fp32, int8 and fp16 files, every format, two models.

    python bench_export.py                                   # random weights, files under results/export_bench
    python bench_export.py --digits-ckpt results/digits/checkpoints/0002000.pt --repeats 10

Models: the digits student (DiT-Digits-S on 8x8 pixels, 1 channel, 10 classes) and DiT-S/2 at 256 px (32x32x4 latents,
1000 classes), each exported with export.py (--dynamic-batch, --int8 where the format has it, --fp16 for ONNX) and
checked in a fresh process; latency is the median CPU time per call at batch 1 and 8 in onnxruntime / torch, a format's
files timed interleaved in one process. The DiT-S/2 int8 ONNX is calibrated on N(0, 1) stand-ins for latents.
Without a checkpoint a model gets random weights: DiT's initialisation with the zero-initialised adaLN-Zero and output
layers drawn from N(0, 0.02), so that the output is not identically zero. The printed markdown goes into README.md.
"""
import argparse
import os
import time

import torch

import export
from checks import run_script
from models import DiT_models

DIGITS_CONFIG = dict(input_size=8, in_channels=1, num_classes=10)  # the embedded default's student
DIT_S2_IMAGE_SIZE = 256


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


def main(args):
    start = time.perf_counter()
    os.makedirs(args.out_dir, exist_ok=True)
    models = [("digits", args.digits_ckpt or random_digits_checkpoint(args.out_dir), []),
              ("dit_s2", args.dit_s2_ckpt or random_dit_s2_state_dict(args.out_dir),
               ["--model", "DiT-S/2", "--image-size", str(DIT_S2_IMAGE_SIZE)])]
    results = []
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
    threads = f"{args.threads} thread(s)" if args.threads else "default threads"
    print(f"\n# Export benchmark ({time.perf_counter() - start:.0f} s, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {threads}; median of {args.repeats} runs)\n")
    print(export.results_table(results))


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
