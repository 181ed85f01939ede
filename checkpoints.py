"""The training checkpoint: what one holds, and how a run folder finds and resumes its newest.

A checkpoint is one file of plain data (torch.load(path, weights_only=True) opens it): every trainable network of the
method ("student" under "model", the others under their names), the student's EMA ("ema", as the original DiT
checkpoints), every optimizer ("opt" for the first update, "opt_<name>" for the others), the step, the method's own
state, the options as a dict, the student's config, the data and how it samples. Written atomically
(models.save_checkpoint_atomic), so the newest file under its final name is always complete.
"""
import os

import torch

from checks import UserError

# Flags that may change when a run is resumed; any other difference means a different experiment. --results-dir is
# where the run lives, not what it does: a moved or copied run directory resumes.
RESUMABLE_CHANGES = {"max_steps", "ckpt_every", "log_every", "sample_every", "sample_sampler", "sample_steps",
                     "num_workers", "compile", "results_dir"}



def checkpoint_dir(args):
    return os.path.join(args.results_dir, "checkpoints")


def latest_checkpoint(args, logger):
    """The newest checkpoint in --results-dir that loads, or None; unreadable files are reported and skipped."""
    folder = checkpoint_dir(args)
    names = sorted((n for n in os.listdir(folder) if n.endswith(".pt") and n[:-3].isdigit()), reverse=True) \
        if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: fall back to the one before
            logger.info(f"skipping unreadable checkpoint {path}: {type(error).__name__}: {error}")
    return None, None


def check_resumable(saved_args, args, method, defaults):
    """A UserError when the run in --results-dir was started with other options than those that may change."""
    resumable = RESUMABLE_CHANGES - set(method.fixed_on_resume)
    saved_args = {k: saved_args.get(k, defaults[k]) for k in vars(args)}  # a flag newer than the run: its default
    changed = {k: (saved_args[k], v) for k, v in vars(args).items() if k not in resumable and saved_args[k] != v}
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise UserError(f"{args.results_dir} holds a run with other options ({details}); rerun the same command to "
                        f"resume it, or choose a new --results-dir")


def network_key(name):
    return "model" if name == "student" else name  # "model" and "ema": the original DiT checkpoint's keys


def optimizer_key(run, name):
    return "opt" if name == run.updates[0].name else f"opt_{name}"


def checkpoint_contents(args, run, data, step):
    """One plain-data checkpoint: every trainable network and optimizer, the EMA, the method's state, the options,
    the student's config, the data and how it samples."""
    method = run.method
    return {**{network_key(n): net.state_dict() for n, net in method.trainable.items()}, "ema": run.ema.state_dict(),
            **{optimizer_key(run, n): opt.state_dict() for n, opt in run.optimizers.items()}, "step": step,
            **method.state_dict(), "args": vars(args), "config": method.trainable["student"].config,
            "data": {k: data[k] for k in ("image_size", "latent", "vae")}, "sampling": method.sampling().to_dict()}


def load_checkpoint(run, checkpoint):
    for name, net in run.method.trainable.items():
        net.load_state_dict(checkpoint[network_key(name)])
    run.ema.load_state_dict(checkpoint["ema"])
    for name, opt in run.optimizers.items():
        opt.load_state_dict(checkpoint[optimizer_key(run, name)])
    run.method.load_state_dict(checkpoint)
