"""Few-step students on digits, side by side with the teacher they came from.

    python fewstep.py --teacher-ckpt results/digits/teacher/checkpoints/0002000.pt --out results/fewstep

Trains (with train.py --step-distillation; finished runs are reused) a progressive student of the teacher (rounds
64 -> 32 -> ... -> 1, a checkpoint at the end of every round, so each round's student is a row), a consistency
student, a guidance-distilled student, the one-step methods (DMD2 with and without its GAN term and at each
real-score guidance scale of --dmd2-real-guidance, DMD2 warm-started from the consistency student, adversarial
distillation from the teacher and LADD from the consistency student at 1 step), then samples every row for the same
labels and initial noise, scores it with evaluate.py's digits scorer (class accuracy, Frechet distance, precision,
recall), and times it against the teacher's DDIM 50 in the same run. Rows:
- the teacher at DDIM 50 (the reference) and at 1 / 2 / 4 / 8 DDIM steps on the trailing grid (training-free);
- the progressive and the consistency students at 1 / 2 / 4 / 8 steps; DMD2 and adversarial at 1 / 2 / 4, the
  warm-started LADD student (OUT/adversarial_warm) at 1;
- guidance: the teacher with classifier-free guidance (two forwards per step) against the guidance-distilled
  student (one forward, w as its input) at the same scales and steps;
- tcd (OUT/tcd, OUT/tcd_clean{P}): a TCD student for each --tcd-clean-fractions at 1 / 2 / 4 / 8 steps at each
  --tcd-gammas;
- reflow (OUT/reflow): reflow_pairs.py writes --reflow-pairs teacher ODE pairs (OUT/pairs/teacher), the reflow
  student trains on them and samples with Euler at 1 / 2 / 4 / 8 steps, beside the teacher's own ODE as a velocity
  model at the same Euler steps; instaflow (OUT/instaflow): pairs of the reflowed model's Euler
  (OUT/pairs/reflow), distilled to one step; the straightness of the teacher's ODE and of the reflowed model, and
  the pairs' cost;
and the cost of a training step of consistency, DMD2 and adversarial distillation, measured side by side
(experiments.training_costs). --methods picks the families to train and score. Writes fewstep.md and fewstep.json
into --out.
"""
import argparse
import json
import os

import numpy as np

from checks import non_negative_float, positive_float, positive_int, probability, run_script, write_atomically
from experiments import digits_labels, evaluate_rows, final_checkpoint, run, training_costs

STEP_COUNTS = (1, 2, 4, 8)
REFERENCE_STEPS = 50
METHOD_FAMILIES = ("progressive", "consistency", "guidance", "dmd2", "adversarial", "tcd", "reflow", "instaflow")


def common_flags(args):
    return ["--teacher-ckpt", args.teacher_ckpt, "--seed", args.seed, "--global-batch-size", 128, "--log-every", 100]


