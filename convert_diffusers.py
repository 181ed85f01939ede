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
import ast
import importlib
import inspect
import json
import os
import shutil
import sys
import tempfile

import torch
from diffusers import DiTTransformer2DModel

import dit_pipeline
from checks import UserError, number_in, positive_int, run_script
from dit_pipeline import (GuidanceEmbeddedDiTPipeline, OriginalDiTTransformer2DModel, XEpsDiTTransformer2DModel,
                          use_original_timestep_frequencies)
from models import DiT, DiT_models, load_dit_checkpoint, save_checkpoint_atomic
from sampling import SamplingSpec, solver_scheduler

DIT_NORM_EPS = 1e-6  # the original DiT's layer-norm epsilon
# config.json's _class_name -> the class that loads it (Transformer2DModel: the Hub's older name of diffusers' DiT)
DIFFUSERS_CLASSES = {"DiTTransformer2DModel": DiTTransformer2DModel, "Transformer2DModel": DiTTransformer2DModel,
                     "OriginalDiTTransformer2DModel": OriginalDiTTransformer2DModel,
                     "XEpsDiTTransformer2DModel": XEpsDiTTransformer2DModel}
SIDECAR = "dit_project.json"  # beside the transformer's config.json: {"data", "sampling", "class_dropout_prob"}
FOLDER_MODULE = "dit_pipeline"  # the file a pipeline folder carries its component code in, and the module it names
FOLDER_CODE_PACKAGES = {"torch", "numpy", "diffusers"}  # what the folder's code may import besides the stdlib
PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))


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
        guidance_embed=config.get("guidance_range") is not None,  # dit_pipeline's key; a stock DiT has none
    )


#################################################################################
#                            State-dict conversion                              #
#################################################################################

def _name_pairs(depth, guidance_embed=False):
    """(our name, diffusers name) for every tensor that maps one to one; the embedders appear once per block, the w
    embedder of a guidance-distilled DiT once (dit_pipeline.OriginalDiTTransformer2DModel's guidance_embedder)."""
    modules = [("x_embedder.proj", "pos_embed.proj"),
               ("final_layer.adaLN_modulation.1", "proj_out_1"),
               ("final_layer.linear", "proj_out_2")]
    if guidance_embed:
        modules += [("w_embedder.mlp.0", "guidance_embedder.linear_1"), ("w_embedder.mlp.2", "guidance_embedder.linear_2")]
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


def dit_to_diffusers(model, transformer_class=DiTTransformer2DModel, guidance_range=None):
    """A DiT (models.DiT) -> an equivalent diffusers DiTTransformer2DModel (or transformer_class, a subclass from
    dit_pipeline) on the same device and dtype, in eval mode. The stock class is equivalent up to diffusers' timestep
    frequencies (see the module docstring); OriginalDiTTransformer2DModel is equivalent. A guidance-distilled DiT (a
    w input) needs OriginalDiTTransformer2DModel or XEpsDiTTransformer2DModel and its guidance_range."""
    config = model.config
    guidance_embed = model.w_embedder is not None
    if guidance_embed and not (issubclass(transformer_class, OriginalDiTTransformer2DModel) and guidance_range):
        raise UserError("this DiT takes the guidance scale w as an input, which diffusers' DiTTransformer2DModel has "
                        "no place for: convert it to dit_pipeline.OriginalDiTTransformer2DModel with its "
                        "guidance_range")
    if guidance_range is not None and not guidance_embed:
        raise UserError("a guidance_range is for a guidance-distilled DiT (a w input); this DiT takes no w")
    extra = dict(guidance_range=list(guidance_range)) if guidance_embed else {}
    transformer = transformer_class(**diffusers_config(config), **extra)
    ours = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}

    reference = transformer.pos_embed.pos_embed.to(ours["pos_embed"].dtype)
    if ours["pos_embed"].shape != reference.shape or not torch.allclose(ours["pos_embed"], reference, atol=1e-5):
        raise UserError("this DiT's pos_embed is not the fixed 2-D sin-cos table; diffusers recomputes that table "
                         "and cannot store another, so the conversion would change the model")
    table = ours["y_embedder.embedding_table.weight"]  # (num_classes + use_cfg_embedding, D)
    if table.shape[0] == config["num_classes"]:  # trained without label dropout: diffusers' table still has a null row
        ours["y_embedder.embedding_table.weight"] = torch.cat([table, table.new_zeros(1, table.shape[1])])

    # load_state_dict copies, so the blocks' embedders do not share memory.
    theirs = {their_name: ours[our_name] for our_name, their_name in _name_pairs(config["depth"], guidance_embed)}
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
    for our_name, their_name in _name_pairs(config["depth"], config["guidance_embed"]):  # block 0's come first, kept
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
#                    The code a pipeline folder carries                         #
#################################################################################
# diffusers loads a component whose model_index.json entry is [module, class] from <component>/<module>.py when the
# folder has that file and the caller passes trust_remote_code=True (pipeline_loading_utils.get_class_obj_and_candidates),
# and a pipeline class named [module, class] in _class_name from <folder>/<module>.py. The file is dit_pipeline.py
# itself with its imports from this project replaced by the definitions they name (and theirs, recursively), so it
# runs without the project and no second copy of the code exists.

