"""run_digits.py and ablation.py end to end at a tiny scale: every output exists and reruns reuse finished work."""
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--teacher-steps", "4", "--warmup-steps", "2", "--feature-steps", "2", "--joint-steps", "2",
        "--num-samples", "20", "--steps", "3", "--timing-samples", "4", "--fewstep-steps", "3", "--qat-steps", "3"]


def run(script, *arguments):
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *arguments], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_main_job_writes_everything_and_reuses_finished_steps(tmp_path):
    out = tmp_path / "digits"
    run("run_digits.py", "--out", str(out), *TINY)
    for name in ("teacher.npz", "student.npz", "scratch.npz", "fewstep.npz", "shipped.npz", "report.md",
                 "comparison.png", "loss_curves.png", "scores.json", "fewstep/checkpoints/0000003.pt",
                 "shipped/checkpoints/0000003.pt", "teacher_w1.5.npz", "fewstep_w3.npz", "shipped_w3.npz"):
        assert (out / name).exists(), name
    for model in ("student", "fewstep"):
        for name in (".ts", "_int8.ts", ".onnx", "_int8.onnx", "_calib.npz"):
            assert (out / "export" / (model + name)).exists(), model + name
    with np.load(out / "student.npz") as samples:
        assert samples["arr_0"].shape == (20, 8, 8, 1) and samples["arr_0"].dtype == np.uint8
        assert samples["arr_1"].tolist() == [i % 10 for i in range(20)]
    report = (out / "report.md").read_text()
    for row in ("teacher (DiT-Digits-T)", "distilled student (DiT-Digits-S)", "scratch student (DiT-Digits-S)",
                "few-step student (DiT-Digits-S, consistency-distilled from the distilled student, guidance w in "
                "[1.0, 3.0] folded in) | 350,856 | ", "shipped student (the few-step student, quantization-aware"):
        assert row in report
    # the sampler table (README "Fast samplers", not part of the job) on the job's teacher and student side by side
    tables = tmp_path / "samplers"
    run("samplers.py", "--ckpt", str(out / "teacher" / "checkpoints" / "0000004.pt"), "--ckpt",
        str(out / "student" / "checkpoints" / "0000006.pt"), "--out", str(tables), "--cache-dir",
        str(out / "digits_scorer"), "--num-samples", "20", "--timing-samples", "4")
    table = (tables / "samplers.md").read_text()
    for sampler in ("ddim", "dpm++2m", "unipc"):
        for steps in (5, 10, 20):
            row = next(line for line in table.splitlines() if line.startswith(f"| {sampler} | {steps} |"))
            assert len(row.split(" | ")) == 8, row
    assert set(json.loads((tables / "samplers.json").read_text())) == {
        f"{model} {sampler} {steps}" for model in ("teacher", "student")
        for sampler, steps in [("ddim", 50)] + [(s, n) for s in ("ddim", "dpm++2m", "unipc") for n in (5, 10, 20)]}
    fewstep_row = next(line for line in report.splitlines() if line.startswith("| few-step student"))
    assert fewstep_row.split(" | ")[3] == "4"  # forwards per image: its 4 steps
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["scores"]) == {"teacher", "student", "scratch", "fewstep", "shipped", "real"} | {
        f"{name} w={w}" for name in ("teacher", "fewstep", "shipped") for w in ("1.5", "3")}
    guidance_rows = [line for line in report.splitlines() if line.startswith(("| 1 |", "| 1.5 |", "| 3 |"))]
    assert len(guidance_rows) == 3 and all(len(row.split(" | ")) == 7 for row in guidance_rows)
    # Samples made through every exported file, fp32, int8 and fp16, scored side by side.
    assert set(scores["exports"]) == {f"{model} {form}" for model in ("student", "fewstep")
                                      for form in ("torchscript", "torchscript int8", "onnx", "onnx int8")} | {
        f"{model} onnx {form}" for model in ("fewstep", "shipped") for form in ("int8-cpu", "fp16")} | {
        "shipped onnx", "shipped onnx int8"} | {
        f"shipped onnx{form} openvino" for form in ("", " int8", " fp16")}
    assert "| export/shipped_int8.onnx | openvino | int8 |" in report
    assert json.loads((out / "export" / "shipped_int8.onnx.json").read_text())["quantization"].startswith(
        "learned Q/DQ on every Linear")
    assert "| export/fewstep_fp16.onnx | onnxruntime | fp16 |" in report
    assert "| export/fewstep_int8.onnx | onnxruntime | int8 |" in report
    fp32_row = next(line for line in report.splitlines() if line.startswith("| export/fewstep.onnx |"))
    assert fp32_row.split(" | ")[4:6] == ["1.00", "1.00"]  # CPU latency relative to itself, batch 1 and 8
    assert set(scores["exports"]["fewstep onnx int8"]["latency_vs_fp32"]) == {"1", "8"}
    for model in ("student", "fewstep"):
        for name in (".ts", "_int8.ts", ".onnx", "_int8.onnx"):
            assert f"| export/{model}{name} |" in report
            with np.load(out / "export" / f"{model}{name}.samples.npz") as samples:
                assert samples["arr_0"].shape == (20, 8, 8, 1)

    npz_mtime = (out / "student.npz").stat().st_mtime
    result = run("run_digits.py", "--out", str(out), *TINY)  # a rerun trains and samples nothing again
    assert "resumed from" in result.stdout and (out / "student.npz").stat().st_mtime == npz_mtime


