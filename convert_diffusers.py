"""Conversion between this repository's DiT (models.py) and diffusers' DiTTransformer2DModel (the DiTPipeline's
transformer, e.g. the "transformer" folder of facebook/DiT-XL-2-256).

    python convert_diffusers.py --to-diffusers --ckpt results/000/checkpoints/0100000.pt --out dit-diffusers
    python convert_diffusers.py --to-diffusers --ckpt DiT-XL-2-256x256.pt --model DiT-XL/2 --image-size 256 --out xl
    python convert_diffusers.py --from-diffusers DiT-XL-2-256/ --out DiT-XL-2-from-diffusers.pt
    python convert_diffusers.py --to-diffusers --pipeline --ckpt results/digits/fewstep/checkpoints/0001200.pt \
        --out digits-pipeline   # then: import dit_pipeline; DiTPipeline.from_pretrained("digits-pipeline")

The weights map one to one, with three changes of layout:
- attn.qkv (fused) <-> attn1.to_q, to_k, to_v;
- diffusers repeats the timestep and class embedders inside every block's norm1 (AdaLayerNormZero); DiT has one pair.
  We copy ours into every block, and read block 0's back after checking that all blocks hold the same weights;
- diffusers' class table always has a null row (its label dropout is fixed at 0.1); a DiT trained without label
  dropout gets a zero row there, never used by its own sampling.
diffusers does not store the frozen sin-cos pos_embed: it recomputes the same table, which we check.

The project's own entries (pixel or latent, image size, VAE, how a step-distilled student samples, the label-dropout
probability) travel in dit_project.json beside the transformer's config.json, and come back with --from-diffusers.

Where diffusers' DiT computes something other than the original facebookresearch/DiT:
- Timestep frequencies: diffusers uses 10000^(-i / (half - 1)) (downscale_freq_shift=1), the original 10000^(-i / half).
  No choice of weights absorbs this, and the shift is not a config key. The folders written here therefore name
  dit_pipeline.OriginalDiTTransformer2DModel, the same model computing the original's frequencies (import dit_pipeline
  before from_pretrained); loaded as a stock DiTTransformer2DModel (as the official facebook/DiT-XL-2-256 is) it
  computes diffusers' way (use_original_timestep_frequencies fixes one object).
- The layer norm before the MLP takes the config's norm_eps (diffusers' default 1e-5); the original uses 1e-6. We
  write norm_eps=1e-6; reading back, DiT always uses the original's 1e-6, whatever the config says.
- In training mode every diffusers block draws its own label dropout; the original drops each label once.
- DiTPipeline uses 1000 as the null label (OriginalDiTTransformer2DModel maps it to the model's own) and guides every
  latent channel; the original guides the first 3 (the same for 1- to 3-channel models).
"""
import argparse
import json
import os
import shutil
import tempfile

import torch
from diffusers import DiTTransformer2DModel

import dit_pipeline
from checks import UserError, number_in, positive_int, run_script
from dit_pipeline import OriginalDiTTransformer2DModel, XEpsDiTTransformer2DModel, use_original_timestep_frequencies
from models import DiT, DiT_models, load_dit_checkpoint, save_checkpoint_atomic
from sampling import SamplingSpec, solver_scheduler

DIT_NORM_EPS = 1e-6  # the original DiT's layer-norm epsilon
# config.json's _class_name -> the class that loads it (Transformer2DModel: the Hub's older name of diffusers' DiT)
DIFFUSERS_CLASSES = {"DiTTransformer2DModel": DiTTransformer2DModel, "Transformer2DModel": DiTTransformer2DModel,
                     "OriginalDiTTransformer2DModel": OriginalDiTTransformer2DModel,
                     "XEpsDiTTransformer2DModel": XEpsDiTTransformer2DModel}
SIDECAR = "dit_project.json"  # beside the transformer's config.json: {"data", "sampling", "class_dropout_prob"}


#################################################################################
#                               Config conversion                               #
#################################################################################

