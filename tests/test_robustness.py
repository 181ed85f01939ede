"""Nothing lost, nothing silent: the results-dir lock, validated flags, broken files named (and repaired), one kind of
error line (checks.py), experiments.run's signals (the scripts the main job runs)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import checks
import evaluate
import sample
import sample_ddp
import train
from checks import UserError, lock_folder, run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--global-batch-size", "16", "--log-every", "2", "--lr", "1e-3", "--ema-decay", "0.9"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def train_command(results_dir, max_steps, *extra):
    return [sys.executable, os.path.join(ROOT, "train.py"), "--model", "DiT-Digits-S", "--max-steps", str(max_steps),
            "--ckpt-every", "20", "--results-dir", str(results_dir), *TINY, *extra]


def checkpoints(results_dir):
    folder = os.path.join(results_dir, "checkpoints")
    return sorted(os.listdir(folder))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- one run per results directory

def test_second_run_refused_kill_9_leaves_no_stale_lock_and_a_moved_run_resumes(tmp_path, monkeypatch, capsys):
    first = tmp_path / "first"
    running = subprocess.Popen(train_command(first, 100_000), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (first / "checkpoints" / "0000020.pt").exists() and time.time() < deadline:
            time.sleep(0.05)
        # The same directory, other options, at the same time (train.py's __main__ in this process, to spare a start
        # of torch): refused at once, naming the directory and the running process.
        code, err = run_as_script(train, train_command(first, 60, "--seed", "1")[2:], monkeypatch, capsys)
        assert code == 1 and err.startswith(f"error: {first}: in use by pid {running.pid} on ")
    finally:
        running.send_signal(signal.SIGKILL)  # kill -9 while it holds the lock (and perhaps while it writes)
        running.wait()
    assert all(load(first / "checkpoints" / name)["args"]["seed"] == 0 for name in checkpoints(first))
    assert (first / "log.txt").read_text().count("data: ") == 1  # the refused run wrote nothing
    # What a kill -9 during a checkpoint write leaves: a temporary beside the checkpoints (here made sure of).
    (first / "checkpoints" / ".tmp-killed.pt").write_bytes(b"half a checkpoint")

    moved = tmp_path / "moved"
    shutil.move(first, moved)  # a moved (or copied) run directory resumes: --results-dir is not a changed option
    newest = int(checkpoints(moved)[-1][:-3])
    rerun = subprocess.run(train_command(moved, newest + 2), cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed from {moved / 'checkpoints' / f'{newest:07d}.pt'}" in rerun.stdout
    names = checkpoints(moved)
    assert not [name for name in names if name.startswith(".tmp-")]
    assert all(load(moved / "checkpoints" / name)["step"] == int(name[:-3]) for name in names)
    assert load(moved / "checkpoints" / names[-1])["args"]["results_dir"] == str(moved)


def test_a_held_lock_stops_train_and_sample_ddp_before_they_write(tmp_path):
    results = tmp_path / "run"
    with lock_folder(str(results), "--results-dir"):
        with pytest.raises(UserError, match=f"{results}: in use by pid {os.getpid()} "):
            train.main(train.parse_args(["--model", "DiT-Digits-S", "--max-steps", "2", "--results-dir",
                                         str(results)]))
        checkpoint = tmp_path / "model.pt"
        checkpoint.write_bytes(b"")  # never read: the lock comes first
        with pytest.raises(UserError, match="choose another --sample-dir"):
            sample_ddp.main(sample_ddp.parse_args(["--ckpt", str(checkpoint), "--sample-dir", str(results)]))
    assert os.listdir(results) == [checks.LOCK_FILE]
    with lock_folder(str(results), "--results-dir"):  # released when the holder is done
        pass
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="a-file/run: cannot be created .* choose another --results-dir"):
        train.main(train.parse_args(["--model", "DiT-Digits-S", "--max-steps", "2", "--results-dir",
                                     str(tmp_path / "a-file" / "run")]))


# ---------------------------------------------------------------- flags validated where they are parsed

@pytest.mark.parametrize("module, argv, message", [
    (train, ["--max-grad-norm=-1"], "argument --max-grad-norm: -1 is not a finite number >= 0"),
    (train, ["--lr", "nan"], "argument --lr: nan is not a finite number >= 0"),
    (train, ["--lr", "-1"], "argument --lr: -1 is not a finite number >= 0"),
    (train, ["--image-size", "0"], "argument --image-size: 0 is not an integer >= 1"),
    (train, ["--image-size", "9"], "--image-size 9 must be a multiple of 2 for DiT-Digits-S"),
    (train, ["--global-batch-size", "0"], "argument --global-batch-size: 0 is not an integer >= 1"),
    (train, ["--ema-decay", "1.5"], "argument --ema-decay: 1.5 is not a finite number in [0, 1]"),
    (sample, ["--cfg-scale", "nan"], "argument --cfg-scale: nan is not a finite number >= 0"),
    (sample, ["--cfg-scale", "inf"], "argument --cfg-scale: inf is not a finite number >= 0"),
    (sample, ["--cfg-scale", "-3"], "argument --cfg-scale: -3 is not a finite number >= 0"),
    (sample, ["--temperature", "inf"], "argument --temperature: inf is not a finite number > 0"),
    (sample, ["--temperature", "0"], "argument --temperature: 0 is not a finite number > 0"),
    (sample, ["--eta", "-1"], "argument --eta: -1 is not a finite number >= 0"),
    (sample, ["--batch-size", "0"], "argument --batch-size: 0 is not an integer >= 1"),
    (sample_ddp, ["--cfg-scale", "nan", "--sample-dir", "x"], "argument --cfg-scale: nan is not a finite number"),
    (sample_ddp, ["--per-proc-batch-size", "0", "--sample-dir", "x"], "--per-proc-batch-size: 0 is not an integer"),
])
def test_bad_numbers_are_argparse_errors_naming_the_flag_and_range(module, argv, message, tmp_path, capsys):
    base = ["--model", "DiT-Digits-S", "--max-steps", "3"] if module is train else ["--ckpt", __file__]
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(base + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_an_output_path_that_cannot_be_written_is_refused_before_sampling(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_info:
        sample.parse_args(["--ckpt", __file__, "--out", str(tmp_path / "a-file" / "grid.png")])
    assert exit_info.value.code == 2 and f"{tmp_path / 'a-file'} is not a writable folder" in capsys.readouterr().err


# ---------------------------------------------------------------- broken files: one error line naming the file

def run_as_script(module, argv, monkeypatch, capsys):
    """module's `__main__` (checks.run_script) in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, argv)])
    with pytest.raises(SystemExit) as exit_info:
        run_script(module.main, module.parse_args)
    code = exit_info.value.code
    return (code, capsys.readouterr().err) if isinstance(code, int) else (1, f"{code}\n")