def test_ablation_tables_variants_over_seeds(tmp_path):
    teacher = tmp_path / "teacher"
    run("train.py", "--model", "DiT-Digits-T", "--max-steps", "2", "--ckpt-every", "2", "--global-batch-size", "16",
        "--results-dir", str(teacher))
    run("ablation.py", "--teacher-ckpt", str(teacher / "checkpoints" / "0000002.pt"), "--out", str(tmp_path / "abl"),
        "--seeds", "0", "1", "--steps", "6", "--num-samples", "10", "--sampling-steps", "2", "--variants",
        "+ Gaussian KL", "staged recipe (default)")
    table = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| + Gaussian KL |" in table and "| staged recipe (default) |" in table
    summary = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert len(summary["+ Gaussian KL"]["accuracy"]) == 2
    # The paired table: default minus variant, seed by seed.
    frechet = {k: np.array(summary[k]["frechet"]) for k in ("staged recipe (default)", "+ Gaussian KL")}
    paired_row = [line for line in table.splitlines() if line.startswith("| + Gaussian KL |")][1]
    difference = frechet["staged recipe (default)"] - frechet["+ Gaussian KL"]
    assert f"| {difference.mean():+.2f} ± {difference.std(ddof=1):.2f} | {(difference < 0).sum()}/2 |" in paired_row
    log = (tmp_path / "abl" / "staged_recipe_default" / "seed1" / "log.txt").read_text()
    assert "stage warmup" in log and "stage feature" in log and "stage joint" in log


def test_fewstep_table_has_every_row(tmp_path):
    teacher = tmp_path / "teacher"  # the small digits model as the teacher: the table, not the quality, is tested
    run("train.py", "--model", "DiT-Digits-S", "--max-steps", "2", "--ckpt-every", "2", "--global-batch-size", "16",
        "--results-dir", str(teacher))
    run("fewstep.py", "--teacher-ckpt", str(teacher / "checkpoints" / "0000002.pt"), "--out", str(tmp_path / "fs"),
        "--steps", "6", "--guidance-steps", "2", "--dmd2-steps", "5", "--dmd2-ablation-steps", "5",
        "--dmd2-warm-steps", "2",
        "--adversarial-steps", "2", "--adversarial-warm-steps", "2", "--tcd-steps", "2", "--tcd-gammas", "0", "0.3",
        "--tcd-clean-fractions", "0", "0.5", "--reflow-pairs", "20", "--reflow-pair-steps", "2", "--reflow-steps", "2",
        "--instaflow-pairs", "20", "--instaflow-pair-steps", "2", "--instaflow-steps", "2", "--straightness-steps", "4",
        "--num-samples", "10", "--timing-samples", "2")  # every method family (the default --methods)
    table = (tmp_path / "fs" / "fewstep.md").read_text()
    for row in ("| teacher DDIM | 50 | 50 | 1.000 |", "| teacher DDIM (trailing) | 1 | 1 |",
                "| progressive student | 8 | 8 |", "| consistency student | 4 | 4 |", "| dmd2 student | 1 | 1 |",
                "| dmd2 without GAN at 5 iterations | 2 | 2 |", "| dmd2 real-score w=1.5 at 5 iterations | 4 | 4 |",
                "| dmd2 student at 5 iterations | 1 | 1 |",
                "| dmd2 student from the consistency student (no GAN) | 4 | 4 |",
                "| adversarial student | 1 | 1 |",
                "| adversarial (LADD) student from the consistency student | 1 | 1 |",
                "| dmd2 | student, fake_score, discriminator / teacher |",
                "| tcd student gamma=0 | 1 | 1 |", "| tcd student gamma=0.3 | 8 | 8 |",
                "| tcd student, clean share 0.5 gamma=0.3 | 4 | 4 |", "| reflow student (Euler) | 8 | 8 |",
                "| teacher flow-euler (its ODE as a velocity model) | 2 | 2 |", "| instaflow student | 1 | 1 |",
                "| reflow student (2 steps) |", "| instaflow | reflow student, flow-euler 2 steps | 20 | 2 |",
                "| guidance-distilled student, one forward | 3.0 | 50 |", "| teacher, two forwards | 1.5 | 100 | 1.00 |"):
        assert row in table, row
    assert "| 6 (6 rounds) |" in table and "| 3 (3 rounds) |" in table  # the 1- and 8-step progressive students
    rows = json.loads((tmp_path / "fs" / "fewstep.json").read_text())["rows"]
    assert os.path.isdir(tmp_path / "fs" / "tcd_clean0.5") and os.path.isdir(tmp_path / "fs" / "tcd")
    # 31 rows of the families before, warm LADD 1, tcd 2 clean shares x 2 gammas x 4 steps, flow-euler 4, reflow 4,
    # instaflow 1
    assert "| adversarial (LADD) student from the consistency student | 2 | 2 |" not in table  # its 1-step grid only
    assert len(rows) == 31 + 1 + 16 + 4 + 4 + 1
    assert all(row["n"] == 10 and 0 <= row["recall"] <= 1 for row in rows.values())
