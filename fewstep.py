"""Few-step students on digits, side by side with the teacher they came from.

    python fewstep.py --teacher-ckpt results/digits/teacher/checkpoints/0002000.pt --out results/fewstep

Trains (with train.py --step-distillation; finished runs are reused) a progressive student of the teacher (rounds
64 -> 32 -> ... -> 1, a checkpoint at the end of every round, so each round's student is a row), a consistency
student, and a guidance-distilled student, then samples every row for the same labels and initial noise, scores it
with evaluate.py's digits scorer, and times it against the teacher's DDIM 50 in the same run. Rows:
- the teacher at DDIM 50 (the reference) and at 1 / 2 / 4 / 8 DDIM steps on the trailing grid (training-free);
- the progressive and the consistency students at 1 / 2 / 4 / 8 steps;
- guidance: the teacher with classifier-free guidance (two forwards per step) against the guidance-distilled
  student (one forward, w as its input) at the same scales and steps.
Writes fewstep.md and fewstep.json into --out.
"""
import argparse
import json
import os

import numpy as np

from checks import non_negative_float, probability, run_script
from experiments import digits_labels, evaluate_rows, final_checkpoint, run

STEP_COUNTS = (1, 2, 4, 8)
REFERENCE_STEPS = 50


def train_students(args):
    """Progressive, consistency and guidance students of the teacher (train.py resumes or skips finished runs)."""
    start = 64
    rounds = int(np.log2(start))  # 64 -> 1
    common = ["--teacher-ckpt", args.teacher_ckpt, "--seed", args.seed, "--global-batch-size", 128, "--log-every", 100,
              "--lr", args.lr]
    runs = {name: os.path.join(args.out, name) for name in ("progressive", "consistency", "guidance")}
    progressive_steps = args.steps // rounds * rounds
    if not os.path.exists(final_checkpoint(runs["progressive"], progressive_steps)):
        run("train.py", "--step-distillation", "progressive", "--progressive-start-steps", start, "--sampling-steps", 1,
            "--max-steps", progressive_steps, "--ckpt-every", progressive_steps // rounds,
            "--ema-decay", args.progressive_ema_decay, "--results-dir", runs["progressive"], *common)
    if not os.path.exists(final_checkpoint(runs["consistency"], args.steps)):
        run("train.py", "--step-distillation", "consistency", "--sampling-steps", 4, "--max-steps", args.steps,
            "--ckpt-every", args.steps, "--ema-decay", args.ema_decay, "--results-dir", runs["consistency"], *common)
    if not os.path.exists(final_checkpoint(runs["guidance"], args.guidance_steps)):
        run("train.py", "--step-distillation", "guidance", "--guidance-range", *args.guidance_range,
            "--max-steps", args.guidance_steps, "--ckpt-every", args.guidance_steps, "--ema-decay", args.ema_decay,
            "--results-dir", runs["guidance"], *common)
    # the progressive student of each step count: the checkpoint at the end of its round
    progressive = {start >> (r + 1): final_checkpoint(runs["progressive"], (r + 1) * progressive_steps // rounds)
                   for r in range(rounds)}
    return progressive, final_checkpoint(runs["consistency"], args.steps), \
        final_checkpoint(runs["guidance"], args.guidance_steps), progressive_steps


def score_rows(args, rows):
    """experiments.evaluate_rows for this script's flags: --num-samples scored, 3 timing rounds of --timing-samples,
    the scorer cached in --out/scorer."""
    return evaluate_rows(rows, digits_labels(args.num_samples), args.seed, args.timing_samples,
                         os.path.join(args.out, "scorer"), timing_rounds=3)


def table(results, reference, training):
    lines = ["| sampler | steps | forwards / image | sampling time vs teacher DDIM 50 | class accuracy | "
             "Frechet distance | vs DDIM 50 | training steps |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        sampler, steps = name.rsplit(" ", 1)
        lines.append(f"| {sampler} | {steps} | {result['forwards']} | "
                     f"{result['seconds_per_image'] / results[reference]['seconds_per_image']:.3f} | "
                     f"{result['accuracy']:.3f} | {result['frechet']:.2f} | "
                     f"{result['frechet'] / results[reference]['frechet']:.2f}x | {training.get(name, '-')} |")
    return "\n".join(lines)


def main(args):
    from models import load_dit_checkpoint
    os.makedirs(args.out, exist_ok=True)
    progressive, consistency_ckpt, guidance_ckpt, progressive_steps = train_students(args)
    teacher, teacher_data = load_dit_checkpoint(args.teacher_ckpt)
    consistency, consistency_data = load_dit_checkpoint(consistency_ckpt)
    reference = f"teacher DDIM {REFERENCE_STEPS}"
    unguided = dict(cfg_scale=1.0)
    rows = {reference: (teacher, teacher_data, dict(sampler="ddim", num_sampling_steps=REFERENCE_STEPS, **unguided))}
    for steps in STEP_COUNTS:
        rows[f"teacher DDIM (trailing) {steps}"] = (teacher, teacher_data,
                                                    dict(sampler="ddim-trailing", num_sampling_steps=steps, **unguided))
    for steps in STEP_COUNTS:
        model, data = load_dit_checkpoint(progressive[steps])
        rows[f"progressive student {steps}"] = (model, data, dict(sampler=None, num_sampling_steps=steps, **unguided))
    for steps in STEP_COUNTS:
        rows[f"consistency student {steps}"] = (consistency, consistency_data,
                                                dict(sampler=None, num_sampling_steps=steps, **unguided))
    results = score_rows(args, rows)
    round_length = progressive_steps // 6  # the N-step progressive student has trained every round down to N
    training = {**{f"progressive student {steps}": f"{round_length * (7 - steps.bit_length())} "
                                                   f"({7 - steps.bit_length()} rounds)" for steps in STEP_COUNTS},
                **{f"consistency student {steps}": str(args.steps) for steps in STEP_COUNTS}}

    guided_rows = {}
    guidance, guidance_data = load_dit_checkpoint(guidance_ckpt)
    for w in args.guidance_scales:
        for label, model, data in (("teacher, two forwards", teacher, teacher_data),
                                   ("guidance-distilled student, one forward", guidance, guidance_data)):
            guided_rows[f"{label}, w={w} {REFERENCE_STEPS}"] = (
                model, data, dict(sampler="ddim", num_sampling_steps=REFERENCE_STEPS, cfg_scale=w))
    guided = score_rows(args, guided_rows)
    guided_lines = ["| model | w | forwards / image | sampling time vs teacher at the same w | class accuracy | "
                    "Frechet distance |", "|---|---:|---:|---:|---:|---:|"]
    for w in args.guidance_scales:
        teacher_row = guided[f"teacher, two forwards, w={w} {REFERENCE_STEPS}"]
        for label in ("teacher, two forwards", "guidance-distilled student, one forward"):
            row = guided[f"{label}, w={w} {REFERENCE_STEPS}"]
            guided_lines.append(f"| {label} | {w} | {row['forwards']} | "
                                f"{row['seconds_per_image'] / teacher_row['seconds_per_image']:.2f} | "
                                f"{row['accuracy']:.3f} | {row['frechet']:.2f} |")

    text = (f"Teacher {args.teacher_ckpt}; {args.num_samples} samples per row (classes 0-9 in turn, the same initial "
            f"noise for every row, seed {args.seed}), scored by evaluate.py's digits scorer; sampling time per image "
            f"relative to the teacher's DDIM {REFERENCE_STEPS}, median of 3 interleaved rounds on a batch of "
            f"{args.timing_samples}. Few-step rows are unguided.\n\n{table(results, reference, training)}\n\n"
            f"Guidance (DDIM {REFERENCE_STEPS}; the guidance-distilled student trained {args.guidance_steps} steps "
            f"on w in {args.guidance_range}):\n\n" + "\n".join(guided_lines) + "\n")
    with open(os.path.join(args.out, "fewstep.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "fewstep.json"), "w") as f:
        json.dump({"rows": results, "guidance": guided}, f, indent=2)
    print(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Few-step students (progressive, consistency) and guidance "
                                                 "distillation of a digits teacher, scored side by side.")
    parser.add_argument("--teacher-ckpt", required=True, help="digits teacher checkpoint (run_digits.py's)")
    parser.add_argument("--out", default="results/fewstep", help="output folder (finished runs are reused)")
    parser.add_argument("--seed", type=int, default=0, help="seed of training and sampling")
    parser.add_argument("--steps", type=int, default=2000,
                        help="training steps of the progressive (split over its 6 rounds) and consistency students")
    parser.add_argument("--guidance-steps", type=int, default=1000, help="training steps of the guidance student")
    parser.add_argument("--guidance-range", type=non_negative_float, nargs=2, default=[1.0, 4.0],
                        help="its trained w range")
    parser.add_argument("--guidance-scales", type=non_negative_float, nargs="+", default=[1.5, 3.0], help="w compared")
    parser.add_argument("--lr", type=non_negative_float, default=1e-3, help="learning rate of the students")
    parser.add_argument("--ema-decay", type=probability, default=0.995,
                        help="EMA decay of the consistency and guidance "
                                                                         "students (the main job's)")
    parser.add_argument("--progressive-ema-decay", type=probability, default=0.99,
                        help="EMA decay of the progressive student: its time constant (100 steps) must stay well "
                             "below a round (333 steps), or a round's EMA still holds the previous round's student")
    parser.add_argument("--num-samples", type=int, default=500, help="samples scored per row")
    parser.add_argument("--timing-samples", type=int, default=100, help="batch timed for the sampling-time ratio")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.teacher_ckpt):
        parser.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    if args.steps < 6 or args.guidance_steps < 1 or args.num_samples < 2 or args.timing_samples < 1:
        parser.error("--steps must be at least 6 (6 rounds), --guidance-steps and --timing-samples 1, "
                     "--num-samples 2")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
