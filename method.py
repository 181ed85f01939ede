"""The training-method protocol that train.py's loop runs, and plain training as its simplest method.

A method is an object that owns everything that differs between training recipes; the loop owns what they share
(data order, seeding, DDP, --compile, backward / clipping / finite check / AdamW step, EMA, logging, checkpoints):

- networks: `trainable` (name -> nn.Module; "student" is the network the run ships: its EMA is kept, its config is
  the checkpoint's) and `frozen` (name -> nn.Module: a teacher, an EMA target). The loop wraps every trainable
  network in DDP and --compile, compiles the frozen ones, and checkpoints the trainable ones ("student" as "model",
  the others under their names).
- updates: a list of Update(name, networks, lr, every). At each iteration the loop runs, in list order, every update
  with step % every == 0: loss(update, ...), backward, gradient sync, clipping, a finite check and its own AdamW's
  step (checkpoint key "opt" for the first update, "opt_<name>" for the others). While an update runs, the trainable
  networks it does not train are frozen (no gradients).
- randomness(generator, batch, shape): this step's random tensors for the whole global batch; the loop seeds the
  generator from (seed, step) and gives each rank its slice, so N processes equal one and a resumed run continues.
- flags: add_args(parser) adds the method's argparse group (train.py calls it once per defining class, so --help lists
  every method's); `flags` names the method-owned flags it reads (any other method's flag given is an error);
  check_args(parser, args) validates them.
- state: begin_step (a new stage or round: a message, and the updates whose optimizer restarts), end_step, label,
  scalars (what it logs beside its loss terms), state_dict / load_state_dict (what its checkpoint keeps beyond the
  networks and optimizers), sampling() (a sampling.SamplingSpec: the checkpoint's "sampling" entry).

Adding a method is one module with such a class and one line in train.py's METHODS.
"""
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from diffusion import create_diffusion
from models import VAE_DOWNSAMPLE, DiT, DiT_models, model_config
from sampling import DIFFUSION_STEPS, SamplingSpec


@dataclass(frozen=True)
class Update:
    """One optimizer step of a method: the trainable networks it steps, its learning rate, how often it runs."""
    name: str
    networks: tuple
    lr: float
    weight_decay: float = 0.0
    every: int = 1  # runs at the iterations where step % every == 0 (DMD2's generator: every 5th)

    def runs_at(self, step):
        return step % self.every == 0


def derived_seed(*parts):
    """A 63-bit seed from (seed, purpose, step, rank, ...): the same parts give the same stream after a resume."""
    words = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]  # str hash() is salted
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def freeze(model, precision):
    """A teacher frozen three ways (no grads, eval mode, and the methods call it under no_grad), in bf16 under
    --precision bf16 (it is only ever run forward)."""
    model.requires_grad_(False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return model.eval().to(dtype=dtype)


class TrainingMethod:
    """The defaults every method shares: one update of the student at --lr, no state, no scalars of its own."""
    name = "plain"
    flags = ()  # the method-owned flags (argparse dests) this method reads
    step_method = False  # listed under --step-distillation
    fixed_on_resume = ()  # flags that may otherwise change on resume but not for this method

    def __init__(self, args, data, device):
        self.args, self.data = args, data
        self.trainable, self.frozen = {}, {}

    @staticmethod
    def add_args(parser):
        pass

    @classmethod
    def check_args(cls, parser, args):
        pass

    @staticmethod
    def total_steps(args):
        return args.max_steps

    def updates(self):
        return [Update("student", tuple(self.trainable), self.args.lr, self.args.weight_decay)]

    def randomness(self, generator, batch, shape):
        raise NotImplementedError

    def loss(self, update, nets, x0, y, draws, autocast):
        """(per-example loss (N,), {term: (N,)}) of `update`; nets: name -> the module to call (wrapped)."""
        raise NotImplementedError

    def begin_step(self, step, ema):
        """(a message to log or None, names of the updates whose optimizer restarts now)."""
        return None, ()

    def end_step(self, step):
        pass

    def label(self, step):
        return self.name

    def scalars(self):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, checkpoint):
        pass

    def describe(self):
        return ""

    def sampling(self):
        """How the student samples (sampling.SamplingSpec; its to_dict() is the checkpoint's "sampling" entry)."""
        return SamplingSpec(method=self.name)