def _is_project_module(name):
    """Whether module `name` is one of this project's files (not torch, diffusers, the standard library)."""
    spec = importlib.util.find_spec(name.split(".")[0])
    origin = getattr(spec, "origin", None) or ""
    return os.path.abspath(origin).startswith(PROJECT_ROOT + os.sep)


def _module_tree(name):
    module = importlib.import_module(name)
    source = inspect.getsource(module)
    return source, ast.parse(source)


def _top_level_names(node):
    """The names a top-level statement binds (a def, a class, an assignment)."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return [target.id for target in targets if isinstance(target, ast.Name)]


def _used_names(node):
    """The names a statement reads that it does not bind itself (its arguments and local assignments excluded)."""
    bound = {arg.arg for sub in ast.walk(node) if isinstance(sub, ast.arguments)
             for arg in sub.posonlyargs + sub.args + sub.kwonlyargs + [sub.vararg, sub.kwarg] if arg is not None}
    read = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)}
    return sorted(read - bound - set(_top_level_names(node)))


def _segment(source, node):
    """A top-level statement's source lines, its decorators included."""
    first = min([node.lineno] + [decorator.lineno for decorator in getattr(node, "decorator_list", [])])
    return "\n".join(source.splitlines()[first - 1:node.end_lineno])


def _import_of(node, name):
    """(module, original name or None for `import module`) that an import statement binds `name` to, else None."""
    for alias in node.names:
        bound = alias.asname or alias.name.split(".")[0]
        if bound == name:
            if isinstance(node, ast.ImportFrom):
                return node.module, alias.name
            return alias.name, None
    return None


def _check_folder_import(module, statement):
    package = module.split(".")[0]
    if package not in FOLDER_CODE_PACKAGES and package not in sys.stdlib_module_names:
        raise RuntimeError(f"the pipeline folder's code would import {package} ({statement}), which a Python with "
                           f"diffusers alone lacks: keep dit_pipeline.py's dependencies to "
                           f"{', '.join(sorted(FOLDER_CODE_PACKAGES))} and the standard library")


def _inline(module_name, name, definitions, imports, seen):
    """Add the definition of `name` in project module `module_name` to `definitions` (dependencies first) and the
    imports of other libraries it needs to `imports`."""
    if (module_name, name) in seen:
        return
    seen.add((module_name, name))
    source, tree = _module_tree(module_name)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and _import_of(node, name):
            target, original = _import_of(node, name)
            if _is_project_module(target):
                if original is None or original != name:
                    raise RuntimeError(f"{module_name} binds {name} by `{ast.unparse(node)}`; the folder's code "
                                       f"inlines only `from <project module> import name`")
                _inline(target, original, definitions, imports, seen)
            else:
                statement = f"from {target} import {original}" if original else f"import {target}"
                statement += f" as {name}" if name != (original or target) else ""
                _check_folder_import(target, statement)
                imports.setdefault(statement)
            return
        if name in _top_level_names(node):
            for used in _used_names(node):
                if any(used in _top_level_names(other) or (isinstance(other, (ast.Import, ast.ImportFrom)) and
                                                           _import_of(other, used)) for other in tree.body):
                    _inline(module_name, used, definitions, imports, seen)
            if name in definitions:
                raise RuntimeError(f"{name} is defined in two modules the folder's code inlines")
            definitions[name] = f"# from {module_name}.py\n{_segment(source, node)}"
            return
    raise RuntimeError(f"{module_name} defines no {name}")


