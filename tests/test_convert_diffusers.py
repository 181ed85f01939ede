"""convert_diffusers.py: our DiT <-> diffusers' DiTTransformer2DModel, on tiny random models (CPU, no downloads)."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from diffusers import DiTTransformer2DModel

from convert_diffusers import (diffusers_config, dit_from_diffusers, dit_to_diffusers, load_dit_checkpoint,
                               parse_args, use_original_timestep_frequencies)
from checks import UserError
from models import DiT, DiT_models

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def random_dit(seed=0, **overrides):
    """A tiny DiT with every weight random: DiT's own init zeros the adaLN and output layers, which hides mistakes."""
    model = DiT(**(TINY | overrides))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "pos_embed":  # the fixed sin-cos table stays
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def model_inputs(model, dtype=torch.float32):
    """Several timesteps (0, fractional, the last) and labels, the null label (num_classes) included."""
    x = torch.randn(6, model.in_channels, 8, 8, generator=torch.Generator().manual_seed(1), dtype=dtype)
    t = torch.tensor([0.0, 1.0, 10.0, 250.5, 500.0, 999.0])
    y = torch.tensor([0, 3, 9, 10, 10, 5])
    return x, t, y


def assert_same_state_dict(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def run_script(*args):
    return subprocess.run([sys.executable, "convert_diffusers.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("class_dropout_prob", [0.1, 0.0])
def test_round_trip_is_identical(learn_sigma, class_dropout_prob):
    model = random_dit(learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob)
    transformer = dit_to_diffusers(model)
    table = transformer.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight
    assert table.shape == (TINY["num_classes"] + 1, TINY["hidden_size"])  # diffusers always has the null row
    if class_dropout_prob == 0:
        assert torch.equal(table[-1], torch.zeros_like(table[-1]))

    back = dit_from_diffusers(transformer, class_dropout_prob=class_dropout_prob)
    assert back.config == model.config
    assert_same_state_dict(back.state_dict(), model.state_dict())
    assert_same_state_dict(dit_to_diffusers(back).state_dict(), transformer.state_dict())  # diffusers -> ours -> back


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_matches_diffusers(dtype, tolerance, learn_sigma):
    model = random_dit(learn_sigma=learn_sigma).to(dtype)
    transformer = use_original_timestep_frequencies(dit_to_diffusers(model))
    assert transformer.dtype == dtype and transformer.config.out_channels == model.out_channels
    x, t, y = model_inputs(model, dtype)
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = transformer(hidden_states=x, timestep=t, class_labels=y).sample
    assert ours.shape == theirs.shape == (6, model.out_channels, 8, 8)
    assert ours.abs().max() > 1  # the random adaLN and output weights make a non-trivial output
    assert (ours - theirs).abs().max().item() <= tolerance


def test_stock_diffusers_timestep_frequencies_differ():
    """Without the fix, diffusers' downscale_freq_shift=1 changes the output for every t > 0 (all frequencies agree
    at t = 0). If diffusers ever aligns with the original DiT, this test fails: update the module docstring."""
    model = random_dit()
    transformer = dit_to_diffusers(model)
    x, t, y = model_inputs(model)
    with torch.no_grad():
        gap = (model(x, t, y) - transformer(hidden_states=x, timestep=t, class_labels=y).sample).abs().amax((1, 2, 3))
    assert gap[0] <= 1e-5
    assert (gap[1:] > 1e-3).all()


def test_from_save_pretrained_and_pipeline_folders(tmp_path):
    model = random_dit()
    dit_to_diffusers(model).save_pretrained(tmp_path / "pipeline" / "transformer")
    for folder in (tmp_path / "pipeline" / "transformer", tmp_path / "pipeline", str(tmp_path / "pipeline")):
        back = dit_from_diffusers(folder)
        assert back.config == model.config
        assert_same_state_dict(back.state_dict(), model.state_dict())

    reloaded = use_original_timestep_frequencies(DiTTransformer2DModel.from_pretrained(tmp_path / "pipeline" /
                                                                                       "transformer"))
    x, t, y = model_inputs(model)
    with torch.no_grad():
        gap = (model(x, t, y) - reloaded(hidden_states=x, timestep=t, class_labels=y).sample).abs().max().item()
    assert gap <= 1e-5


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither config.json nor transformer/config.json"):
        dit_from_diffusers(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        dit_from_diffusers(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="holds a UNet2DModel, not a DiT transformer"):
        dit_from_diffusers(tmp_path)


def test_unshared_embedders_are_refused_unless_allowed():
    model = random_dit()
    transformer = dit_to_diffusers(model)
    with torch.no_grad():
        transformer.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias.add_(0.5)
    with pytest.raises(ValueError, match="differ from block 0's .*largest difference 0.5"):
        dit_from_diffusers(transformer)
    back = dit_from_diffusers(transformer, allow_unshared_embedders=True)
    assert_same_state_dict(back.state_dict(), model.state_dict())  # block 0's copy is the one kept


def test_unsupported_configs_are_clear_errors():
    with pytest.raises(ValueError, match="mlp_ratio=2.0"):
        dit_to_diffusers(DiT(**TINY, mlp_ratio=2.0))
    config = diffusers_config(DiT(**TINY).config)
    with pytest.raises(ValueError, match="activation_fn='gelu-approximate'; this model has 'gelu'"):
        dit_from_diffusers(DiTTransformer2DModel(**(config | dict(activation_fn="gelu"))))
    with pytest.raises(ValueError, match="out_channels=6"):
        dit_from_diffusers(DiTTransformer2DModel(**(config | dict(out_channels=6))))


def test_raw_state_dict_needs_model_and_image_size(tmp_path):
    path = tmp_path / "raw.pt"
    raw = DiT_models["DiT-Digits-S"](input_size=8)  # what --image-size 64 gives: 64 / 8 latents, 4 channels
    torch.save(raw.state_dict(), path)
    with pytest.raises(ValueError, match="pass --model and --image-size"):
        load_dit_checkpoint(path)
    with pytest.raises(ValueError, match="shape mismatches: pos_embed"):
        load_dit_checkpoint(path, "DiT-Digits-S", 128)
    assert_same_state_dict(load_dit_checkpoint(path, "DiT-Digits-S", 64)[0].state_dict(), raw.state_dict())
    torch.save({"config": raw.config, "model": raw.state_dict()}, path)  # a checkpoint carries its config
    with pytest.raises(ValueError, match="carries its model config"):
        load_dit_checkpoint(path, "DiT-Digits-S", 64)


def test_cli_round_trip(tmp_path):
    model = random_dit()
    checkpoint = {"config": model.config, "ema": model.state_dict(), "model": random_dit(seed=1).state_dict(),
                  "step": 7}
    torch.save(checkpoint, tmp_path / "train.pt")
    folder, back_path = tmp_path / "diffusers", tmp_path / "back.pt"

    result = run_script("--to-diffusers", "--ckpt", str(tmp_path / "train.pt"), "--out", str(folder))
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "config.json").read_text())["sample_size"] == TINY["input_size"]
    result = run_script("--from-diffusers", str(folder), "--out", str(back_path))
    assert result.returncode == 0, result.stderr

    back = torch.load(back_path, map_location="cpu", weights_only=True)
    assert back["config"] == model.config
    assert_same_state_dict(back["ema"], model.state_dict())  # "ema" was preferred over "model"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".convert-")]  # no temporary left behind

    with pytest.raises(UserError, match="already exists"):  # the CLI above; this one in-process
        convert("--to-diffusers", "--ckpt", tmp_path / "train.pt", "--out", folder)


def test_cli_flags_of_the_other_direction_are_errors(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--from-diffusers", "folder", "--out", "model.pt", "--model", "DiT-S/2"])
    assert "are --to-diffusers options" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--to-diffusers", "--out", "folder"])
    assert "--to-diffusers needs --ckpt" in capsys.readouterr().err


# ------------------------------------------------- metadata round trip and DiTPipeline folders

PIXEL_DATA = {"image_size": 8, "latent": False, "vae": None}
CONSISTENCY = {"method": "consistency", "parametrisation": "x-eps", "sampler": "consistency",
               "steps": list(range(1, 51)), "default_steps": 4, "guidance_range": None, "consistency_skip": 20}
TCD = dict(CONSISTENCY, method="tcd", sampler="tcd", gamma=0.3)
PROGRESSIVE = {"method": "progressive", "parametrisation": "x-eps", "sampler": "ddim-trailing", "steps": [2],
               "default_steps": 2, "guidance_range": None, "consistency_skip": None}


def pixel_checkpoint(path, sampling=None, seed=0):
    """A training checkpoint of a random 8x8 one-channel digits model; an x-eps student if `sampling` says so."""
    model = random_dit(seed, in_channels=1, learn_sigma=True)
    checkpoint = {"config": model.config, "ema": model.state_dict(), "data": PIXEL_DATA}
    if sampling:
        checkpoint["sampling"] = sampling
    torch.save(checkpoint, path)
    return str(path)


def convert(*args):
    """convert_diffusers.py in this process (a subprocess would pay for importing torch and diffusers again)."""
    import convert_diffusers
    convert_diffusers.main(parse_args([str(a) for a in args]))


@contextlib.contextmanager
def temporary_modules_cache():
    """diffusers copies a folder's code into HF_MODULES_CACHE (default ~/.cache/huggingface/modules) and puts that on
    sys.path: a temporary one instead, sys.path restored after."""
    from diffusers.utils import dynamic_modules_utils
    saved_cache, saved_path = dynamic_modules_utils.HF_MODULES_CACHE, list(sys.path)
    with tempfile.TemporaryDirectory() as cache:
        dynamic_modules_utils.HF_MODULES_CACHE = cache
        try:
            yield
        finally:
            dynamic_modules_utils.HF_MODULES_CACHE, sys.path[:] = saved_cache, saved_path


def pipeline_images(folder, labels, seed, steps, guidance_scale=1.0):
    """DiTPipeline's images as sample.py's [-1, 1] tensors, from the folder's own code. The re-noising of a
    consistency step comes from torch's global RNG in the pipeline; set it where sample.py's generator is after the
    initial noise."""
    from diffusers import DiffusionPipeline
    with temporary_modules_cache():
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, trust_remote_code=True)
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(seed)
    torch.randn(len(labels), config.in_channels, config.sample_size, config.sample_size, generator=generator)
    torch.set_rng_state(generator.get_state())
    images = pipe(labels, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(seed),
                  num_inference_steps=steps, output_type="pt").images
    return images * 2 - 1


def sample_py_images(ckpt, labels, seed, steps, vae=None, **settings):
    from sample import generate
    model, data = load_dit_checkpoint(ckpt)
    return generate(model, data, labels, seed=seed, num_sampling_steps=steps, vae=vae, progress=False,
                    **settings).clamp(-1, 1)


def test_pixel_checkpoint_round_trip_keeps_its_entries_and_samples_offline(tmp_path):
    import sample
    ckpt = pixel_checkpoint(tmp_path / "digits.pt", CONSISTENCY)
    convert("--to-diffusers", "--ckpt", ckpt, "--out", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["_class_name"] == "XEpsDiTTransformer2DModel"
    convert("--from-diffusers", tmp_path / "hf", "--out", tmp_path / "back.pt")
    model, data = load_dit_checkpoint(ckpt)
    back, back_data = load_dit_checkpoint(str(tmp_path / "back.pt"))
    assert back_data == data and back.config == model.config and not back_data["latent"]
    assert_same_state_dict(back.state_dict(), model.state_dict())
    # a pixel model again: sample.py needs no VAE (and would fail offline fetching one for a latent model)
    sample.main(sample.parse_args(["--ckpt", str(tmp_path / "back.pt"), "--out", str(tmp_path / "grid.png")]))
    assert (tmp_path / "grid.png").exists()


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_pipeline_folder_of_a_noise_predictor_matches_sample_py(tmp_path, guidance_scale):
    """DPM-Solver++ 2M in the folder as in sample.py; guidance on a 1-channel model is the same in both conventions,
    and DiTPipeline's null label 1000 reaches the model's own (10)."""
    ckpt = pixel_checkpoint(tmp_path / "digits.pt")
    convert("--to-diffusers", "--pipeline", "--ckpt", ckpt, "--out", tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
    labels = [0, 3, 7, 9]
    ours = sample_py_images(ckpt, labels, 2, 6, sampler="dpm++2m", cfg_scale=guidance_scale)
    theirs = pipeline_images(tmp_path / "pipe", labels, 2, 6, guidance_scale)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampling", [CONSISTENCY, TCD, PROGRESSIVE], ids=["consistency", "tcd", "progressive"])
def test_few_step_student_pipeline_reproduces_its_own_sampler(tmp_path, sampling):
    ckpt = pixel_checkpoint(tmp_path / "student.pt", sampling, seed=3)
    convert("--to-diffusers", "--pipeline", "--ckpt", ckpt, "--out", tmp_path / "pipe")
    labels = [1, 2, 5]
    steps = sampling["default_steps"]
    ours = sample_py_images(ckpt, labels, 4, steps)
    theirs = pipeline_images(tmp_path / "pipe", labels, 4, steps)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    if sampling is not PROGRESSIVE:  # the re-noising matters: other draws give other images
        assert (pipeline_images(tmp_path / "pipe", labels, 5, steps)[:, :, :, :] - ours).abs().max() > 1e-2


def test_latent_pipeline_with_its_vae(tmp_path):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                        layers_per_block=1, norm_num_groups=8, sample_size=32)
    vae.save_pretrained(tmp_path / "vae")
    model = random_dit()
    torch.save({"config": model.config, "ema": model.state_dict(),
                "data": {"image_size": 64, "latent": True, "vae": None}}, tmp_path / "latent.pt")
    ckpt = str(tmp_path / "latent.pt")
    with pytest.raises(UserError, match="pass --vae"):
        convert("--to-diffusers", "--pipeline", "--ckpt", ckpt, "--out", tmp_path / "no_vae")
    assert not (tmp_path / "no_vae").exists()
    convert("--to-diffusers", "--pipeline", "--ckpt", ckpt, "--vae", tmp_path / "vae", "--out", tmp_path / "pipe")
    vae.eval()
    ours = sample_py_images(ckpt, [1, 4], 0, 3, vae=vae, sampler="dpm++2m", cfg_scale=1.0)
    theirs = pipeline_images(tmp_path / "pipe", [1, 4], 0, 3)
    assert theirs.shape == (2, 3, 64, 64)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)


def test_not_a_dit_folder_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UserError, match="holds a UNet2DModel, not a DiT transformer"):
        convert("--from-diffusers", tmp_path / "unet", "--out", tmp_path / "x.pt")
    with pytest.raises(SystemExit):
        parse_args(["--to-diffusers", "--ckpt", "x.pt", "--out", "o", "--vae", "ema"])
