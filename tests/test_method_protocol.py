"""train.py's loop runs a method it does not know (tests/toy_method.py: two networks, two optimizers, critic every
step, student every 5th): the schedule, each update's own learning rate, exact resume after kill -9, 2 processes = 1."""
import os

import torch

from test_train import TINY, kill_after_checkpoint, load, newest, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "tests", "toy_method.py")


def toy_args(results_dir, *extra):
    return ["--step-distillation", "toy", "--model", "DiT-Digits-S", "--max-steps", "12", "--ckpt-every", "6",
            "--toy-critic-lr", "3e-3", "--results-dir", str(results_dir), *TINY, *extra]


def run_toy(*args, module=None):
    if module:
        return run_train("--standalone", "--nproc_per_node=2", TOY, *args, module=module)
    return run_train(*args, script=TOY)


def test_toy_method_schedule_learning_rates_resume_and_two_processes(tmp_path):
    one, killed, two = tmp_path / "one", tmp_path / "killed", tmp_path / "two"
    run_toy(*toy_args(one))
    a = load(newest(str(one)))
    # 12 iterations: the critic at every one, the student at 0, 5 and 10; each with its own AdamW and learning rate.
    assert a["toy_counts"] == {"critic": 12, "student": 3}
    assert a["opt"]["param_groups"][0]["lr"] == 3e-3 and a["opt_student"]["param_groups"][0]["lr"] == 1e-3
    assert a["opt"]["state"][0]["step"].item() == 12 and a["opt_student"]["state"][0]["step"].item() == 3
    assert set(a["critic"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}

    # kill -9 once the step-6 checkpoint exists, rerun the same command: the same weights, optimizers and counts.
    kill_after_checkpoint(toy_args(killed), killed / "checkpoints" / "0000006.pt", script=TOY)
    result = run_toy(*toy_args(killed))
    assert "resumed from" in result.stdout
    b = load(newest(str(killed)))
    assert b["toy_counts"] == a["toy_counts"]
    for key in ("model", "ema", "critic"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resuming"

    # Two processes under torchrun (every network in DDP): the same as one, up to the order of float reductions.
    run_toy(*toy_args(two), module="torch.distributed.run")
    c = load(newest(str(two)))
    assert c["toy_counts"] == a["toy_counts"]
    for key in ("model", "critic"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], c[key][name], rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")
