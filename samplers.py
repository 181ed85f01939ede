"""Sampler x steps on digits: the project's DDIM against diffusers' DPM-Solver++ 2M and UniPC at a few forwards,
for each checkpoint given, with DDIM 50 as the reference.

    python samplers.py --ckpt results/digits/teacher/checkpoints/0002000.pt \
        --ckpt results/digits/student/checkpoints/0001800.pt --out results/samplers

Every row samples the same labels (classes 0-9 in turn) from the same initial noise (--seed), unguided, and is
scored by evaluate.py's digits scorer; sampling time is per image relative to the first checkpoint's DDIM 50, one
round that times the rows in turn (forwards are the cost: a solver step is one forward, as DDIM's). Writes
samplers.md and samplers.json into --out; run_digits.py runs it and puts the table in its report.
"""
import argparse
import json
import os
from pathlib import Path

from checks import UserError, non_negative_int, number_in, positive_int, run_script, write_atomically
from experiments import digits_labels, evaluate_rows

SAMPLERS = ("ddim", "dpm++2m", "unipc")
STEP_COUNTS = (5, 10, 20)
REFERENCE = ("ddim", 50)


def sampler_rows(models):
    """{name: (model, data, generate settings)} for every model x (DDIM 50, then SAMPLERS x STEP_COUNTS)."""
    rows = {}
    for model_name, (model, data) in models.items():
        for sampler, steps in [REFERENCE] + [(s, n) for n in STEP_COUNTS for s in SAMPLERS]:
            rows[f"{model_name} {sampler} {steps}"] = (model, data, dict(sampler=sampler, num_sampling_steps=steps,
                                                                         cfg_scale=1.0))
    return rows


def table(results, models):
    """Markdown: one row per sampler and step count, each model's accuracy and Frechet distance side by side."""
    first = next(iter(models))
    reference = results[f"{first} {REFERENCE[0]} {REFERENCE[1]}"]["seconds_per_image"]
    header = "| sampler | steps (forwards) | " + " | ".join(
        f"{name}: accuracy | {name}: Frechet | {name}: time vs {first} DDIM {REFERENCE[1]}" for name in models) + " |"
    lines = [header, "|---|---:|" + "---:|---:|---:|" * len(models)]
    for sampler, steps in [REFERENCE] + [(s, n) for n in STEP_COUNTS for s in SAMPLERS]:
        cells = []
        for name in models:
            row = results[f"{name} {sampler} {steps}"]
            cells += [f"{row['accuracy']:.3f}", f"{row['frechet']:.2f}", f"{row['seconds_per_image'] / reference:.3f}"]
        lines.append(f"| {sampler} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sampler_table(args, models):
    """Score every row; write samplers.md, then samplers.json (the sign of a finished table) into args.out; returns
    (markdown table, results)."""
    results = evaluate_rows(sampler_rows(models), digits_labels(args.num_samples), args.seed, args.timing_samples,
                            args.cache_dir or os.path.join(args.out, "scorer"), timing_rounds=1)
    text = table(results, models)
    write_atomically(os.path.join(args.out, "samplers.md"), lambda temporary: Path(temporary).write_text(text + "\n"))
    write_atomically(os.path.join(args.out, "samplers.json"),
                     lambda temporary: Path(temporary).write_text(json.dumps(results, indent=2)))
    return text, results


def main(args):
    from models import load_dit_checkpoint
    models = {}
    for path in args.ckpt:
        model, data = load_dit_checkpoint(path)
        if data["sampling"]["sampler"] is not None:
            raise UserError(f"{path} is a {data['sampling']['method']}-distilled student, which samples with its "
                            f"own sampler only - give noise-predicting checkpoints")
        name = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path)))) or path
        models[name if name not in models else path] = (model, data)
    text, _ = sampler_table(args, models)
    print(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Sampler x steps table (DDIM, DPM-Solver++ 2M, UniPC) for digits "
                                                 "checkpoints, scored side by side.")
    parser.add_argument("--ckpt", action="append", required=True,
                        help="a noise-predicting digits checkpoint (repeat for several; named by its run folder)")
    parser.add_argument("--out", default="results/samplers",
                        help="output folder (the scorer is cached in it unless --cache-dir)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder of the cached digits scorer, trained there if absent (default OUT/scorer)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial noise")
    parser.add_argument("--num-samples", type=number_in(int, 2), default=500, help="samples scored per row")
    parser.add_argument("--timing-samples", type=positive_int, default=100,
                        help="batch timed for the sampling-time ratio")
    args = parser.parse_args(argv)
    missing = [path for path in args.ckpt if not os.path.isfile(path)]
    if missing:
        parser.error(f"--ckpt {missing[0]} does not exist")
    return args


if __name__ == "__main__":
    run_script(main, parse_args)
