"""The main job on the embedded default: teacher -> distilled student vs the same student from scratch, on digits.

    python run_digits.py --out results/digits

1. trains a digits teacher (train.py), 2. distills a student through warmup -> feature -> joint (train.py
--distillation), 3. trains the same student from scratch for the same number of steps, 4. step-distills the distilled
student into a few-step model with guidance folded in (train.py --step-distillation consistency --guidance-range 1 3
--guidance-min-fraction 0.75: 4 steps, one forward per step at any w, OUT/fewstep), 5. quantization-aware distills
that into the shipped model (train.py --step-distillation qat: INT8 on every Linear, OUT/shipped), 6. samples all
five with the same classes and initial noise (teacher.npz, ..., shipped.npz), unguided, and the teacher (two
forwards per step) and the guided students (one) at w = 1.5 and 3, 7. scores them (evaluate.py), 8. exports the
distilled, the few-step and the shipped student (export.py: fp32, int8 (post-training for the first two, the learned
full INT8 of the shipped one), fp16) and scores samples made through every exported file (run_exported.py), 9.
writes report.md, a side-by-side grid and the loss curves into --out. The diffusion models sample with --sampler
(DPM-Solver++ 2M, 20 steps: DDIM 50's quality in 2.5x fewer forwards; samplers.py's table on this job's teacher and
student, README "Fast samplers", is not part of this job: it does not change what the job ships). Every step is
reused when its output already exists, so rerunning after a stop continues where it stopped.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from checks import non_negative_float, non_negative_int, positive_int, probability, run_script, write_atomically
from experiments import (STUDENT, TEACHER, TRAINING, digits_labels, export_runtime, exported_metadata,
                         final_checkpoint, run, time_exports, time_sampling)

# Step distillation of the distilled student into the shipped few-step model: fine-tuning from its own weights, at half
# the learning rate; the EMA's time constant (100 steps) also stays well below a progressive round.
FEWSTEP_TRAINING = ["--global-batch-size", "128", "--lr", "1e-3", "--ema-decay", "0.99", "--log-every", "100"]
FEWSTEP_METHOD_FLAGS = {"progressive": ["--progressive-start-steps", "32"], "consistency": []}
# Quantization-aware distillation of the few-step student: a fine-tuning at a tenth of its learning rate.
QAT_TRAINING = ["--global-batch-size", "128", "--lr", "1e-4", "--ema-decay", "0.99", "--log-every", "50"]
NAMES = ("teacher", "student", "scratch", "fewstep", "shipped")
GUIDED_NAMES = ("teacher", "fewstep", "shipped")  # sampled at --guidance-scales too


STAGE_SECONDS = {}  # wall time of each stage of this run (a reused stage: the time to find it done), for the report


def timed(stage, function, *arguments):
    start = time.time()
    result = function(*arguments)
    STAGE_SECONDS[stage] = STAGE_SECONDS.get(stage, 0.0) + time.time() - start
    return result


def train_models(args):
    """Teacher, distilled student, scratch student, the few-step student (the distilled student, step-distilled with
    guidance folded in) and the shipped one (that, quantization-aware distilled); train.py resumes or skips what is
    already done."""
    teacher_dir, student_dir, scratch_dir = (os.path.join(args.out, n) for n in ("teacher", "student", "scratch"))
    student_steps = args.warmup_steps + args.feature_steps + args.joint_steps
    timed("train teacher", run, "train.py", "--model", TEACHER, "--max-steps", args.teacher_steps,
          "--ckpt-every", args.teacher_steps, "--results-dir", teacher_dir, "--seed", args.seed, *TRAINING)
    teacher_ckpt = final_checkpoint(teacher_dir, args.teacher_steps)
    timed("train distilled student", run, "train.py", "--distillation", "--teacher-model", TEACHER,
          "--teacher-ckpt", teacher_ckpt, "--student-model", STUDENT, "--warmup-steps", args.warmup_steps,
          "--feature-steps", args.feature_steps, "--joint-steps", args.joint_steps, "--ckpt-every", student_steps,
          "--results-dir", student_dir, "--seed", args.seed, *TRAINING)
    timed("train scratch student", run, "train.py", "--model", STUDENT, "--max-steps", student_steps,
          "--ckpt-every", student_steps, "--results-dir", scratch_dir, "--seed", args.seed, *TRAINING)
    student_ckpt = final_checkpoint(student_dir, student_steps)
    fewstep_dir = os.path.join(args.out, "fewstep")
    timed("train few-step student", run, "train.py", "--step-distillation", args.fewstep_method,
          "--teacher-ckpt", student_ckpt, "--sampling-steps", args.fewstep_sampling_steps,
          *FEWSTEP_METHOD_FLAGS[args.fewstep_method], "--guidance-range", *args.guidance_range,
          "--guidance-min-fraction", args.guidance_min_fraction,
          "--max-steps", args.fewstep_steps, "--ckpt-every", args.fewstep_steps, "--results-dir", fewstep_dir,
          "--seed", args.seed, *FEWSTEP_TRAINING)
    fewstep_ckpt = final_checkpoint(fewstep_dir, args.fewstep_steps)
    shipped_dir = os.path.join(args.out, "shipped")
    timed("quantization-aware distillation", run, "train.py", "--step-distillation", "qat",
          "--teacher-ckpt", fewstep_ckpt, "--guidance-min-fraction", args.guidance_min_fraction,
          "--max-steps", args.qat_steps, "--ckpt-every", args.qat_steps,
          "--results-dir", shipped_dir, "--seed", args.seed, *QAT_TRAINING)
    return {"teacher": teacher_ckpt, "student": student_ckpt, "scratch": final_checkpoint(scratch_dir, student_steps),
            "fewstep": fewstep_ckpt, "shipped": final_checkpoint(shipped_dir, args.qat_steps)}


def sample_all(args, checkpoints):
    """Each model's samples for the same labels and initial noise, as ADM .npz files; timed for the report.

    The sampling time per image is the median of 3 rounds that time the models in turn on the same batch.
    """
    from models import load_dit_checkpoint
    from sample import generate, save_npz
    labels = digits_labels(args.num_samples)
    rows = {}
    for name, path in checkpoints.items():
        model, data = load_dit_checkpoint(path)
        rows[name] = (model, data, sampling_settings(args, data))
    for name, (model, data, settings) in rows.items():
        npz = os.path.join(args.out, f"{name}.npz")
        if not os.path.exists(npz):
            images = generate(model, data, labels, seed=args.seed, batch_size=500, progress=True, **settings)
            save_npz(npz, images, labels)
    return time_sampling(rows, labels, args.seed, args.timing_samples, rounds=3)


def sample_guided(args, checkpoints):
    """The teacher (classifier-free guidance: two forwards per step) and the guidance-distilled students (w as an
    input: one forward) at each --guidance-scales w, the same labels and noise as sample_all: {name: npz path}."""
    from models import load_dit_checkpoint
    from sample import generate, save_npz
    labels, paths = digits_labels(args.num_samples), {}
    for name in GUIDED_NAMES:
        model, data = load_dit_checkpoint(checkpoints[name])
        for w in args.guidance_scales:
            paths[f"{name} w={w:g}"] = npz = os.path.join(args.out, f"{name}_w{w:g}.npz")
            if not os.path.exists(npz):
                settings = dict(sampling_settings(args, data), cfg_scale=w)
                images = generate(model, data, labels, seed=args.seed, batch_size=500, progress=True, **settings)
                save_npz(npz, images, labels)
    return paths


def sampling_settings(args, data):
    """--sampler in --steps for the diffusion models; the few-step student's own sampler and steps (unguided)."""
    if data["sampling"]["sampler"] is not None:
        return dict(sampler=None, num_sampling_steps=None, cfg_scale=1.0)
    return dict(sampler=args.sampler, num_sampling_steps=args.steps, cfg_scale=args.cfg_scale)