def folder_code():
    """dit_pipeline.py as one file that needs no project: its `from <project module> import ...` lines replaced by
    those definitions (and what they use); everything else as written."""
    source, tree = _module_tree(dit_pipeline.__name__)
    lines = source.splitlines()
    definitions, imports, seen, project_imports = {}, {}, set(), []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and _is_project_module(node.module):
            project_imports.append(node)
            for alias in node.names:
                if alias.asname:
                    raise RuntimeError(f"dit_pipeline.py imports {alias.name} as {alias.asname}; import it by name")
                _inline(node.module, alias.name, definitions, imports, seen)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            _check_folder_import(node.module if isinstance(node, ast.ImportFrom) else node.names[0].name,
                                 ast.unparse(node))
    own_imports = {ast.unparse(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    first, last = project_imports[0].lineno, project_imports[-1].end_lineno
    header = ("# Generated by this DiT project's convert_diffusers.py from its dit_pipeline.py, with the definitions\n"
              "# it imports from the project inlined (each marked with its module). Do not edit: regenerate it.")
    needed = [statement for statement in imports if statement not in own_imports]
    inlined = "\n".join(needed) + "\n\n\n" + "\n\n\n".join(definitions.values())
    return "\n".join([header, *lines[:first - 1], inlined, *lines[last:]]) + "\n"


def write_folder_code(folder, components):
    """The folder's code (folder_code) in every component subfolder that names FOLDER_MODULE in model_index.json,
    and at the top when the pipeline class is one of dit_pipeline's; model_index.json names FOLDER_MODULE for them
    (diffusers writes the module the classes were imported from)."""
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as f:
        index = json.load(f)
    code = folder_code()
    for name, component in components.items():
        if type(component).__module__ == dit_pipeline.__name__:
            index[name] = [FOLDER_MODULE, type(component).__name__]
            with open(os.path.join(folder, name, f"{FOLDER_MODULE}.py"), "w") as f:
                f.write(code)
    if index["_class_name"] == GuidanceEmbeddedDiTPipeline.__name__:
        index["_class_name"] = [FOLDER_MODULE, GuidanceEmbeddedDiTPipeline.__name__]
        with open(os.path.join(folder, f"{FOLDER_MODULE}.py"), "w") as f:
            f.write(code)
    with open(index_path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")


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
    if model.w_embedder is not None and not spec.guidance_range:
        raise UserError(f"this {spec.method}-distilled DiT takes the guidance scale w as an input, but its "
                        f"checkpoint's sampling entry names no guidance_range: pass the checkpoint train.py wrote")
    x_eps = spec.parametrisation == "x-eps"
    guidance_range = spec.guidance_range if model.w_embedder is not None else None
    transformer = dit_to_diffusers(model, XEpsDiTTransformer2DModel if x_eps else OriginalDiTTransformer2DModel,
                                   guidance_range)
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
    """The transformer folder (pipeline=False) or a complete pipeline folder at `out` (DiTPipeline, or
    GuidanceEmbeddedDiTPipeline for a w input) that carries its code (write_folder_code), with SIDECAR."""
    transformer, sidecar = project_transformer(model, data)

    def write(folder):
        if pipeline:
            from diffusers import DiTPipeline
            guided = transformer.config.guidance_range is not None
            components = dict(transformer=transformer, vae=pipeline_decoder(data, vae),
                              scheduler=pipeline_scheduler(data))
            (GuidanceEmbeddedDiTPipeline if guided else DiTPipeline)(**components).save_pretrained(folder)
            write_folder_code(folder, components)
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
        if args.pipeline:
            with open(os.path.join(args.out, "model_index.json")) as f:
                kind = json.load(f)["_class_name"]
            print(f"wrote {args.out}: {kind} with a {type(transformer).__name__} of {dict(transformer.config)}")
            print(f"load it with diffusers alone (trust_remote_code runs the folder's {FOLDER_MODULE}.py files): "
                  f"from diffusers import DiffusionPipeline; "
                  f"DiffusionPipeline.from_pretrained({args.out!r}, trust_remote_code=True)")
        else:
            print(f"wrote {args.out}: {type(transformer).__name__} of {dict(transformer.config)}")
            print(f"load it in this project: import dit_pipeline; dit_pipeline.{type(transformer).__name__}"
                  f".from_pretrained(...), or convert it back with --from-diffusers (a folder that travels: "
                  f"--pipeline)")
    else:
        model, entries = read_diffusers(args.from_diffusers, args.class_dropout_prob, args.allow_unshared_embedders)
        state_dict = model.state_dict()
        # "ema" and "model" share their tensors, which torch.save stores once.
        save_checkpoint_atomic({"config": model.config, "ema": state_dict, "model": state_dict, **entries}, args.out)
        print(f"wrote {args.out}: DiT {model.config}, {entries['data']}")


if __name__ == "__main__":
    run_script(main, parse_args)
