"""Pipeline folders travel: written here from tiny random models, loaded and sampled in a Python where this project
cannot be imported (diffusers alone, the folder's own code through trust_remote_code), and held equal to sample.py
on the same model and noise."""
import ast
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import AutoencoderKL

import convert_diffusers
from convert_diffusers import dit_from_diffusers, dit_to_diffusers, folder_code, read_diffusers
from dit_pipeline import FewStepScheduler, OriginalDiTTransformer2DModel, XEpsDiTTransformer2DModel
from models import DiT, DiT_models
from sampling import SAMPLERS, SamplingSpec
from test_convert_diffusers import assert_same_state_dict, convert, sample_py_images

PIXEL = {"image_size": 8, "latent": False, "vae": None}
SIZE_DISTILLED = {"method": "size-distillation"}
CONSISTENCY = {"method": "consistency", "parametrisation": "x-eps", "sampler": "consistency",
               "steps": list(range(1, 51)), "default_steps": 4, "guidance_range": None, "consistency_skip": 20}
GUIDED_CONSISTENCY = dict(CONSISTENCY, guidance_range=[1.0, 4.0])
GUIDED_EPS = {"method": "guidance", "guidance_range": [1.0, 4.0]}

# name -> (architecture, data, sampling entry, labels, seed, steps, guidance scale): the three kinds of folder the
# issue names (a plain latent DiT; the size-distilled digits student; the shipped few-step student, also guidance-
# distilled with w as an input), and a guidance-distilled noise predictor.
FOLDERS = {
    "latent": (dict(input_size=8, in_channels=4, num_classes=10), {"image_size": 64, "latent": True, "vae": None},
               None, [1, 4], 0, 3, 1.0),
    "size_distilled": (dict(input_size=8, in_channels=1, num_classes=10), PIXEL, SIZE_DISTILLED, [0, 3, 9], 1, 5, 3.0),
    "consistency": (dict(input_size=8, in_channels=1, num_classes=10), PIXEL, CONSISTENCY, [1, 2, 5], 2, 4, 1.0),
    "guided_consistency": (dict(input_size=8, in_channels=1, num_classes=10, guidance_embed=True), PIXEL,
                           GUIDED_CONSISTENCY, [1, 2, 5], 3, 4, 2.5),
    "guided_eps": (dict(input_size=8, in_channels=1, num_classes=10, guidance_embed=True), PIXEL, GUIDED_EPS,
                   [0, 7], 4, 4, 3.0),
}

# Run with `python -I` in a temporary folder: no PYTHONPATH, no project root, no current directory on sys.path.
CLEAN_PYTHON = r'''
import json, os, shutil, sys
import torch

def project_importable():
    found = []
    for name in ("models", "dit_pipeline", "sampling", "convert_diffusers"):
        try:
            __import__(name)
            found.append(name)
        except ImportError:
            pass
    return found

report = {"before": project_importable(), "folders": {}, "errors": {}}
from diffusers import DiffusionPipeline
jobs = json.load(open(sys.argv[1]))
for name, job in jobs.items():
    pipe = DiffusionPipeline.from_pretrained(job["folder"], trust_remote_code=True, local_files_only=True)
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(job["seed"])
    torch.randn(len(job["labels"]), config.in_channels, config.sample_size, config.sample_size, generator=generator)
    torch.set_rng_state(generator.get_state())  # a consistency step's re-noising: sample.py's draws after the noise
    images = pipe(job["labels"], guidance_scale=job["guidance_scale"], generator=torch.Generator().manual_seed(
        job["seed"]), num_inference_steps=job["steps"], output_type="pt").images
    torch.save(images * 2 - 1, job["out"])
    report["folders"][name] = {component: [type(module).__module__, type(module).__name__]
                               for component, module in [("pipeline", pipe), *pipe.components.items()]}
report["after"] = project_importable()

def error(load):
    try:
        load()
    except (ValueError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return None

first = next(iter(jobs.values()))["folder"]
report["errors"]["untrusted"] = error(lambda: DiffusionPipeline.from_pretrained(first, local_files_only=True))
shutil.copytree(first, "no_code")
os.remove("no_code/transformer/dit_pipeline.py")
report["errors"]["missing_code"] = error(lambda: DiffusionPipeline.from_pretrained(
    "no_code", trust_remote_code=True, local_files_only=True))
guided = DiffusionPipeline.from_pretrained(jobs["guided_eps"]["folder"], trust_remote_code=True, local_files_only=True)
report["errors"]["out_of_range"] = error(lambda: guided([0], guidance_scale=5.0, num_inference_steps=1))
json.dump(report, open("report.json", "w"))
print(json.dumps(report["errors"], indent=1))
'''