def diffusers_config(config):
    """DiT config (model.config) -> DiTTransformer2DModel keyword arguments."""
    hidden_size, num_heads = config["hidden_size"], config["num_heads"]
    if int(hidden_size * config["mlp_ratio"]) != 4 * hidden_size:
        raise UserError(f"diffusers' DiTTransformer2DModel fixes the MLP width at 4 x hidden_size; this DiT has "
                         f"mlp_ratio={config['mlp_ratio']}, so it cannot be converted")
    in_channels = config["in_channels"]
    return dict(
        num_attention_heads=num_heads, attention_head_dim=hidden_size // num_heads, in_channels=in_channels,
        out_channels=in_channels * 2 if config["learn_sigma"] else in_channels, num_layers=config["depth"],
        sample_size=config["input_size"],  # in latent pixels (DiT's input_size), not image pixels
        patch_size=config["patch_size"], num_embeds_ada_norm=config["num_classes"], dropout=0.0,
        attention_bias=True, activation_fn="gelu-approximate", norm_type="ada_norm_zero",
        norm_elementwise_affine=False, norm_eps=DIT_NORM_EPS,
    )


def dit_config(config, class_dropout_prob):
    """DiTTransformer2DModel config -> DiT config; a ValueError names anything DiT cannot represent.

    diffusers keeps no label-dropout probability (its table always has the null row), so the caller gives it.
    """
    required = dict(norm_type="ada_norm_zero", activation_fn="gelu-approximate", attention_bias=True,
                    norm_elementwise_affine=False)
    for key, value in required.items():
        if config[key] != value:
            raise UserError(f"DiT needs a diffusers config with {key}={value!r}; this model has {config[key]!r}")
    sample_size, patch_size = config["sample_size"], config["patch_size"]
    if not isinstance(sample_size, int) or not isinstance(patch_size, int):
        raise UserError(f"DiT needs square inputs and patches (integer sample_size and patch_size); this model has "
                         f"sample_size={sample_size!r}, patch_size={patch_size!r}")
    in_channels = config["in_channels"]
    out_channels = in_channels if config["out_channels"] is None else config["out_channels"]
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"DiT predicts in_channels (noise) or 2 x in_channels (noise and learned sigma) channels; "
                         f"this model has in_channels={in_channels}, out_channels={out_channels}")
    return dict(
        input_size=sample_size, patch_size=patch_size, in_channels=in_channels,
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"], depth=config["num_layers"],
        num_heads=config["num_attention_heads"], mlp_ratio=4.0, class_dropout_prob=class_dropout_prob,
        num_classes=config["num_embeds_ada_norm"], learn_sigma=out_channels == 2 * in_channels,
    )


#################################################################################
#                            State-dict conversion                              #
#################################################################################

def _name_pairs(depth):
    """(our name, diffusers name) for every tensor that maps one to one; the embedders appear once per block."""
    modules = [("x_embedder.proj", "pos_embed.proj"),
               ("final_layer.adaLN_modulation.1", "proj_out_1"),
               ("final_layer.linear", "proj_out_2")]
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        modules += [("t_embedder.mlp.0", theirs + "norm1.emb.timestep_embedder.linear_1"),
                    ("t_embedder.mlp.2", theirs + "norm1.emb.timestep_embedder.linear_2"),
                    (ours + "adaLN_modulation.1", theirs + "norm1.linear"),  # both chunk shift, scale, gate x 2
                    (ours + "attn.proj", theirs + "attn1.to_out.0"),
                    (ours + "mlp.fc1", theirs + "ff.net.0.proj"),
                    (ours + "mlp.fc2", theirs + "ff.net.2")]
    pairs = [(a + suffix, b + suffix) for a, b in modules for suffix in (".weight", ".bias")]
    table = "norm1.emb.class_embedder.embedding_table.weight"
    return pairs + [("y_embedder.embedding_table.weight", f"transformer_blocks.{i}.{table}") for i in range(depth)]