def train_students(args):
    """Progressive, consistency and guidance students of the teacher (train.py resumes or skips finished runs)."""
    start = 64
    rounds = int(np.log2(start))  # 64 -> 1
    common = common_flags(args) + ["--lr", args.lr]
    runs = {name: os.path.join(args.out, name) for name in ("progressive", "consistency", "guidance")}
    progressive_steps = args.steps // rounds * rounds
    if "progressive" in args.methods and not os.path.exists(final_checkpoint(runs["progressive"], progressive_steps)):
        run("train.py", "--step-distillation", "progressive", "--progressive-start-steps", start, "--sampling-steps", 1,
            "--max-steps", progressive_steps, "--ckpt-every", progressive_steps // rounds,
            "--ema-decay", args.progressive_ema_decay, "--results-dir", runs["progressive"], *common)
    if "consistency" in args.methods and not os.path.exists(final_checkpoint(runs["consistency"], args.steps)):
        run("train.py", *consistency_flags(args), "--ckpt-every", args.steps, "--results-dir", runs["consistency"],
            *common)
    if "guidance" in args.methods and not os.path.exists(final_checkpoint(runs["guidance"], args.guidance_steps)):
        run("train.py", "--step-distillation", "guidance", "--guidance-range", *args.guidance_range,
            "--max-steps", args.guidance_steps, "--ckpt-every", args.guidance_steps, "--ema-decay", args.ema_decay,
            "--results-dir", runs["guidance"], *common)
    # the progressive student of each step count: the checkpoint at the end of its round
    progressive = {start >> (r + 1): final_checkpoint(runs["progressive"], (r + 1) * progressive_steps // rounds)
                   for r in range(rounds)}
    return progressive, final_checkpoint(runs["consistency"], args.steps), \
        final_checkpoint(runs["guidance"], args.guidance_steps), progressive_steps


def consistency_flags(args):
    return ["--step-distillation", "consistency", "--sampling-steps", 4, "--max-steps", args.steps,
            "--ema-decay", args.ema_decay]


def dmd2_flags(args, gan=True, real_guidance=1.0, steps=None):
    return ["--step-distillation", "dmd2", "--sampling-steps", 4, "--max-steps", steps or args.dmd2_steps,
            "--lr", args.dmd2_lr, "--dmd2-fake-lr", args.dmd2_fake_lr, "--ema-decay", args.ema_decay,
            "--dmd2-gan-generator-weight", args.dmd2_gan_weight if gan else 0,
            "--dmd2-gan-discriminator-weight", 1e-2 if gan else 0, "--dmd2-gan-max-t", args.dmd2_gan_max_t,
            "--dmd2-real-guidance", real_guidance]


def consistency_checkpoint(args):
    """The consistency student's final checkpoint: the warm start of the DMD2 and LADD runs."""
    return final_checkpoint(os.path.join(args.out, "consistency"), args.steps)


def dmd2_warm_flags(args):
    """DMD2 started from the consistency student (--generator-init) on the 4-point grid, without the GAN term: the
    generator already samples, so the fake score starts near it and the distribution matching refines it."""
    return ["--step-distillation", "dmd2", "--sampling-steps", 4, "--max-steps", args.dmd2_warm_steps,
            "--generator-init", consistency_checkpoint(args),
            "--lr", args.dmd2_warm_lr, "--dmd2-fake-lr", args.dmd2_warm_fake_lr, "--ema-decay", args.ema_decay,
            "--dmd2-gan-generator-weight", 0, "--dmd2-gan-discriminator-weight", 0]


def adversarial_flags(args):
    return ["--step-distillation", "adversarial", "--sampling-steps", 4, "--max-steps", args.adversarial_steps,
            "--lr", args.adversarial_lr, "--ema-decay", args.ema_decay, "--adversarial-max-t", args.dmd2_gan_max_t]


def adversarial_warm_flags(args):
    """LADD (no distillation term, softplus losses) started from the consistency student on the 1-step grid, the
    discriminator's noise below t = 250 (above it the teacher's features cannot tell the two apart, README) and the
    student and discriminator heads at one small learning rate; EMA 0.99, since the run is short."""
    return ["--step-distillation", "adversarial", "--sampling-steps", 1, "--max-steps", args.adversarial_warm_steps,
            "--generator-init", consistency_checkpoint(args),
            "--adversarial-distill-weight", 0, "--adversarial-loss", "softplus", "--adversarial-max-t", 250,
            "--lr", args.adversarial_warm_lr, "--adversarial-disc-lr", args.adversarial_warm_lr, "--ema-decay", 0.99]


def one_step_runs(args):
    """{row label: (checkpoint, training steps)} of the one-step methods: DMD2, its ablations at
    --dmd2-ablation-steps iterations (without its GAN term, as the paper's ablation, and at each further real-score
    guidance scale, beside the main run's checkpoint at the same budget) and adversarial distillation; trains what
    is not there yet."""
    runs, ablation = {}, args.dmd2_ablation_steps
    if "dmd2" in args.methods:
        # the main run keeps a checkpoint every --dmd2-ablation-steps: its row at that budget is the ablation's reference
        runs["dmd2 student"] = (dmd2_flags(args), "dmd2", args.dmd2_steps, ablation)
        runs[f"dmd2 student at {ablation} iterations"] = (dmd2_flags(args), "dmd2", ablation, ablation)
        runs[f"dmd2 without GAN at {ablation} iterations"] = (dmd2_flags(args, gan=False, steps=ablation),
                                                              "dmd2_nogan", ablation, ablation)
        for w in args.dmd2_real_guidance:
            if w != 1:
                runs[f"dmd2 real-score w={w:g} at {ablation} iterations"] = (
                    dmd2_flags(args, real_guidance=w, steps=ablation), f"dmd2_w{w:g}", ablation, ablation)
    if "dmd2" in args.methods and args.dmd2_warm_steps:
        runs["dmd2 student from the consistency student (no GAN)"] = (
            dmd2_warm_flags(args), "dmd2_warm", args.dmd2_warm_steps, min(500, args.dmd2_warm_steps))
    if "adversarial" in args.methods:
        runs["adversarial student"] = (adversarial_flags(args), "adversarial", args.adversarial_steps,
                                       args.adversarial_steps)
    if "adversarial" in args.methods and args.adversarial_warm_steps:
        runs["adversarial (LADD) student from the consistency student"] = (
            adversarial_warm_flags(args), "adversarial_warm", args.adversarial_warm_steps, args.adversarial_warm_steps)
    for flags, folder, steps, every in runs.values():
        results_dir = os.path.join(args.out, folder)
        if not os.path.exists(final_checkpoint(results_dir, steps)):
            run("train.py", *flags, *common_flags(args), "--ckpt-every", every, "--results-dir", results_dir)
    return {label: (final_checkpoint(os.path.join(args.out, folder), steps), steps)
            for label, (_, folder, steps, _) in runs.items()}


def tcd_label(fraction):
    return "tcd student" if fraction == 0 else f"tcd student, clean share {fraction:g}"


def tcd_runs(args):
    """{--tcd-clean-fractions P: checkpoint} of the TCD students (OUT/tcd for the paper's P = 0, OUT/tcd_clean{P}
    otherwise): consistency's flags and grid, trained --tcd-steps steps."""
    runs = {}
    for fraction in args.tcd_clean_fractions:
        results_dir = os.path.join(args.out, "tcd" if fraction == 0 else f"tcd_clean{fraction:g}")
        if not os.path.exists(final_checkpoint(results_dir, args.tcd_steps)):
            run("train.py", "--step-distillation", "tcd", "--sampling-steps", 4, "--max-steps", args.tcd_steps,
                "--ema-decay", args.ema_decay, "--ckpt-every", args.tcd_steps, "--results-dir", results_dir,
                "--tcd-clean-fraction", fraction, *common_flags(args), "--lr", args.lr)
        runs[fraction] = final_checkpoint(results_dir, args.tcd_steps)
    return runs


def rectified_flow_runs(args):
    """Reflow (OUT/reflow) on the teacher's ODE pairs (OUT/pairs/teacher), then InstaFlow (OUT/instaflow) on the
    reflowed model's own pairs (OUT/pairs/reflow, its Euler at --instaflow-pair-steps); reflow_pairs.py skips
    finished chunks. Returns {family: (checkpoint, training steps, pair folder)}."""
    runs, teacher = {}, args.teacher_ckpt
    families = [("reflow", args.reflow_steps, args.reflow_pairs, ["--sampler", args.reflow_pair_sampler,
                                                                  "--num-sampling-steps", args.reflow_pair_steps])]
    if "instaflow" in args.methods:
        families.append(("instaflow", args.instaflow_steps, args.instaflow_pairs,
                         ["--num-sampling-steps", args.instaflow_pair_steps]))
    for family, steps, num_pairs, sampler_flags in families:
        pairs = os.path.join(args.out, "pairs", "teacher" if family == "reflow" else "reflow")
        run("reflow_pairs.py", "--ckpt", teacher, "--out", pairs, "--num-pairs", num_pairs, "--chunk-size", 500,
            "--seed", args.seed, *sampler_flags)
        results_dir = os.path.join(args.out, family)
        if not os.path.exists(final_checkpoint(results_dir, steps)):
            extra = ["--sampling-steps", 4] if family == "reflow" else []
            ema_decay = args.ema_decay if family == "reflow" else args.instaflow_ema_decay
            run("train.py", "--step-distillation", family, "--reflow-pairs", pairs, "--max-steps", steps,
                "--ema-decay", ema_decay, "--ckpt-every", steps, "--results-dir", results_dir, *extra,
                *common_flags(args)[2:], "--teacher-ckpt", teacher,
                "--lr", args.reflow_lr if family == "reflow" else args.lr)
        runs[family] = (final_checkpoint(results_dir, steps), steps, pairs)
        teacher = runs[family][0]  # InstaFlow distils the reflowed model
    return runs


def rectified_flow_tables(args, teacher, runs):
    """Straightness (Liu et al. 2022, Def. 2.2) of the teacher's ODE (the teacher as a velocity model) and of the
    reflowed model, on the rows' labels and initial noise; and what the pairs cost."""
    import torch
    from models import load_dit_checkpoint
    from rectified_flow import pair_cost, straightness
    from sampling import SamplingSpec
    labels = torch.tensor(digits_labels(args.num_samples))
    noise = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(args.seed))
    models = {"teacher (its ODE as a velocity model)": (teacher, "eps")}
    if "reflow" in runs:
        model, data = load_dit_checkpoint(runs["reflow"][0])
        models[f"reflow student ({runs['reflow'][1]} steps)"] = (model, SamplingSpec.from_checkpoint_entry(
            data["sampling"]).parametrisation)
    report = {name: straightness(model, parametrisation, noise, labels, args.straightness_steps, clip=True)
              for name, (model, parametrisation) in models.items()}
    lines = ["| model | straightness (mean squared deviation of v from x - z, per value) |", "|---|---:|"]
    lines += [f"| {name} | {value:.4f} |" for name, value in report.items()]
    cost_lines = ["| pairs | made by | count | forwards per pair | ms per pair (one CPU process) |",
                  "|---|---|---:|---:|---:|"]
    costs = {}
    for family, (_, _, pairs) in runs.items():
        cost = costs[family] = pair_cost(pairs)
        made_by = (f"teacher, {args.reflow_pair_sampler} {args.reflow_pair_steps} steps" if family == "reflow" else
                   f"reflow student, flow-euler {args.instaflow_pair_steps} steps")
        cost_lines.append(f"| {family} | {made_by} | {cost['pairs']} | {cost['forwards_per_pair']} | "
                          f"{1000 * cost['seconds_per_pair']:.1f} |")
    return "\n".join(lines), "\n".join(cost_lines), {"straightness": report, "pairs": costs}