def score_all(args, guided):
    from evaluate import digits_reference_scores, digits_scores
    cache = os.path.join(args.out, "digits_scorer")
    scores = {}
    for name, path in {**{name: os.path.join(args.out, f"{name}.npz") for name in NAMES}, **guided}.items():
        with np.load(path) as samples:
            scores[name] = digits_scores(samples["arr_0"], samples["arr_1"], cache_dir=cache)
    scores["real"] = digits_reference_scores(cache_dir=cache)
    return scores


def export_students(args, checkpoints):
    """The distilled, the few-step and the shipped student, verified by export.py: TorchScript fp32 + int8 (libtorch,
    a Jetson's CPU; not for the shipped one, whose INT8 is the Q/DQ file) and ONNX fp32 + Q/DQ int8 (TensorRT,
    OpenVINO: post-training on the token Linears for the first two, the learned full INT8 for the shipped one); the
    few-step and the shipped student also as ONNX fp16 (TensorRT) and as onnxruntime's CPU-only dynamic int8.
    Returns {name: path} of the files to score."""
    exported = {}
    for name in ("student", "fewstep", "shipped"):
        guidance = ["--cfg-scale", args.cfg_scale] if args.cfg_scale != 1 and name == "student" else []
        for form, extension in (("torchscript", ".ts"), ("onnx", ".onnx")):
            if name == "shipped" and form == "torchscript":
                continue
            out = os.path.join(args.out, "export", name + extension)
            stem = out[: -len(extension)]
            files = {f"{name} {form}": out, f"{name} {form} int8": stem + "_int8" + extension}
            fp16 = ["--fp16"] if form == "onnx" and name != "student" else []
            if fp16:  # the CPU int8 file is written with every ONNX --int8; scored for the few-step models only
                files |= {f"{name} onnx int8-cpu": stem + "_int8_cpu.onnx", f"{name} onnx fp16": stem + "_fp16.onnx"}
            if name == "shipped" and form == "onnx":  # the shipped files on OpenVINO too (the CPU compiler)
                files |= {f"{key} openvino": files[key] for key in ("shipped onnx", "shipped onnx int8",
                                                                     "shipped onnx fp16")}
            if not all(os.path.exists(path) for path in files.values()):
                run("export.py", "--ckpt", checkpoints[name], "--format", form, "--int8", *fp16, "--dynamic-batch",
                    *guidance, "--out", out)
            exported |= files
    return exported