def random_weights(model, seed):
    """Every weight random (DiT's init zeros the adaLN, output and w-embedding layers, which hides mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def student(architecture, seed=0):
    """DiT-Digits-S (the size-distilled digits student's size) with random weights."""
    return random_weights(DiT_models["DiT-Digits-S"](**architecture), seed)


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8),
                         latent_channels=4, layers_per_block=1, norm_num_groups=8, sample_size=32).eval()


@pytest.fixture(scope="module")
def travelled(tmp_path_factory):
    """Every FOLDERS entry written by convert_diffusers.py --pipeline, then sampled by CLEAN_PYTHON."""
    root = tmp_path_factory.mktemp("travel")
    tiny_vae().save_pretrained(root / "vae")
    jobs, checkpoints = {}, {}
    for i, (name, (architecture, data, sampling, labels, seed, steps, scale)) in enumerate(FOLDERS.items()):
        model = student(architecture, seed=i)
        checkpoint = {"config": model.config, "ema": model.state_dict(), "data": data}
        if sampling:
            checkpoint["sampling"] = sampling
        checkpoints[name] = str(root / f"{name}.pt")
        torch.save(checkpoint, checkpoints[name])
        vae = ["--vae", root / "vae"] if data["latent"] else []
        convert("--to-diffusers", "--pipeline", "--ckpt", checkpoints[name], *vae, "--out", root / name)
        jobs[name] = dict(folder=str(root / name), labels=labels, seed=seed, steps=steps, guidance_scale=scale,
                          out=str(root / f"{name}_images.pt"))
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "clean.py").write_text(CLEAN_PYTHON)
    env = {"PATH": os.environ["PATH"], "HOME": str(root), "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # no PYTHONPATH; -I ignores PYTHON* anyway and puts no script folder first
    result = subprocess.run([sys.executable, "-I", str(root / "clean.py"), str(root / "jobs.json")], cwd=root,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((root / "report.json").read_text())
    return root, jobs, checkpoints, report


def test_the_project_is_not_importable_where_the_folders_load(travelled):
    _, _, _, report = travelled
    assert report["before"] == [] and report["after"] == []
    for name, components in report["folders"].items():
        for component, (module, class_name) in components.items():
            if module.startswith("diffusers_modules"):  # diffusers' copy of the folder's dit_pipeline.py
                assert module.endswith(".dit_pipeline"), (name, component, module)
            else:
                assert module.startswith("diffusers."), (name, component, module)


def test_stock_classes_where_they_compute_the_same(travelled):
    """The plain latent DiT: stock pipeline, scheduler and VAE; only the transformer is the folder's code (diffusers'
    own DiT computes other timestep frequencies). A w input needs GuidanceEmbeddedDiTPipeline."""
    _, _, _, report = travelled
    latent = report["folders"]["latent"]
    assert latent["pipeline"][1] == "DiTPipeline" and latent["vae"][1] == "AutoencoderKL"
    assert latent["scheduler"][1] == "DPMSolverMultistepScheduler"
    assert latent["transformer"][1] == "OriginalDiTTransformer2DModel"
    assert report["folders"]["size_distilled"]["vae"][1] == "PixelDecoder"
    assert report["folders"]["consistency"]["scheduler"][1] == "FewStepScheduler"
    assert report["folders"]["consistency"]["pipeline"][1] == "DiTPipeline"
    for name in ("guided_consistency", "guided_eps"):
        assert report["folders"][name]["pipeline"][1] == "GuidanceEmbeddedDiTPipeline"


@pytest.mark.parametrize("name", list(FOLDERS))
def test_folder_samples_what_sample_py_samples(travelled, name):
    root, jobs, checkpoints, _ = travelled
    job = jobs[name]
    vae = tiny_vae() if FOLDERS[name][1]["latent"] else None
    solver = {} if FOLDERS[name][2] and FOLDERS[name][2].get("sampler") else dict(sampler="dpm++2m")
    ours = sample_py_images(checkpoints[name], job["labels"], job["seed"], job["steps"], vae=vae,
                            cfg_scale=job["guidance_scale"], **solver)
    theirs = torch.load(job["out"], weights_only=True)
    assert ours.abs().max() > 0.1  # a non-trivial image
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4 if vae is not None else 1e-5)


def test_bad_loads_are_clear_errors(travelled):
    errors = travelled[3]["errors"]
    assert "trust_remote_code=True" in errors["untrusted"]
    assert "dit_pipeline" in errors["missing_code"] and "trust_remote_code" in errors["missing_code"]
    assert "outside the range this student was distilled for [1.0, 4.0]" in errors["out_of_range"]


def test_guided_transformer_computes_the_dit():
    for transformer_class, learn_sigma in ((OriginalDiTTransformer2DModel, False), (XEpsDiTTransformer2DModel, True)):
        model = random_weights(DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4,
                                   num_classes=10, learn_sigma=learn_sigma, guidance_embed=True), 5)
        transformer = dit_to_diffusers(model, transformer_class, (1.0, 4.0))
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        t, y, w = torch.tensor([0, 250, 500, 999]), torch.tensor([0, 3, 10, 9]), torch.tensor([1.0, 1.5, 3.0, 4.0])
        with torch.no_grad():
            ours = model(x, t, y, w=w)
            theirs = transformer(x, timestep=t, class_labels=y, guidance_scale=w).sample
        if transformer_class is XEpsDiTTransformer2DModel:
            from sampling import predict_x0_eps
            ours = predict_x0_eps(ours, x, t, "x-eps")[0]
            theirs = theirs[:, :1]
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="pass guidance_scale"):
            transformer(x, timestep=t, class_labels=y)
        back = dit_from_diffusers(transformer)
        assert back.config == model.config
        assert_same_state_dict(back.state_dict(), model.state_dict())
        with torch.no_grad():  # a deep copy (an EMA, say) adds its own w embedding, not the original's
            copied = copy.deepcopy(transformer)
            torch.nn.init.zeros_(transformer.guidance_embedder.linear_2.bias)
            again = copied(x, timestep=t, class_labels=y, guidance_scale=w).sample
        torch.testing.assert_close(again[:, :1] if transformer_class is XEpsDiTTransformer2DModel else again, ours,
                                   rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no place for"):
        dit_to_diffusers(model)


def test_guided_folder_round_trip(tmp_path):
    model = student(dict(input_size=8, in_channels=1, num_classes=10, guidance_embed=True))
    torch.save({"config": model.config, "ema": model.state_dict(), "data": PIXEL, "sampling": GUIDED_CONSISTENCY},
               tmp_path / "guided.pt")
    convert("--to-diffusers", "--pipeline", "--ckpt", tmp_path / "guided.pt", "--out", tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == ["dit_pipeline", "GuidanceEmbeddedDiTPipeline"]
    assert index["transformer"] == ["dit_pipeline", "XEpsDiTTransformer2DModel"]
    for path in ("dit_pipeline.py", "transformer/dit_pipeline.py", "scheduler/dit_pipeline.py", "vae/dit_pipeline.py"):
        assert (tmp_path / "pipe" / path).read_text() == folder_code()
    back, entries = read_diffusers(tmp_path / "pipe")
    assert back.config == model.config and entries["data"] == PIXEL
    assert entries["sampling"] == SamplingSpec.from_checkpoint_entry(GUIDED_CONSISTENCY).to_dict()
    assert_same_state_dict(back.state_dict(), model.state_dict())


def test_folder_code_is_generated_and_self_contained(tmp_path):
    code = folder_code()
    assert code.startswith("# Generated by this DiT project's convert_diffusers.py")
    imported = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
                for node in ast.walk(ast.parse(code)) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    assert imported == {"torch", "numpy", "diffusers", "math", "inspect"}
    assert "def alpha_sigma" in code and "class GuidanceEmbeddedDiTPipeline" in code
    with pytest.raises(RuntimeError, match="would import tqdm"):
        convert_diffusers._check_folder_import("tqdm.auto", "from tqdm.auto import tqdm")


@pytest.mark.parametrize("sampler", ["ddim-trailing", "consistency", "tcd"])
def test_few_step_grid_is_the_samplers(sampler):
    for skip in (1, 20):
        scheduler = FewStepScheduler(sampler, skip)
        spec = SamplingSpec(parametrisation="x-eps", sampler=sampler, consistency_skip=skip)
        for steps in (1, 2, 3, 4, 8):
            assert scheduler.sampler_timesteps(steps) == SAMPLERS[sampler].timesteps(steps, spec)


def test_a_w_input_without_its_range_is_a_clear_error(tmp_path):
    model = student(dict(input_size=8, in_channels=1, num_classes=10, guidance_embed=True))
    torch.save({"config": model.config, "ema": model.state_dict(), "data": PIXEL, "sampling": CONSISTENCY},
               tmp_path / "guided.pt")
    with pytest.raises(ValueError, match="names no guidance_range"):
        convert("--to-diffusers", "--pipeline", "--ckpt", tmp_path / "guided.pt", "--out", tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    with pytest.raises(ValueError, match="this DiT takes no w"):
        dit_to_diffusers(student(dict(input_size=8, in_channels=1, num_classes=10)), OriginalDiTTransformer2DModel,
                         (1.0, 4.0))
