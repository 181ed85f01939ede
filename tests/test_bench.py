"""bench.py, and models.py's FLOPs count against the DiT paper's table, and a --quick run end to end on the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
from data import encode_images
from models import flops_per_forward, model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# GFLOPs (multiply-adds) per forward pass at 256 px (32x32x4 latents), from the DiT paper (Peebles & Xie, Table 4).
PUBLISHED_GMACS = {"DiT-S/2": 6.06, "DiT-B/2": 23.0, "DiT-L/2": 80.7, "DiT-XL/2": 118.6}


@pytest.mark.parametrize("name", PUBLISHED_GMACS)
def test_flops_match_the_papers_table(name):
    config = model_config(name, input_size=32)
    gmacs = flops_per_forward(config) / 2 / 1e9
    assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=0.03)


def test_flops_scale_with_tokens_and_depth():
    """Patch size 4 has a quarter of the tokens: the token-linear terms drop 4x, attention 16x."""
    p2, p4 = model_config("DiT-XL/2", input_size=32), model_config("DiT-XL/4", input_size=32)
    assert 3.9 < flops_per_forward(p2) / flops_per_forward(p4) < 4.3
    shallow = model_config("DiT-XL/2", input_size=32, depth=14)
    assert flops_per_forward(shallow) == pytest.approx(flops_per_forward(p2) / 2, rel=0.01)


def test_tiny_vae_downsamples_like_the_stable_diffusion_vae():
    vae = bench.build_vae("tiny", torch.device("cpu"))
    assert encode_images(vae, torch.zeros(2, 3, 64, 64)).shape == (2, 4, 8, 8)


@pytest.mark.skipif(not bench.CPU_PEAK_RESETTABLE, reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_memory_sees_a_temporary_allocation():
    size = 64 * 2 ** 20
    growth = bench.peak_memory_growth(lambda: torch.ones(size // 4).sum(), torch.device("cpu"))  # freed on return
    assert size <= growth < size + 48 * 2 ** 20  # the temporary, plus slack for what else the process touches


def test_quick_run_writes_json_and_markdown(tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--device", "cpu",
                             "--threads", "1", "--out", str(out)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["teacher"] == "DiT-Digits-T" and report["settings"]["student"] == "DiT-Digits-S"
    assert {"device", "torch", "memory", "flops", "peak"} <= set(report["settings"])
    rows = report["rows"]
    assert all(list(row) == [key for key, _ in bench.COLUMNS] for row in rows)

    base = [row for row in rows if row["option"] == "base (fp32)"]
    sampling = {(row["model"], row["batch"], row["measurement"]) for row in base
                if row["measurement"].startswith("sample")}
    expected = {f"sample {s}{g}" for s in ("DDPM-250", "DDIM-50") for g in ("", ", cfg 1.5")}
    assert sampling == {(m, b, e) for m in ("DiT-Digits-T", "DiT-Digits-S") for b in (1, 4) for e in expected}
    training = {row["measurement"]: row for row in base if row["measurement"] in
                ("teacher forward", "student step", "distill step")}
    assert len(training) == 3
    for row in base:  # every base row is measured: positive times, memory, FLOP/s; no MFU without a known peak
        assert row["ms_per_step"] > 0 and row["images_per_s"] > 0 and row["tflops"] > 0 and row["mfu"] is None
        assert row["peak_mib"] > 0 if bench.CPU_PEAK_RESETTABLE else row["peak_mib"] is None
    ratio = training["distill step"]["ms_per_step"] / (training["teacher forward"]["ms_per_step"]
                                                       + training["student step"]["ms_per_step"])
    assert report["distill_ratio"]["base (fp32)"] == pytest.approx(ratio, rel=1e-6)
    ddpm = next(r for r in base if r["measurement"] == "sample DDPM-250" and r["batch"] == 4)
    assert ddpm["ms_per_image"] == pytest.approx(ddpm["ms_per_step"] * 250 / 4, rel=1e-6)

    data = {row["measurement"] for row in rows if row["option"] == "base"}
    assert data == {"VAE encode (data.encode_images)", "read latents (LatentsDataset)"}
    options = {row["option"] for row in rows}
    assert options == {"base (fp32)", "base", "bf16", "SDPA math", "SDPA flash", "SDPA efficient", "CUDA graphs"}
    graphs = [row for row in rows if row["option"] == "CUDA graphs"]
    assert len(graphs) == 1 and graphs[0]["note"] == "n/a (no CUDA)" and graphs[0]["ms_per_step"] is None

    markdown = (out / "report.md").read_text()
    assert "| " + " | ".join(title for _, title in bench.COLUMNS) + " |" in markdown
    assert report["settings"]["device"] in markdown and "n/a (no CUDA)" in markdown
    assert markdown.count("\n| ") == len(rows) + 1  # header and one line per row


def test_bad_flags_are_errors():
    for argv in (["--image-size", "60"], ["--timed-steps", "999"], ["--cfg-scale", "1"], ["--device", "tpu"],
                 ["--teacher-model", "DiT-Digits-S", "--student-model", "DiT-Digits-T"], ["--no-such-flag"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cpu", *argv] if argv[0] != "--device" else argv)