def cost_table(args, teacher_data):
    """Time, forwards and memory of one training step of consistency, DMD2 and adversarial, side by side."""
    data = dict(teacher_data, in_channels=1, input_size=teacher_data["image_size"], num_classes=10)
    methods = {"consistency": consistency_flags(args), "dmd2": dmd2_flags(args),
               "adversarial": adversarial_flags(args)}
    costs = training_costs({name: flags + common_flags(args)[:2] for name, flags in methods.items()}, data)
    lines = ["| method | networks trained / frozen | forwards per example and iteration | memory beside the "
             "student, its EMA and AdamW | time per iteration vs consistency |", "|---|---|---|---:|---:|"]
    for name, cost in costs.items():
        forwards = ", ".join(f"{n} {c:g}" for n, c in cost["forwards"].items())
        lines.append(f"| {name} | {', '.join(cost['networks']['trainable'])} / {', '.join(cost['networks']['frozen'])}"
                     f" | {forwards} | {cost['extra_mib']:.1f} MiB | "
                     f"{cost['seconds'] / costs['consistency']['seconds']:.2f} |")
    return "\n".join(lines), costs


def score_rows(args, rows):
    """experiments.evaluate_rows for this script's flags: --num-samples scored, 3 timing rounds of --timing-samples,
    the scorer cached in --out/scorer."""
    return evaluate_rows(rows, digits_labels(args.num_samples), args.seed, args.timing_samples,
                         os.path.join(args.out, "scorer"), timing_rounds=3)


