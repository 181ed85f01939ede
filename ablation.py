"""The distillation recipe, ablated on digits: which loss terms and whether staging help, over several seeds.

    python ablation.py --teacher-ckpt results/digits/teacher/checkpoints/0002000.pt --out results/ablation

Each variant distills DiT-Digits-S from the same teacher for the same number of steps with train.py (the main job's
training flags), samples it and scores it with evaluate.py; the table gives the mean and standard deviation over seeds.
Finished runs are reused, so a stopped ablation continues where it stopped.
"""
import argparse
import json
import os

import numpy as np

from checks import non_negative_float, run_script
from experiments import STUDENT, TEACHER, TRAINING, digits_labels, final_checkpoint, run

# name -> train.py flags. The first five train all their terms from the first step (no stages), adding one term at
# a time; the last is the staged recipe of train.py's defaults (scaled to the same total length).
VARIANTS = {
    "diffusion only": ["--kd-output-weight", "0", "--kd-feature-weight", "0", "--kd-kl-weight", "0"],
    "+ output MSE": ["--kd-feature-weight", "0", "--kd-kl-weight", "0"],
    "+ feature": ["--kd-kl-weight", "0"],
    "+ softmax KL": ["--kd-kl-type", "softmax"],
    "+ Gaussian KL": ["--kd-kl-type", "gaussian"],
    "staged recipe (default)": [],
}


def stage_flags(name, total_steps):
    if name == "staged recipe (default)":  # the method's 1 : 2 : 3 proportions (100K / 200K / 300K)
        warmup, feature = total_steps // 6, total_steps // 3
        return ["--warmup-steps", warmup, "--feature-steps", feature, "--joint-steps", total_steps - warmup - feature]
    return ["--warmup-steps", 0, "--feature-steps", 0, "--joint-steps", total_steps]


def score_variant(args, name, seed):
    """Distill, sample and score one (variant, seed); the scores are cached beside the run for that --num-samples."""
    from evaluate import digits_scores
    from models import load_dit_checkpoint
    from sample import generate, to_uint8_nhwc
    results_dir = os.path.join(args.out, name.replace(" ", "_").replace("+", "plus").replace("(", "").replace(")", ""),
                               f"seed{seed}")
    scores_path = os.path.join(results_dir, "scores.json")
    if os.path.exists(scores_path):
        with open(scores_path) as f:
            scores = json.load(f)
        if scores["n"] == args.num_samples:
            return scores
    if not os.path.exists(final_checkpoint(results_dir, args.steps)):
        run("train.py", "--distillation", "--teacher-model", TEACHER, "--teacher-ckpt", args.teacher_ckpt,
            "--student-model", STUDENT, *stage_flags(name, args.steps), *VARIANTS[name], "--seed", seed,
            "--ckpt-every", args.steps, "--results-dir", results_dir, *TRAINING)
    model, data = load_dit_checkpoint(final_checkpoint(results_dir, args.steps))
    labels = digits_labels(args.num_samples)
    images = generate(model, data, labels, seed=seed, num_sampling_steps=args.sampling_steps, sampler="ddim",
                      cfg_scale=args.cfg_scale, batch_size=500, progress=False)
    scores = digits_scores(to_uint8_nhwc(images), labels, cache_dir=os.path.join(args.out, "digits_scorer"))
    with open(scores_path, "w") as f:
        json.dump(scores, f)
    return scores


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Ablate the distillation recipe on digits over several seeds.")
    parser.add_argument("--teacher-ckpt", required=True, help="digits teacher checkpoint (DiT-Digits-T)")
    parser.add_argument("--out", default="results/ablation", help="output folder (finished runs are reused)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every variant")
    parser.add_argument("--steps", type=int, default=1800, help="student training steps of every variant")
    parser.add_argument("--num-samples", type=int, default=2000, help="samples scored per run")
    parser.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--cfg-scale", type=non_negative_float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="variants to run (default: all)")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.teacher_ckpt):
        parser.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    if args.steps < 6 or args.num_samples < 2:
        parser.error("--steps must be at least 6 and --num-samples at least 2")
    return args


def main(args):
    rows = ["| variant | class accuracy | Frechet distance | seeds |", "|---|---:|---:|---:|"]
    summary = {}
    for name in args.variants:
        runs = [score_variant(args, name, seed) for seed in args.seeds]
        accuracy = np.array([r["accuracy"] for r in runs])
        frechet = np.array([r["frechet"] for r in runs])
        summary[name] = {"accuracy": accuracy.tolist(), "frechet": frechet.tolist()}
        rows.append(f"| {name} | {accuracy.mean():.3f} ± {accuracy.std(ddof=1) if len(runs) > 1 else 0:.3f} | "
                    f"{frechet.mean():.2f} ± {frechet.std(ddof=1) if len(runs) > 1 else 0:.2f} | {len(runs)} |")
    default = "staged recipe (default)"
    if default in summary and len(args.seeds) > 1:  # paired by seed: same data order, noise and initialisation
        rows += ["", f"| {default} minus variant, same seed | accuracy | default higher | Frechet distance | "
                     "default lower |", "|---|---:|---:|---:|---:|"]
        for name in [n for n in summary if n != default]:
            accuracy, frechet = (np.array(summary[default][k]) - np.array(summary[name][k])
                                 for k in ("accuracy", "frechet"))
            rows.append(f"| {name} | {accuracy.mean():+.4f} ± {accuracy.std(ddof=1):.4f} | "
                        f"{(accuracy > 0).sum()}/{len(accuracy)} | "
                        f"{frechet.mean():+.2f} ± {frechet.std(ddof=1):.2f} | {(frechet < 0).sum()}/{len(frechet)} |")
    table = "\n".join(rows)
    with open(os.path.join(args.out, "ablation.md"), "w") as f:
        f.write(f"Student {STUDENT}, teacher {args.teacher_ckpt}, {args.steps} steps, {args.num_samples} samples, "
                f"DDIM {args.sampling_steps}, cfg {args.cfg_scale}; mean ± std over seeds {args.seeds}.\n\n{table}\n")
    with open(os.path.join(args.out, "ablation.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(table)


if __name__ == "__main__":
    run_script(main, parse_args)