def score_exports(args, exported):
    """Sample every exported file with the standalone runner (the same labels and noise for all) and score it."""
    import run_exported
    from evaluate import digits_scores
    scores = {}
    labels = np.asarray(digits_labels(args.num_samples))  # as run_exported.py --num-samples: classes in turn
    for name, path in exported.items():
        runtime = export_runtime(name)
        npz = path + (".openvino" if runtime == "openvino" else "") + ".samples.npz"
        if not os.path.exists(npz):  # the few-step files sample with their own sampler and steps
            # run_exported.py's sampler, called here rather than as a new process per file (each would import
            # diffusers for the solver again); export.py has already run every file in a process of its own
            denoise, metadata = run_exported.load_denoiser(path, "cpu", runtime=runtime)
            few_step = exported_metadata(path)["sampling"]["sampler"] is not None
            samples = run_exported.sample(denoise, metadata, labels, None if few_step else args.steps, args.seed,
                                          sampler=None if few_step else args.sampler)
            images = run_exported.to_uint8_nhwc(samples)
            write_atomically(npz, lambda temporary: np.savez(temporary, arr_0=images, arr_1=labels))
            print(f"sampled {len(labels)} images with {os.path.relpath(path, args.out)} ({runtime}) -> {npz}",
                  flush=True)
        with np.load(npz) as samples:
            scores[name] = digits_scores(samples["arr_0"], samples["arr_1"],
                                         cache_dir=os.path.join(args.out, "digits_scorer"))
        scores[name]["megabytes"] = os.path.getsize(path) / 2**20
        # the file's number format (fp32 / int8 / fp16); "precision" is already the sample precision metric
        scores[name]["number_format"] = exported_metadata(path)["precision"]
        scores[name]["runtime"] = runtime if path.endswith(".onnx") else "torch"
    return scores


def save_comparison_grid(args):
    """Teacher / distilled student / scratch student / few-step student, one row each, for the same classes and
    initial noise."""
    from torchvision.utils import save_image
    rows = []
    for name in NAMES:
        with np.load(os.path.join(args.out, f"{name}.npz")) as samples:
            images = torch.from_numpy(samples["arr_0"][:10]).permute(0, 3, 1, 2).float() / 255  # (10, C, H, W)
        rows.append(torch.nn.functional.interpolate(images, scale_factor=6, mode="nearest"))
    path = os.path.join(args.out, "comparison.png")
    save_image(torch.cat(rows), path, nrow=10, padding=2, pad_value=1.0)
    return path