def dit_to_diffusers(model, transformer_class=DiTTransformer2DModel):
    """A DiT (models.DiT) -> an equivalent diffusers DiTTransformer2DModel (or transformer_class, a subclass from
    dit_pipeline) on the same device and dtype, in eval mode. The stock class is equivalent up to diffusers' timestep
    frequencies (see the module docstring); OriginalDiTTransformer2DModel is equivalent."""
    config = model.config
    transformer = transformer_class(**diffusers_config(config))
    ours = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}

    reference = transformer.pos_embed.pos_embed.to(ours["pos_embed"].dtype)
    if ours["pos_embed"].shape != reference.shape or not torch.allclose(ours["pos_embed"], reference, atol=1e-5):
        raise UserError("this DiT's pos_embed is not the fixed 2-D sin-cos table; diffusers recomputes that table "
                         "and cannot store another, so the conversion would change the model")
    table = ours["y_embedder.embedding_table.weight"]  # (num_classes + use_cfg_embedding, D)
    if table.shape[0] == config["num_classes"]:  # trained without label dropout: diffusers' table still has a null row
        ours["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])

    # load_state_dict copies, so the blocks' embedders do not share memory.
    theirs = {their_name: ours[our_name] for our_name, their_name in _name_pairs(config["depth"])}
    for i in range(config["depth"]):
        for suffix in ("weight", "bias"):
            q, k, v = ours[f"blocks.{i}.attn.qkv.{suffix}"].chunk(3)  # rows ordered (q|k|v, head, head_dim)
            for name, tensor in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                theirs[f"transformer_blocks.{i}.attn1.{name}.{suffix}"] = tensor
    transformer.load_state_dict(theirs, strict=True)
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32:  # diffusers logs a warning on every dtype cast, so cast only when needed
        transformer.to(dtype=parameter.dtype)
    return transformer.to(parameter.device).eval()


def dit_from_diffusers(source, class_dropout_prob=0.1, allow_unshared_embedders=False):
    """A DiTTransformer2DModel, or a local folder holding one, -> an equivalent DiT (models.DiT), in eval mode.

    source: a DiTTransformer2DModel; a folder written by its save_pretrained; or a pipeline folder with a
    "transformer" subfolder. class_dropout_prob: the DiT's label-dropout probability (diffusers does not record it;
    0 drops the null row). allow_unshared_embedders: take block 0's timestep/class embedders even when other blocks
    hold different ones (a model fine-tuned in diffusers); the DiT then differs from the diffusers model.
    """
    if isinstance(source, torch.nn.Module) and not isinstance(source, DiTTransformer2DModel):
        raise TypeError(f"expected a DiTTransformer2DModel or a folder holding one, got a {type(source).__name__}")
    transformer = source if isinstance(source, DiTTransformer2DModel) else load_transformer(source)
    config = dit_config(transformer.config, class_dropout_prob)
    theirs = {name: tensor.detach().cpu() for name, tensor in transformer.state_dict().items()}

    ours, largest_gap, unshared = {}, 0.0, []
    for our_name, their_name in _name_pairs(config["depth"]):  # block 0 comes first and is the one kept
        tensor = theirs[their_name]
        if our_name in ours and not torch.equal(ours[our_name], tensor):
            largest_gap = max(largest_gap, (ours[our_name].float() - tensor.float()).abs().max().item())
            unshared.append(their_name)
        ours.setdefault(our_name, tensor)
    if unshared and not allow_unshared_embedders:
        raise UserError(f"{len(unshared)} tensors of the per-block timestep/class embedders differ from block 0's "
                         f"(first: {unshared[0]}, largest difference {largest_gap:.3g}); DiT shares one embedder. "
                         f"Pass allow_unshared_embedders=True (--allow-unshared-embedders) to use block 0's; the "
                         f"converted DiT will then not match this diffusers model")
    for i in range(config["depth"]):
        for suffix in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{suffix}"] = torch.cat(
                [theirs[f"transformer_blocks.{i}.attn1.{name}.{suffix}"] for name in ("to_q", "to_k", "to_v")])
    table = ours["y_embedder.embedding_table.weight"]
    if table.shape[0] != config["num_classes"] + 1:
        raise UserError(f"expected a class table of num_embeds_ada_norm + 1 = {config['num_classes'] + 1} rows, "
                         f"found {table.shape[0]}")
    if class_dropout_prob == 0:
        ours["y_embedder.embedding_table.weight"] = table[:-1]  # DiT without label dropout has no null row

    model = DiT(**config)
    ours["pos_embed"] = model.pos_embed.detach()  # fixed sin-cos table, not stored by diffusers
    model.load_state_dict(ours, strict=True)
    return model.to(device=transformer.device, dtype=transformer.dtype).eval()


def load_transformer(folder):
    """A DiTTransformer2DModel from a save_pretrained folder or a pipeline folder with a "transformer" subfolder."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a folder; for a Hugging Face Hub model, download it first "
                                f"(e.g. huggingface-cli download facebook/DiT-XL-2-256 --local-dir DIR) and pass DIR")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        if not os.path.isfile(os.path.join(folder, "transformer", "config.json")):
            raise FileNotFoundError(f"{folder} has neither config.json nor transformer/config.json; pass the folder "
                                    f"written by DiTTransformer2DModel.save_pretrained, or a DiTPipeline folder")
        folder = os.path.join(folder, "transformer")
    with open(os.path.join(folder, "config.json")) as f:
        class_name = json.load(f).get("_class_name")
    if class_name not in DIFFUSERS_CLASSES:
        raise UserError(f"{folder} holds a {class_name}, not a DiT transformer ({', '.join(DIFFUSERS_CLASSES)})")
    return DIFFUSERS_CLASSES[class_name].from_pretrained(folder, local_files_only=True)


def read_sidecar(folder):
    """The project's entries saved beside a transformer (SIDECAR), or None for a model made elsewhere."""
    folder = os.fspath(folder)
    for candidate in (os.path.join(folder, SIDECAR), os.path.join(folder, "transformer", SIDECAR)):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return json.load(f)
    return None