def check_image_size(parser, args, name):
    """--image-size must give model `name` a whole number of patches: pixels for the digits, latents (image / 8) for
    image folders. (A step-distilled student's size is its teacher's, checked against the data when loaded.)"""
    if args.image_size is None or name is None:
        return
    patch = model_config(name)["patch_size"]
    multiple = patch * (VAE_DOWNSAMPLE if args.data_path else 1)
    if args.image_size % multiple:
        grid = f"latents of image-size / {VAE_DOWNSAMPLE} in patches of {patch}" if args.data_path else \
            f"patches of {patch}"
        parser.error(f"--image-size {args.image_size} must be a multiple of {multiple} for {name} ({grid})")


def diffusion_draws(generator, batch, shape, class_dropout_prob):
    """What the diffusion loss needs per example: a timestep, the noise and whether the label is dropped."""
    t = torch.randint(0, DIFFUSION_STEPS, (batch,), generator=generator)
    noise = torch.randn(batch, *shape, generator=generator)
    drop = (torch.rand(batch, generator=generator) < class_dropout_prob).long()
    return {"t": t, "noise": noise, "drop": drop}


# Ho et al. 2020, Eq. 14 (L_simple), plus the variational bound for the learned variance (Nichol & Dhariwal 2021),
# as the original DiT trains.
class PlainTraining(TrainingMethod):
    """A DiT trained from scratch on the diffusion loss (--model)."""
    flags = ("model",)

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        torch.manual_seed(derived_seed(args.seed, "init"))  # the same initial student everywhere
        self.trainable["student"] = self.build_student(args.model)
        self.diffusion = create_diffusion(timestep_respacing="", learn_sigma=self.student.config["learn_sigma"])

    @property
    def student(self):
        return self.trainable["student"]

    def build_student(self, name, depth=None):
        overrides = dict(input_size=self.data["input_size"], in_channels=self.data["in_channels"],
                         num_classes=self.data["num_classes"])
        if depth:
            overrides["depth"] = depth
        return DiT(**model_config(name, **overrides))

    @staticmethod
    def add_args(parser):
        group = parser.add_argument_group("model (plain training)")
        group.add_argument("--model", choices=list(DiT_models), default=None, help="architecture to train from "
                                                                                    "scratch")

    @classmethod
    def check_args(cls, parser, args):
        given = [f for f in ("teacher_model", "teacher_ckpt") if getattr(args, f)]
        if given or args.student_model or args.student_init_from_teacher:
            parser.error("--teacher-*, --student-model and --student-init-from-teacher need --distillation or "
                         "--step-distillation")
        if not args.model:
            parser.error("plain training needs --model (or pass --distillation)")
        if args.max_steps is None:
            parser.error("plain training needs --max-steps N (N >= 1)")
        check_image_size(parser, args, args.model)

    def randomness(self, generator, batch, shape):
        return diffusion_draws(generator, batch, shape, self.student.config["class_dropout_prob"])

    def loss(self, update, nets, x0, y, draws, autocast):
        x_t = self.diffusion.q_sample(x0, draws["t"], noise=draws["noise"])  # (N, C, H, W)
        with autocast:
            out = nets["student"](x_t, draws["t"], y, force_drop_ids=draws["drop"])  # (N, C_out, H, W)
        terms = self.diffusion.hybrid_loss_terms(out.float(), x0, x_t, draws["t"], draws["noise"])
        terms = {"diffusion": terms.pop("loss"), **terms}
        return terms["diffusion"], terms
