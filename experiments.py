"""What the digits experiments share (run_digits.py, fewstep.py, samplers.py, ablation.py; bench.py's timing loop).

- run: one of the project's scripts as a user would run it; final_checkpoint: where a run's last checkpoint lies.
- The digits models and training flags of the main job, which ablation.py repeats.
- Rows {name: (model, data, settings for sample.generate)}: every row sampled for the same labels from the same
  initial noise, scored by evaluate.py's digits scorer, and timed side by side (evaluate_rows, time_sampling).
- time_side_by_side: the one interleaved timing loop. Rows are timed in turn, round after round, so load from other
  jobs hits them alike and their ratios come from one run.
- training_costs: time, forwards and memory of train.py's own step for several methods, side by side.
- time_exports: CPU latency of exported files relative to their fp32 file, through export.py's fresh-process runner.
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from functools import partial

import torch

from checks import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
TEACHER, STUDENT = "DiT-Digits-T", "DiT-Digits-S"
TRAINING = ["--global-batch-size", "128", "--lr", "2e-3", "--ema-decay", "0.995", "--log-every", "100"]


#################################################################################
#                        Runs of the project's scripts                          #
#################################################################################

def run(script, *arguments):
    """Run one of the project's scripts as a user would; its progress bars show through. SIGTERM / SIGINT sent to
    this process go to the script too, and this process then exits with 128 + the signal's number; a script that
    fails stops the job (its own error line is above)."""
    command = [sys.executable, os.path.join(ROOT, script), *map(str, arguments)]
    print("$ " + " ".join(command[1:]), flush=True)
    child = subprocess.Popen(command)
    received = []

    def forward(signum, frame):  # no wait() in here: the interrupted child.wait() below holds its lock
        received.append(signum)
        child.send_signal(signum)
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = child.wait()  # until the child has ended, stopped by a forwarded signal or not
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        sys.exit(128 + received[0])
    if returncode:
        raise UserError(f"{script} failed (exit status {returncode}) - see its message above; rerunning the same "
                        f"command reuses the finished steps")


def final_checkpoint(results_dir, steps):
    """train.py's checkpoint after `steps` steps in results_dir."""
    return os.path.join(results_dir, "checkpoints", f"{steps:07d}.pt")


#################################################################################
#                          The interleaved timing loop                          #
#################################################################################

def synchronize(device):
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def time_side_by_side(functions, device=None, warmup=0, repeats=3):
    """{name: (median seconds, spread = (max - min) / median, warm-up seconds)} of the functions {name: fn}.

    Warm-up calls first (compilation, kernel selection); then `repeats` rounds that call each function once in turn.
    device: a CUDA device is synchronised around every call; None where the functions return results on the CPU.
    """
    warmup_seconds = {}
    for name, fn in functions.items():
        start = time.perf_counter()
        for _ in range(warmup):
            fn()
        synchronize(device)
        warmup_seconds[name] = time.perf_counter() - start
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t), (max(t) - min(t)) / statistics.median(t), warmup_seconds[name])
            for name, t in times.items()}


#################################################################################
#                       Rows: sample -> score -> time                           #
#################################################################################

def digits_labels(num_samples):
    """The labels every row samples: the ten classes in turn."""
    return [i % 10 for i in range(num_samples)]


def forwards_per_image(model, data, settings):
    """Model evaluations of one image under generate settings (a few-step student's own steps where not given)."""
    from sampling import forwards_per_step
    steps = settings["num_sampling_steps"] or data["sampling"]["default_steps"]
    return steps * forwards_per_step(model, settings["cfg_scale"])


def time_sampling(rows, labels, seed, timing_samples, rounds=3):
    """{name: seconds per image} of the rows {name: (model, data, settings)}: generate on the first timing_samples
    labels in one batch, the rows timed in turn for `rounds` rounds (time_side_by_side), the median kept."""
    from sample import generate
    functions = {name: partial(generate, model, data, labels[:timing_samples], seed=seed, batch_size=timing_samples,
                               progress=False, **settings) for name, (model, data, settings) in rows.items()}
    # generate returns its images on the CPU, so every call has finished on the device when it returns
    return {name: seconds / timing_samples
            for name, (seconds, _, _) in time_side_by_side(functions, repeats=rounds).items()}


def evaluate_rows(rows, labels, seed, timing_samples, cache_dir, timing_rounds=3):
    """rows: {name: (model, data, settings for generate)} -> {name: digits scores, forwards, seconds per image}.

    Every row samples `labels` from `seed`'s initial noise and is scored by evaluate.py's digits scorer (cached in
    cache_dir); then the rows are timed side by side (time_sampling).
    """
    from evaluate import digits_scores
    from sample import generate, to_uint8_nhwc
    results = {}
    for name, (model, data, settings) in rows.items():
        images = generate(model, data, labels, seed=seed, batch_size=500, progress=False, **settings)
        results[name] = digits_scores(to_uint8_nhwc(images), labels, cache_dir=cache_dir)
        results[name]["forwards"] = forwards_per_image(model, data, settings)
        print(f"{name}: accuracy {results[name]['accuracy']:.3f}, Frechet {results[name]['frechet']:.2f}", flush=True)
    for name, seconds in time_sampling(rows, labels, seed, timing_samples, timing_rounds).items():
        results[name]["seconds_per_image"] = seconds
    return results