def table(results, reference, training):
    lines = ["| sampler | steps | forwards / image | sampling time vs teacher DDIM 50 | class accuracy | "
             "Frechet distance | vs DDIM 50 | precision | recall | training steps |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, result in results.items():
        sampler, steps = name.rsplit(" ", 1)
        lines.append(f"| {sampler} | {steps} | {result['forwards']} | "
                     f"{result['seconds_per_image'] / results[reference]['seconds_per_image']:.3f} | "
                     f"{result['accuracy']:.3f} | {result['frechet']:.2f} | "
                     f"{result['frechet'] / results[reference]['frechet']:.2f}x | {result['precision']:.3f} | "
                     f"{result['recall']:.3f} | {training.get(name, '-')} |")
    return "\n".join(lines)


def main(args):
    from models import load_dit_checkpoint
    os.makedirs(args.out, exist_ok=True)
    progressive, consistency_ckpt, guidance_ckpt, progressive_steps = train_students(args)
    one_step = one_step_runs(args)
    teacher, teacher_data = load_dit_checkpoint(args.teacher_ckpt)
    reference = f"teacher DDIM {REFERENCE_STEPS}"
    unguided = dict(cfg_scale=1.0)
    rows = {reference: (teacher, teacher_data, dict(sampler="ddim", num_sampling_steps=REFERENCE_STEPS, **unguided))}
    for steps in STEP_COUNTS:
        rows[f"teacher DDIM (trailing) {steps}"] = (teacher, teacher_data,
                                                    dict(sampler="ddim-trailing", num_sampling_steps=steps, **unguided))
    students = {}  # row label -> (checkpoint, step counts (None: its grid's), training steps)
    if "progressive" in args.methods:
        round_length = progressive_steps // 6  # the N-step progressive student has trained every round down to N
        for steps in STEP_COUNTS:
            students[f"progressive student {steps}"] = (progressive[steps], (steps,),
                                                        f"{round_length * (7 - steps.bit_length())} "
                                                        f"({7 - steps.bit_length()} rounds)")
    if "consistency" in args.methods:
        students["consistency student"] = (consistency_ckpt, STEP_COUNTS, str(args.steps))
    for label, (ckpt, steps) in one_step.items():  # None: the step counts of its own grid (1, 2, 4 or 1)
        students[label] = (ckpt, None, str(steps))
    training = {}
    for fraction, ckpt in (tcd_runs(args) if "tcd" in args.methods else {}).items():
        tcd_model, tcd_data = load_dit_checkpoint(ckpt)
        for gamma in args.tcd_gammas:
            for steps in STEP_COUNTS:
                name = f"{tcd_label(fraction)} gamma={gamma:g} {steps}"
                rows[name] = (tcd_model, tcd_data, dict(sampler=None, num_sampling_steps=steps, gamma=gamma,
                                                        **unguided))
                training[name] = str(args.tcd_steps)
    flow_runs = rectified_flow_runs(args) if {"reflow", "instaflow"} & set(args.methods) else {}
    if flow_runs:
        for steps in STEP_COUNTS:
            rows[f"teacher flow-euler (its ODE as a velocity model) {steps}"] = (
                teacher, teacher_data, dict(sampler="flow-euler", num_sampling_steps=steps, **unguided))
        students["reflow student (Euler)"] = (flow_runs["reflow"][0], STEP_COUNTS, str(flow_runs["reflow"][1]))
    if "instaflow" in flow_runs:
        students["instaflow student"] = (flow_runs["instaflow"][0], (1,), str(flow_runs["instaflow"][1]))
    for label, (ckpt, step_counts, trained) in students.items():
        model, data = load_dit_checkpoint(ckpt)
        for steps in step_counts or data["sampling"]["steps"]:
            name = label if label.startswith("progressive") else f"{label} {steps}"
            rows[name] = (model, data, dict(sampler=None, num_sampling_steps=steps, **unguided))
            training[name] = trained
    results = score_rows(args, rows)
    text = (f"Teacher {args.teacher_ckpt}; {args.num_samples} samples per row (classes 0-9 in turn, the same initial "
            f"noise for every row, seed {args.seed}), scored by evaluate.py's digits scorer; sampling time per image "
            f"relative to the teacher's DDIM {REFERENCE_STEPS}, median of 3 interleaved rounds on a batch of "
            f"{args.timing_samples}. Few-step rows are unguided.\n\n{table(results, reference, training)}\n")
    report = {"rows": results}
    if flow_runs:
        straight_lines, cost_lines, report["rectified_flow"] = rectified_flow_tables(args, teacher, flow_runs)
        text += (f"\nStraightness along each model's own ODE (Euler, {args.straightness_steps} steps, the rows' "
                 f"{args.num_samples} initial noises; 0 is straight):\n\n{straight_lines}\n\nThe ODE pairs "
                 f"(reflow_pairs.py):\n\n{cost_lines}\n")
    if "guidance" in args.methods:
        guided_lines, report["guidance"] = guidance_table(args, teacher, teacher_data, guidance_ckpt)
        text += (f"\nGuidance (DDIM {REFERENCE_STEPS}; the guidance-distilled student trained {args.guidance_steps} "
                 f"steps on w in {args.guidance_range}):\n\n{guided_lines}\n")
    if {"consistency", "dmd2", "adversarial"} <= set(args.methods):
        costs, report["costs"] = cost_table(args, teacher_data)
        text += (f"\nOne training iteration (batch 128, train.py's own step, one CPU process; averaged over 5 "
                 f"iterations, so DMD2's 5:1 schedule counts whole):\n\n{costs}\n")
    write_atomically(os.path.join(args.out, "fewstep.md"), lambda path: open(path, "w").write(text))
    write_atomically(os.path.join(args.out, "fewstep.json"), lambda path: json.dump(report, open(path, "w"),
                                                                                    indent=2))
    print(text)


def guidance_table(args, teacher, teacher_data, guidance_ckpt):
    """The teacher's two-forward guidance against the guidance-distilled student's one forward, at each w."""
    from models import load_dit_checkpoint
    guided_rows = {}
    guidance, guidance_data = load_dit_checkpoint(guidance_ckpt)
    for w in args.guidance_scales:
        for label, model, data in (("teacher, two forwards", teacher, teacher_data),
                                   ("guidance-distilled student, one forward", guidance, guidance_data)):
            guided_rows[f"{label}, w={w} {REFERENCE_STEPS}"] = (
                model, data, dict(sampler="ddim", num_sampling_steps=REFERENCE_STEPS, cfg_scale=w))
    guided = score_rows(args, guided_rows)
    lines = ["| model | w | forwards / image | sampling time vs teacher at the same w | class accuracy | "
             "Frechet distance |", "|---|---:|---:|---:|---:|---:|"]
    for w in args.guidance_scales:
        teacher_row = guided[f"teacher, two forwards, w={w} {REFERENCE_STEPS}"]
        for label in ("teacher, two forwards", "guidance-distilled student, one forward"):
            row = guided[f"{label}, w={w} {REFERENCE_STEPS}"]
            lines.append(f"| {label} | {w} | {row['forwards']} | "
                         f"{row['seconds_per_image'] / teacher_row['seconds_per_image']:.2f} | "
                         f"{row['accuracy']:.3f} | {row['frechet']:.2f} |")
    return "\n".join(lines), guided


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Few-step students (progressive, consistency, DMD2, adversarial) and "
                                                 "guidance distillation of a digits teacher, scored side by side.")
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
    parser.add_argument("--methods", nargs="+", choices=METHOD_FAMILIES, default=list(METHOD_FAMILIES),
                        help="method families to train and score (default: all)")
    one = parser.add_argument_group("one-step methods")
    one.add_argument("--dmd2-steps", type=positive_int, default=1000,
                     help="DMD2 iterations (the generator updates at every 5th; half the teacher's 2,000 steps, "
                          "for the CPU time an iteration costs, README)")
    one.add_argument("--dmd2-lr", type=positive_float, default=5e-4, help="the DMD2 generator's learning rate")
    one.add_argument("--dmd2-fake-lr", type=positive_float, default=1e-3,
                     help="the learning rate of DMD2's fake score and GAN head")
    one.add_argument("--dmd2-gan-weight", type=non_negative_float, default=0.5,
                     help="DMD2's generator GAN weight (its 3e-3 is scaled for ImageNet-64's 12,288 values per image; "
                          "a digit has 64)")
    one.add_argument("--dmd2-gan-max-t", type=positive_int, default=1000,
                     help="the discriminators see inputs noised at t < N (DMD2 and adversarial)")
    one.add_argument("--dmd2-real-guidance", type=positive_float, nargs="+", default=[1.0, 1.5],
                     help="real-score guidance scales swept (1: none, the main row)")
    one.add_argument("--dmd2-ablation-steps", type=positive_int, default=500,
                     help="iterations of the ablation runs (no GAN, real-score guidance), compared with the main "
                          "run's checkpoint at the same count")
    one.add_argument("--dmd2-warm-steps", type=int, default=1500,
                     help="iterations of DMD2 warm-started from the consistency student (no GAN; 0: skip it; needs "
                          "the consistency family)")
    one.add_argument("--dmd2-warm-lr", type=positive_float, default=1e-4, help="its generator's learning rate")
    one.add_argument("--dmd2-warm-fake-lr", type=positive_float, default=5e-4, help="its fake score's")
    one.add_argument("--adversarial-steps", type=positive_int, default=1000,
                     help="adversarial distillation steps (each updates the student: 5x DMD2's 1,000 iterations' "
                          "200 generator updates)")
    one.add_argument("--adversarial-lr", type=positive_float, default=2e-4, help="its learning rate")
    one.add_argument("--adversarial-warm-steps", type=int, default=200,
                     help="steps of LADD warm-started from the consistency student at 1 step (0: skip it; needs "
                          "consistency in --methods). Short on purpose: README measures it getting worse after 200")
    one.add_argument("--adversarial-warm-lr", type=positive_float, default=1e-5,
                     help="its student's and discriminator's learning rate")
    flow = parser.add_argument_group("tcd and rectified flow")
    flow.add_argument("--tcd-steps", type=positive_int, default=1000, help="TCD training steps")
    flow.add_argument("--tcd-gammas", type=probability, nargs="+", default=[0.0, 0.1, 0.2, 0.3, 0.5],
                      help="TCD sampling stochasticities scored (0.3: its default)")
    flow.add_argument("--tcd-clean-fractions", type=probability, nargs="+", default=[0.0],
                      help="a TCD student for each share of jump targets at the clean end (train.py "
                           "--tcd-clean-fraction; 0: the paper's uniform s)")
    flow.add_argument("--reflow-pairs", type=positive_int, default=5000, help="teacher ODE pairs of reflow")
    flow.add_argument("--reflow-pair-sampler", default="dpm++2m", help="the teacher's ODE solver for them")
    flow.add_argument("--reflow-pair-steps", type=positive_int, default=20,
                      help="its steps (dpm++2m 20 reaches DDIM 50 on digits: README's samplers table)")
    flow.add_argument("--reflow-steps", type=positive_int, default=1000, help="reflow training steps")
    flow.add_argument("--reflow-lr", type=positive_float, default=2e-4,
                      help="reflow's learning rate (README: 1e-3, the other students', scores worse at every Euler "
                           "step count, most at 1 step)")
    flow.add_argument("--instaflow-pairs", type=positive_int, default=5000, help="pairs of the reflowed model")
    flow.add_argument("--instaflow-pair-steps", type=positive_int, default=16,
                      help="Euler steps of the reflowed model for them (its targets: README measures 8 and 16)")
    flow.add_argument("--instaflow-steps", type=positive_int, default=2000, help="InstaFlow training steps")
    flow.add_argument("--instaflow-ema-decay", type=probability, default=0.98,
                      help="EMA decay of the InstaFlow student: its x~ channels start at zero (x = 0 at s = 0), so "
                           "an EMA of time constant 200 steps (0.995) still holds that start after a short run "
                           "(measured: Frechet 558 with it, 22 without it at 300 steps)")
    flow.add_argument("--straightness-steps", type=positive_int, default=100, help="Euler steps of the straightness")
    parser.add_argument("--num-samples", type=int, default=500, help="samples scored per row")
    parser.add_argument("--timing-samples", type=int, default=100, help="batch timed for the sampling-time ratio")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.teacher_ckpt):
        parser.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
    if args.steps < 6 or args.guidance_steps < 1 or args.num_samples < 2 or args.timing_samples < 1:
        parser.error("--steps must be at least 6 (6 rounds), --guidance-steps and --timing-samples 1, "
                     "--num-samples 2")
    for family, label, steps in (("dmd2", "DMD2", args.dmd2_warm_steps),
                                 ("adversarial", "adversarial", args.adversarial_warm_steps)):
        flag = f"--{family}-warm-steps"
        if family in args.methods and steps < 0:
            parser.error(f"{flag} {steps}: give 0 (skip) or a positive count")
        if family in args.methods and steps and "consistency" not in args.methods:
            parser.error(f"the warm-started {label} run starts from the consistency student: add consistency to "
                         f"--methods or pass {flag} 0")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