#################################################################################
#                                 Command line                                  #
#################################################################################

def write_folder_atomic(write, folder):
    """write(temporary folder), renamed into place at `folder`; refuses a non-empty folder."""
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise UserError(f"{folder} already exists and is not an empty folder; choose a new --out or remove it")
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    try:
        write(temporary)
        os.chmod(temporary, 0o755)  # mkdtemp makes it private
        os.replace(temporary, folder)  # an empty folder at `folder` is replaced
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def project_transformer(model, data):
    """The DiT as the dit_pipeline transformer that computes what it computes, and the SIDECAR entries."""
    spec = SamplingSpec.from_checkpoint_entry(data["sampling"])
    if model.w_embedder is not None:
        raise UserError(f"this is a {spec.method}-distilled student that takes the guidance scale w as an "
                         f"input, which diffusers' DiTTransformer2DModel has no place for; convert its teacher, or "
                         f"sample it with sample.py / export.py")
    x_eps = spec.parametrisation == "x-eps"
    transformer = dit_to_diffusers(model, XEpsDiTTransformer2DModel if x_eps else OriginalDiTTransformer2DModel)
    sidecar = {"data": {k: v for k, v in data.items() if k != "sampling"}, "sampling": spec.to_dict(),
               "class_dropout_prob": model.config["class_dropout_prob"]}
    return transformer, sidecar


def pipeline_scheduler(data):
    """The scheduler a pipeline folder carries: a step-distilled student's own sampler (FewStepScheduler), else
    DPM-Solver++ 2M, the main job's sampler (README), set up as sample.py --sampler dpm++2m."""
    spec, clip = SamplingSpec.from_checkpoint_entry(data["sampling"]), not data["latent"]
    if spec.sampler is None:
        return solver_scheduler("dpm++2m", clip)
    return dit_pipeline.FewStepScheduler(spec.sampler, spec.consistency_skip or 1, clip, gamma=spec.gamma)


def pipeline_decoder(data, vae):
    """The pipeline's VAE: the identity for a pixel model; for a latent model, AutoencoderKL from `vae` (a local
    folder, a cached hub id, or ema / mse) or else the VAE the checkpoint names."""
    if not data["latent"]:
        if vae:
            raise UserError("this model denoises pixels, not VAE latents: drop --vae")
        return dit_pipeline.PixelDecoder()
    if not (vae or data["vae"]):
        raise UserError("this model denoises VAE latents and its checkpoint names no VAE: pass --vae with the "
                         "folder of the Stable Diffusion VAE it was trained with (e.g. sd-vae-ft-ema)")
    from data import load_vae
    return load_vae(vae or data["vae"], "cpu")


def write_diffusers(model, data, out, pipeline=False, vae=None):
    """The transformer folder (pipeline=False) or a complete DiTPipeline folder at `out`, with SIDECAR."""
    transformer, sidecar = project_transformer(model, data)

    def write(folder):
        if pipeline:
            from diffusers import DiTPipeline
            DiTPipeline(transformer=transformer, vae=pipeline_decoder(data, vae),
                        scheduler=pipeline_scheduler(data)).save_pretrained(folder)
        else:
            transformer.save_pretrained(folder)
        with open(os.path.join(folder, "transformer" if pipeline else "", SIDECAR), "w") as f:
            json.dump(sidecar, f, indent=2)
    write_folder_atomic(write, out)
    return transformer