def test_truncated_or_malicious_checkpoint_is_one_error_line(tmp_path, monkeypatch, capsys):
    truncated = tmp_path / "truncated.pt"
    torch.save({"ema": {"w": torch.zeros(1000)}, "config": {}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    malicious = tmp_path / "malicious.pt"
    torch.save({"ema": {}, "note": checks.UserError("a pickled object")}, malicious)  # weights_only refuses it
    for path, what in [(truncated, "cannot be read (RuntimeError"), (malicious, "cannot be read (UnpicklingError")]:
        code, err = run_as_script(sample, ["--ckpt", path, "--out", tmp_path / "grid.png"], monkeypatch, capsys)
        assert code == 1 and err.startswith(f"error: {path}: {what}") and err.count("\n") == 1, err
        assert " - truncated, or not a DiT checkpoint" in err and not (tmp_path / "grid.png").exists()
    monkeypatch.setenv(checks.DEBUG_VARIABLE, "1")  # for a bug report: the traceback
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(truncated)])
    with pytest.raises(UserError):
        run_script(sample.main, sample.parse_args)


def write_latents(folder, meta):
    folder.mkdir()
    (folder / "meta.json").write_text(__import__("json").dumps(meta))
    for k in range(meta.get("num_shards", 0)):
        torch.save({"latents": torch.zeros(16, 4, 4, 4), "labels": torch.zeros(16, dtype=torch.long)},
                   folder / f"latents_{k:05d}.pt")


def test_truncated_latents_shard_or_empty_meta_is_named(tmp_path, monkeypatch, capsys):
    latents = tmp_path / "latents"
    write_latents(latents, {"image_size": 32, "vae": "ema", "num_images": 32, "num_shards": 2, "class_names": ["a"]})
    shard = latents / "latents_00001.pt"
    shard.write_bytes(shard.read_bytes()[:500])
    argv = ["--model", "DiT-Digits-S", "--max-steps", "2", "--global-batch-size", "8", "--latents-path", latents,
            "--results-dir", tmp_path / "run"]
    code, err = run_as_script(train, argv, monkeypatch, capsys)
    assert code == 1 and err.startswith(f"error: {shard}: cannot be read") and "rerun the same extract_latents.py" \
        in err and "Traceback" not in err
    empty = tmp_path / "empty"
    write_latents(empty, {})
    argv[argv.index(latents)] = empty
    code, err = run_as_script(train, argv, monkeypatch, capsys)
    assert code == 1 and f"error: {empty / 'meta.json'}: lacks class_names, num_shards" in err


def test_truncated_scorer_cache_is_named_with_the_fix(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save({"model": {"w": torch.zeros(1000)}}, cache / evaluate.DIGITS_SCORER_FILE)
    (cache / evaluate.DIGITS_SCORER_FILE).write_bytes((cache / evaluate.DIGITS_SCORER_FILE).read_bytes()[:200])
    samples = tmp_path / "samples.npz"
    np.savez(samples, np.zeros((10, 8, 8, 1), np.uint8), np.arange(10))
    code, err = run_as_script(evaluate, [samples, "--digits", "--cache-dir", cache], monkeypatch, capsys)
    assert code == 1 and err.startswith(f"error: {cache / evaluate.DIGITS_SCORER_FILE}: cannot be read")
    assert "delete it" in err and "trains the scorer again" in err and err.count("\n") == 1


@pytest.mark.parametrize("extension", [".onnx", ".ts"])
def test_corrupt_exported_file_is_one_error_line(extension, tmp_path):
    exported = tmp_path / f"model{extension}"
    exported.write_bytes(b"\x08\x07not an exported model" * 4)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "run_exported.py"), str(exported), "--out",
                             str(tmp_path / "out.npz")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {exported}: cannot be read" in result.stderr and "export it again" in result.stderr


# ---------------------------------------------------------------- experiments.run stops its child

def test_experiments_run_forwards_sigterm_to_its_child(tmp_path):
    child_script, pid_file = tmp_path / "child.py", tmp_path / "child.pid"
    child_script.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", "import sys, experiments; experiments.run(sys.argv[1])",
                               str(child_script)], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # the child is gone (and reaped by its parent)
        os.kill(child, 0)