def save_loss_curves(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    figure, axes = plt.subplots(1, len(NAMES), figsize=(5 * len(NAMES), 4))
    for axis, name in zip(axes, NAMES):
        events = EventAccumulator(os.path.join(args.out, name, "tensorboard"))
        events.Reload()
        for tag in sorted(t for t in events.Tags()["scalars"] if t.startswith("loss/")):
            steps, values = zip(*[(e.step, e.value) for e in events.Scalars(tag)])
            axis.plot(steps, values, label=tag[len("loss/"):])
        axis.set_title({"teacher": "teacher", "student": "distilled student", "scratch": "student from scratch",
                        "fewstep": f"few-step student ({args.fewstep_method} + guidance)",
                        "shipped": "shipped student (quantization-aware INT8)"}[name])
        axis.set_xlabel("step")
        axis.set_yscale("log")
        axis.legend(fontsize=7)
    figure.tight_layout()
    path = os.path.join(args.out, "loss_curves.png")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def describe_cpu_line():
    """The CPU and the instruction sets that decide its int8 kernels (run_exported.describe_cpu)."""
    from run_exported import cpu_description, describe_cpu
    return describe_cpu(cpu_description())


def guidance_table(args, scores):
    """Markdown: the teacher's two-forward guidance against the guidance-distilled students' one forward, per w."""
    lines = [f"| w | teacher ({args.sampler} {args.steps}, 2 forwards / step): accuracy | Frechet | "
             f"few-step student (1 forward / step): accuracy | Frechet | shipped INT8 student: accuracy | Frechet |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for w in (1.0, *args.guidance_scales):
        keys = [name if w == 1 else f"{name} w={w:g}" for name in GUIDED_NAMES]
        lines.append(f"| {w:g} | " + " | ".join(f"{scores[k]['accuracy']:.3f} | {scores[k]['frechet']:.2f}"
                                                 for k in keys) + " |")
    return lines


def write_report(args, checkpoints, timings, scores, exported, export_scores):
    from models import flops_per_forward, load_dit_checkpoint
    from sampling import forwards_per_step
    lines = ["# Digits: teacher, distilled student, student from scratch, few-step student", "",
             f"Command: `python run_digits.py --out {args.out}` (seed {args.seed}). Samples: {args.num_samples} "
             f"per model (classes 0-9 in turn, the same initial noise for every model), {args.sampler} {args.steps} "
             f"steps (the few-step student: its own sampler and steps), cfg scale {args.cfg_scale} (the few-step "
             f"student: 1). Scores from evaluate.py's digits classifier (held-out real digits: "
             f"accuracy {scores['real']['accuracy']:.3f}, Frechet distance floor {scores['real']['frechet']:.2f}).",
             "", "| model | parameters | GFLOPs / forward | forwards / image | sampling time vs teacher | "
                 "class accuracy | Frechet distance |", "|---|---:|---:|---:|---:|---:|---:|"]
    names = {"teacher": f"teacher ({TEACHER})", "student": f"distilled student ({STUDENT})",
             "scratch": f"scratch student ({STUDENT})",
             "fewstep": f"few-step student ({STUDENT}, {args.fewstep_method}-distilled from the distilled student, "
                        f"guidance w in {args.guidance_range} folded in)",
             "shipped": "shipped student (the few-step student, quantization-aware distilled: simulated INT8 on "
                        "every Linear)"}
    for name, path in checkpoints.items():
        model, data = load_dit_checkpoint(path)
        parameters = sum(p.numel() for p in model.parameters())
        gflops = flops_per_forward(model.config) / 2 / 1e9  # multiply-adds, as the DiT paper counts
        settings = sampling_settings(args, data)
        steps = settings["num_sampling_steps"] or data["sampling"]["default_steps"]
        forwards = steps * forwards_per_step(model, settings["cfg_scale"])
        lines.append(f"| {names[name]} | {parameters:,} | {gflops:.4f} | {forwards} | "
                     f"{timings[name] / timings['teacher']:.3f} | {scores[name]['accuracy']:.3f} | "
                     f"{scores[name]['frechet']:.2f} |")
    lines += ["", "![teacher / distilled / scratch / few-step / shipped student](comparison.png)", "",
              "Rows: teacher, distilled student, scratch student, few-step student, shipped student; columns: classes "
              "0-9.", "",
              f"Guidance: the teacher's classifier-free guidance (conditional and null batch: two forwards per step) "
              f"against the students that take w as an input (one forward per step at any w in "
              f"{args.guidance_range}, trained with a share {args.guidance_min_fraction:g} of the examples at w = "
              f"{args.guidance_range[0]:g}, the rest uniform); the same labels and noise, {args.num_samples} samples "
              f"per cell.", "",
              *guidance_table(args, scores), "",
              "![loss curves](loss_curves.png)", "",
              f"Exported students, sampled with the standalone runner (run_exported.py: {args.sampler} "
              f"{args.steps} steps, the few-step student its own sampler and steps; the same {args.num_samples} labels "
              "and numpy noise for every file, so int8 and fp16 are compared with fp32 on equal terms; its noise "
              "differs from sample.py's, so compare within this table). int8 in ONNX is explicit Q/DQ for TensorRT and "
              "OpenVINO (the distilled and few-step students: post-training, the token Linears; the shipped student: "
              "its learned full INT8, every Linear; 7-bit weights, safe on AVX2-only CPUs), int8-cpu onnxruntime's "
              "dynamic int8 for CPUs, fp16 written into the ONNX for TensorRT. CPU latency relative to the fp32 file "
              "of the same model and format run by onnxruntime (TorchScript: by torch), the files timed interleaved "
              "in one process (1 thread; TensorRT on a GPU is another matter). CPU: "
              f"{describe_cpu_line()}.",
              "", "| file | runtime | precision | MB | CPU latency / fp32, batch 1 | batch 8 | class accuracy | "
                  "Frechet distance |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for name, path in exported.items():
        score = export_scores[name]
        lines.append(f"| {os.path.relpath(path, args.out)} | {score['runtime']} | {score['number_format']} | "
                     f"{score['megabytes']:.2f} | "
                     f"{score['latency_vs_fp32'][1]:.2f} | {score['latency_vs_fp32'][8]:.2f} | "
                     f"{score['accuracy']:.3f} | {score['frechet']:.2f} |")
    lines += ["", "Where this run's wall time went (a stage reused from an earlier run counts the time to find it "
              "done):",
              "", "| stage | minutes |", "|---|---:|"]
    lines += [f"| {stage} | {seconds / 60:.1f} |" for stage, seconds in STAGE_SECONDS.items()]
    path = os.path.join(args.out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "scores.json"), "w") as f:
        json.dump({"scores": scores, "sampling_seconds_per_image": timings, "exports": export_scores}, f,
                  indent=2)
    return path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Teacher -> distilled student vs scratch student on the embedded "
                                                 "digits: train, sample, score, export, report.")
    parser.add_argument("--out", default="results/digits", help="output folder (rerunning reuses finished steps)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of training and sampling")
    parser.add_argument("--teacher-steps", type=positive_int, default=2000, help="teacher training steps")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=300,
                        help="student warmup steps (+ feature KD)")
    parser.add_argument("--feature-steps", type=non_negative_int, default=600,
                        help="student steps adding output (noise) KD")
    parser.add_argument("--joint-steps", type=non_negative_int, default=900,
                        help="student steps adding the tempered KL")
    parser.add_argument("--fewstep-method", choices=list(FEWSTEP_METHOD_FLAGS), default="consistency",
                        help="step distillation of the distilled student into the shipped few-step model "
                             "(consistency: 13.2 Frechet at 4 steps where progressive reached 17.2, README)")
    parser.add_argument("--fewstep-steps", type=positive_int, default=900,
                        help="its training steps (900 beat 600 and 1,200 at w = 1 and 1.5 on this job's student, "
                             "README)")
    parser.add_argument("--fewstep-sampling-steps", type=positive_int, default=4, help="the steps it samples in")
    parser.add_argument("--guidance-range", type=non_negative_float, nargs=2, default=[1.0, 3.0],
                        metavar=("WMIN", "WMAX"), help="guidance scales folded into the few-step student (an input)")
    parser.add_argument("--guidance-min-fraction", type=probability, default=0.75,
                        help="share of the few-step and QAT training examples drawn at w = WMIN, the rest uniform "
                             "over the range (0.75 kept w = 1 at the unguided student's Frechet distance, README)")
    parser.add_argument("--guidance-scales", type=non_negative_float, nargs="+", default=[1.5, 3.0],
                        help="w at which the teacher and the guided students are also scored (besides 1)")
    parser.add_argument("--qat-steps", type=positive_int, default=300,
                        help="quantization-aware distillation steps of the shipped student")
    parser.add_argument("--num-samples", type=positive_int, default=500, help="samples per model for the scores")
    parser.add_argument("--sampler", choices=["ddim", "dpm++2m", "unipc"], default="dpm++2m",
                        help="sampler of the diffusion models (DPM-Solver++ 2M: DDIM 50's scores at 20 steps, README)")
    parser.add_argument("--steps", type=positive_int, default=20, help="its sampling steps")
    parser.add_argument("--cfg-scale", type=non_negative_float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--timing-samples", type=positive_int, default=100,
                        help="batch timed for the sampling-time ratio")
    return parser.parse_args(argv)


def main(args):
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    checkpoints = train_models(args)
    timings = timed("sample (unguided, timed)", sample_all, args, checkpoints)
    scores = timed("sample guided, score", lambda: score_all(args, sample_guided(args, checkpoints)))
    exported = timed("export", export_students, args, checkpoints)
    export_scores = timed("sample and score the exported files", score_exports, args, exported)
    for name, ratios in timed("time the exported files", time_exports, exported).items():
        export_scores[name]["latency_vs_fp32"] = ratios
    save_comparison_grid(args)
    save_loss_curves(args)
    STAGE_SECONDS["total (to the report)"] = time.time() - start
    report = write_report(args, checkpoints, timings, scores, exported, export_scores)
    print(open(report).read())


if __name__ == "__main__":
    run_script(main, parse_args)