def read_diffusers(folder, class_dropout_prob=None, allow_unshared_embedders=False):
    """(DiT, checkpoint entries "data" and "sampling") from a transformer or pipeline folder; the SIDECAR written
    with it restores the project's entries, and a model made elsewhere is a latent model of 8x its sample size."""
    sidecar = read_sidecar(folder) or {}
    if class_dropout_prob is None:
        class_dropout_prob = sidecar.get("class_dropout_prob", 0.1)
    model = dit_from_diffusers(folder, class_dropout_prob, allow_unshared_embedders)
    data = sidecar.get("data") or {"image_size": model.config["input_size"] * 8, "latent": True, "vae": None}
    entries = {"data": data}
    if "sampling" in sidecar:
        entries["sampling"] = SamplingSpec.from_checkpoint_entry(sidecar["sampling"]).to_dict()
    return model, entries


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Convert DiT checkpoints to and from diffusers' "
                                                 "DiTTransformer2DModel.")
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to-diffusers", action="store_true",
                           help="convert --ckpt to a diffusers transformer folder (save_pretrained layout) at --out")
    direction.add_argument("--from-diffusers", metavar="DIR",
                           help="convert this diffusers transformer folder (or pipeline folder with a transformer "
                                "subfolder) to a DiT checkpoint file at --out; a folder written by --to-diffusers "
                                "brings back the checkpoint's data and sampling entries (dit_project.json)")
    parser.add_argument("--out", required=True,
                        help="output: a new folder (--to-diffusers) or a .pt file (--from-diffusers)")
    to_diffusers = parser.add_argument_group("--to-diffusers options")
    to_diffusers.add_argument("--ckpt", help="DiT checkpoint to convert: a training checkpoint (config + ema/model) "
                                             "or a raw state_dict such as the official DiT-XL-2-256x256.pt")
    to_diffusers.add_argument("--model", choices=list(DiT_models), help="model size of a raw state_dict --ckpt")
    to_diffusers.add_argument("--image-size", type=positive_int, help="image size in pixels of a raw state_dict --ckpt "
                                                             "(e.g. 256; the model sees latents of image-size / 8)")
    to_diffusers.add_argument("--num-classes", type=positive_int,
                              help="number of classes of a raw state_dict --ckpt (default 1000)")
    to_diffusers.add_argument("--pipeline", action="store_true",
                              help="write a complete DiTPipeline folder (transformer, VAE, scheduler, "
                                   "model_index.json): the scheduler is the student's own few-step sampler, else "
                                   "DPM-Solver++ 2M")
    to_diffusers.add_argument("--vae", help="--pipeline of a latent model: its VAE (a local AutoencoderKL folder, a "
                                            "cached hub id, or ema / mse; default: the one its checkpoint names)")
    from_diffusers = parser.add_argument_group("--from-diffusers options")
    from_diffusers.add_argument("--class-dropout-prob", type=number_in(float, 0, 1, high_open=True),
                                help="label-dropout probability of the converted DiT (diffusers does not record it; "
                                     "default 0.1, its fixed value; 0 drops the null-label row)")
    from_diffusers.add_argument("--allow-unshared-embedders", action="store_true",
                                help="if the blocks' timestep/class embedders differ (fine-tuned in diffusers), keep "
                                     "block 0's instead of failing; the result then differs from the diffusers model")
    args = parser.parse_args(argv)
    to_options = args.ckpt is not None or args.pipeline or args.vae is not None or (
        args.model, args.image_size, args.num_classes) != (None, None, None)
    from_options = args.class_dropout_prob is not None or args.allow_unshared_embedders
    if args.to_diffusers and args.ckpt is None:
        parser.error("--to-diffusers needs --ckpt PATH")
    if args.to_diffusers and from_options:
        parser.error("--class-dropout-prob and --allow-unshared-embedders are --from-diffusers options")
    if args.from_diffusers and to_options:
        parser.error("--ckpt, --model, --image-size, --num-classes, --pipeline and --vae are --to-diffusers options")
    if args.vae and not args.pipeline:
        parser.error("--vae goes into a pipeline folder: add --pipeline")
    return args


def main(args):
    if args.to_diffusers:
        model, data = load_dit_checkpoint(args.ckpt, args.model, args.image_size, args.num_classes)
        transformer = write_diffusers(model, data, args.out, args.pipeline, args.vae)
        kind = "DiTPipeline" if args.pipeline else type(transformer).__name__
        print(f"wrote {args.out}: {kind} of {dict(transformer.config)}")
        print("load it with: import dit_pipeline; DiTPipeline.from_pretrained(...) or "
              f"{type(transformer).__name__}.from_pretrained(...) (run from this project, or put it on PYTHONPATH)")
    else:
        model, entries = read_diffusers(args.from_diffusers, args.class_dropout_prob, args.allow_unshared_embedders)
        state_dict = model.state_dict()
        # "ema" and "model" share their tensors, which torch.save stores once.
        save_checkpoint_atomic({"config": model.config, "ema": state_dict, "model": state_dict, **entries}, args.out)
        print(f"wrote {args.out}: DiT {model.config}, {entries['data']}")


if __name__ == "__main__":
    run_script(main, parse_args)