#################################################################################
#                       What a training step of a method costs                  #
#################################################################################

def training_costs(methods, data, cycle=5, repeats=3):
    """{name: cost} of train.py's step for each method {name: train.py argv}, measured side by side in one run.

    Each method's run is built as train.py builds it (train.build_run) and stepped with train.train_step for `cycle`
    iterations per timed call, so a 5:1 update schedule is timed whole; cost = {"seconds": per iteration (median of
    `repeats` interleaved rounds), "forwards": {network: forwards per example and iteration}, "networks": the
    trainable and frozen networks, "extra_mib": their weights (and the trainable ones' two AdamW moments) beyond
    the student, its EMA and its AdamW}."""
    import train
    device, runs, counts, functions = torch.device("cpu"), {}, {}, {}
    x0 = torch.rand(128, data["in_channels"], data["input_size"], data["input_size"]) * 2 - 1
    y = torch.arange(128) % data["num_classes"]
    for name, argv in methods.items():
        args = train.parse_args([str(a) for a in argv] + ["--global-batch-size", "128"])
        run = runs[name] = train.build_run(args, data, device, world_size=1)
        counts[name] = {}
        for net_name, net in {**run.method.trainable, **run.method.frozen}.items():
            if isinstance(net, torch.nn.Module) and hasattr(net, "config"):  # a DiT: count its forwards per example
                net.register_forward_hook(lambda module, inputs, output, c=counts[name], n=net_name:
                                          c.__setitem__(n, c.get(n, 0) + len(inputs[0]) / len(x0)))
        draws = [train.step_draws(run.method, args, data, step, 0, 1, device) for step in range(cycle)]
        functions[name] = partial(lambda run, draws: [train.train_step(run, step, x0, y, draws[step])
                                                      for step in range(cycle)], run, draws)
    timings = time_side_by_side(functions, warmup=1, repeats=repeats)
    costs = {}
    for name, run in runs.items():
        calls = (1 + repeats) * cycle  # the warm-up call and the timed ones
        method = run.method
        extra = sum(p.numel() * 4 * 3 for n, net in method.trainable.items() if n != "student"
                    for p in net.parameters()) + sum(p.numel() * p.element_size() for net in method.frozen.values()
                                                     for p in net.parameters())
        costs[name] = {"seconds": timings[name][0] / cycle,
                       "forwards": {n: round(c / calls, 2) for n, c in counts[name].items()},
                       "networks": {"trainable": list(method.trainable), "frozen": list(method.frozen)},
                       "extra_mib": extra / 2 ** 20}
    return costs


#################################################################################
#                          Exported files on the CPU                            #
#################################################################################

def exported_metadata(path):
    """The metadata export.py writes beside every file (path + ".json"), without loading the model."""
    with open(path + ".json") as f:
        return json.load(f)


def export_runtime(name):
    """The runtime of an exported file's row: "... openvino" rows run the ONNX file on OpenVINO, others on
    onnxruntime (ONNX) or torch (TorchScript)."""
    return "openvino" if name.endswith(" openvino") else "onnxruntime"


def time_exports(exported, repeats=20):
    """{name: {1: ratio, 8: ratio}}: CPU latency of every exported file {name: path} relative to the fp32 file of its
    model and format run by its default runtime ("fewstep onnx int8" and "fewstep onnx int8 openvino" -> "fewstep
    onnx", onnxruntime's fp32), at batch 1 and 8. The files of one format (and model config) are timed interleaved in
    one fresh process (export.fresh_process_report, 1 thread)."""
    from export import fresh_process_report, verification_inputs
    groups = {}  # "fewstep onnx int8" -> format "onnx"; one set of inputs fits every file of a group
    for name, path in exported.items():
        metadata = exported_metadata(path)
        key = (name.split()[1], json.dumps(metadata["model_config"], sort_keys=True),
               str(metadata["sampling"]["guidance_range"]))
        groups.setdefault(key, (metadata, []))[1].append(name)
    latency = {}
    for metadata, names in groups.values():
        inputs = verification_inputs(metadata["model_config"], (1, 8),
                                     guidance_range=metadata["sampling"]["guidance_range"])
        measured = fresh_process_report([exported[n] for n in names], inputs, repeats=repeats, threads=1,
                                        runtimes=[export_runtime(n) for n in names])[1]["latency_s"]
        latency |= dict(zip(names, measured))
    return {name: {batch: latency[name][batch] / latency[" ".join(name.split()[:2])][batch] for batch in (1, 8)}
            for name in exported}
