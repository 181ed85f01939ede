"""Teacher-to-student distillation for DiT: the block map, feature projections, the KD losses and the stage schedule.

The method: a frozen teacher supervises a smaller student through
- its predicted noise (MSE),
- its per-block features (MSE after a learned projection where the widths differ),
- its output distribution at temperature T (softmax KL, or the KL between the two Gaussians p(x_{t-1} | x_t)),
on top of the student's own diffusion loss, trained in stages warmup -> feature -> joint. SizeDistillation at the
bottom is the method train.py's loop runs (--distillation): its teacher, student, projections, flags and stages.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import UserError, non_negative_float, non_negative_int, positive_float, positive_int, read_file
from diffusion import create_diffusion
from diffusion.diffusion_utils import normal_kl
from diffusion.gaussian_diffusion import mean_flat
from method import PlainTraining, TrainingMethod, check_image_size, derived_seed, freeze
from models import DiT_models, load_state_dict_strict, model_config

STAGES = ("warmup", "feature", "joint")
# The KD terms on top of the student's diffusion loss in each stage (cumulative). Warmup gives the student's blocks the
# teacher's per-block features as hints (FitNets' first stage) while the alignment layers learn; the feature stage adds
# the teacher's predicted noise on top of the features; the joint stage adds the tempered output distribution.
# Chosen by ablation.py over 5 seeds against two other orders (README): a teacher-free warmup wasted a sixth of a short
# run, and noise-first then features lost Frechet distance to any variant with features from the first step.
STAGE_TERMS = {"warmup": ("feature",), "feature": ("feature", "output"), "joint": ("feature", "output", "kl")}


def stage_at(step, warmup_steps, feature_steps, joint_steps):
    """The stage training step `step` (0-based) belongs to."""
    if step < warmup_steps:
        return "warmup"
    if step < warmup_steps + feature_steps:
        return "feature"
    if step < warmup_steps + feature_steps + joint_steps:
        return "joint"
    raise ValueError(f"step {step} is past the last stage ({warmup_steps + feature_steps + joint_steps} steps)")


def teacher_block_indices(student_depth, teacher_depth):
    """Evenly spaced teacher blocks, one per student block.

    Student block i stands for the teacher's i-th group of teacher_depth / student_depth blocks and is matched to the
    group's last block, whose output is what the next group sees: 14 of 28 gives 1, 3, ..., 27; equal depths give
    the identity; the last student block always meets the last teacher block.
    """
    if not 1 <= student_depth <= teacher_depth:
        raise UserError(f"a student of depth {student_depth} cannot map onto a teacher of depth {teacher_depth}")
    return [round((i + 1) * teacher_depth / student_depth) - 1 for i in range(student_depth)]


class FeatureProjections(nn.Module):
    """One linear map per student block from the student's width to the teacher's (identity when they are equal)."""

    def __init__(self, student_dim, teacher_dim, num_blocks):
        super().__init__()
        self.proj = nn.ModuleList([
            nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()
            for _ in range(num_blocks)
        ])

    def forward(self, student_features):
        return [proj(feature) for proj, feature in zip(self.proj, student_features)]  # each (N, T, D_teacher)


def feature_loss(student_features, teacher_features):
    """Mean over blocks of the MSE between per-token layer-normalised features.

    DiT block outputs carry a few huge activations (TinyFusion saw a raw feature loss of 2,840, then NaN); normalising
    every token to zero mean and unit variance over channels on both sides bounds the loss and the gradients.
    """
    losses = []
    for student, teacher in zip(student_features, teacher_features):
        student = F.layer_norm(student.float(), student.shape[-1:])  # (N, T, D)
        teacher = F.layer_norm(teacher.float(), teacher.shape[-1:])  # (N, T, D)
        losses.append(mean_flat((student - teacher) ** 2))  # (N,)
    return torch.stack(losses).mean(0)  # (N,)


def output_loss(student_output, teacher_output, channels):
    """MSE between the teacher's and the student's predicted noise (the first `channels` output channels)."""
    return mean_flat((student_output[:, :channels].float() - teacher_output[:, :channels].float()) ** 2)  # (N,)


def softmax_kl_loss(student_output, teacher_output, temperature):
    """KL(softmax(teacher / T) || softmax(student / T)) over the channel dimension, times T^2 (Hinton et al. 2015).

    Over all output channels (noise and, for learned-sigma models, the variance values): over the noise alone, the
    1-channel digits model would have a one-way softmax and a KL of exactly 0. Averaged over positions: (N,).
    """
    teacher_log_probs = F.log_softmax(teacher_output.float() / temperature, dim=1)  # (N, C_out, H, W)
    student_log_probs = F.log_softmax(student_output.float() / temperature, dim=1)  # (N, C_out, H, W)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(dim=1)  # (N, H, W)
    return mean_flat(kl) * temperature ** 2


def gaussian_kl_loss(diffusion, student_output, teacher_output, x_t, t, temperature):
    """KL(p_teacher(x_{t-1} | x_t) || p_student(x_{t-1} | x_t)) with both outputs tempered, times T^2, in nats per dim.

    The principled alternative to the softmax KL: the two reverse-process Gaussians of p_mean_variance, whose KL is
    the term the variational bound uses (DDPM Eq. 5), here between teacher and student instead of q and p.
    """
    def moments(output):
        return diffusion.p_mean_variance(lambda *args, r=output.float(): r, x_t, t, clip_denoised=False,
                                         temperature=temperature)
    teacher, student = moments(teacher_output), moments(student_output)
    kl = normal_kl(teacher["mean"], teacher["log_variance"], student["mean"], student["log_variance"])
    return mean_flat(kl) * temperature ** 2  # (N,)


def init_student_from_teacher(student, teacher):
    """Copy the teacher's embedders, final layer and evenly spaced blocks into a same-width, shallower student.

    As Distill-SD, BK-SDM and TinyFusion initialise pruned students. Returns the teacher block indices used.
    """
    keys = ("hidden_size", "patch_size", "num_heads", "mlp_ratio", "in_channels", "input_size", "num_classes",
            "learn_sigma")
    mismatched = {k: (student.config[k], teacher.config[k]) for k in keys if student.config[k] != teacher.config[k]}
    if mismatched:
        raise UserError(f"--student-init-from-teacher needs a student of the teacher's shape; (student, teacher) "
                         f"differ in {mismatched}; pick the teacher's --student-model and set --student-depth")
    indices = teacher_block_indices(student.config["depth"], teacher.config["depth"])
    with torch.no_grad():
        for name in ("x_embedder", "t_embedder", "y_embedder", "final_layer"):
            getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
        student.pos_embed.copy_(teacher.pos_embed)
        for student_block, teacher_index in zip(student.blocks, indices):
            student_block.load_state_dict(teacher.blocks[teacher_index].state_dict())
    return indices


#################################################################################
#                     The method train.py runs (--distillation)                 #
#################################################################################

def load_teacher(args, data):
    """The frozen teacher: --teacher-model filled with --teacher-ckpt (raw state_dict or training checkpoint)."""
    teacher = DiT_models[args.teacher_model](input_size=data["input_size"], in_channels=data["in_channels"],
                                             num_classes=data["num_classes"])
    checkpoint = read_file(args.teacher_ckpt, lambda p: torch.load(p, map_location="cpu", weights_only=True),
                           "truncated, or not a DiT checkpoint: pass a complete --teacher-ckpt")
    if "ema" in checkpoint or "model" in checkpoint:  # a training checkpoint: its EMA weights
        checkpoint = checkpoint.get("ema", checkpoint.get("model"))
    load_state_dict_strict(teacher, checkpoint, f"--teacher-ckpt {args.teacher_ckpt} (for --teacher-model "
                                                f"{args.teacher_model})")
    return freeze(teacher, args.precision)


def compute_losses(student, teacher, projections, block_map, diffusion, x0, y, t, noise, drop, stage, args, autocast):
    """Per-example loss terms of one step: the student's diffusion loss and the KD terms its stage adds.

    Returns (total (N,), {name: (N,)}). Teacher and student see the same x_t, t, labels and label drops.
    """
    # The stage's KD terms; a term weighted 0 is not computed (no teacher forward at all when none is left).
    kd_terms = [term for term in STAGE_TERMS[stage] if getattr(args, f"kd_{term}_weight") > 0]
    need_features = "feature" in kd_terms
    x_t = diffusion.q_sample(x0, t, noise=noise)  # (N, C, H, W)
    with autocast:
        out = student(x_t, t, y, return_features=need_features, force_drop_ids=drop)
    student_out, student_features = out if need_features else (out, None)
    student_out = student_out.float()  # (N, C_out, H, W)
    terms = diffusion.hybrid_loss_terms(student_out, x0, x_t, t, noise)
    terms = {"diffusion": terms.pop("loss"), **terms}
    total = terms["diffusion"]
    if not kd_terms:
        return total, terms

    with torch.no_grad(), autocast:
        teacher_out, teacher_features = teacher(x_t, t, y, return_features=True, force_drop_ids=drop)
    teacher_out = teacher_out.float()
    if "feature" in kd_terms:
        aligned = [teacher_features[i] for i in block_map]
        with autocast:  # the projections are matmuls too: bf16 under --precision bf16; the loss stays fp32
            projected = projections(student_features)
        terms["kd_feature"] = feature_loss(projected, aligned)
        total = total + args.kd_feature_weight * terms["kd_feature"]
    if "output" in kd_terms:
        terms["kd_output"] = output_loss(student_out, teacher_out, x0.shape[1])
        total = total + args.kd_output_weight * terms["kd_output"]
    if "kl" in kd_terms:
        if args.kd_kl_type == "softmax":
            terms["kd_kl"] = softmax_kl_loss(student_out, teacher_out, args.kd_temperature)
        else:
            terms["kd_kl"] = gaussian_kl_loss(diffusion, student_out, teacher_out, x_t, t, args.kd_temperature)
        total = total + args.kd_kl_weight * terms["kd_kl"]
    return total, terms


class SizeDistillation(PlainTraining):
    """--distillation: a frozen teacher supervises a smaller student in stages warmup -> feature -> joint; the
    student and the feature projections train together in one update."""
    name = "size-distillation"
    flags = ("student_model", "student_depth", "student_init_from_teacher", "kd_output_weight", "kd_feature_weight",
             "kd_kl_weight", "kd_kl_type", "kd_temperature", "warmup_steps", "feature_steps", "joint_steps")

    def __init__(self, args, data, device):  # not PlainTraining's: the teacher loads before the seeded student
        TrainingMethod.__init__(self, args, data, device)
        self.frozen["teacher"] = load_teacher(args, data)
        torch.manual_seed(derived_seed(args.seed, "init"))  # the same initial student and projections everywhere
        student = self.build_student(args.student_model, args.student_depth)
        if args.student_init_from_teacher:
            init_student_from_teacher(student, self.teacher)
        self.block_map = teacher_block_indices(student.config["depth"], self.teacher.config["depth"])
        projections = FeatureProjections(student.config["hidden_size"], self.teacher.config["hidden_size"],
                                         student.config["depth"])
        self.trainable = {"student": student, "projections": projections}
        self.diffusion = create_diffusion(timestep_respacing="", learn_sigma=student.config["learn_sigma"])
        self.stage = None

    @property
    def teacher(self):
        return self.frozen["teacher"]

    @staticmethod
    def add_args(parser):
        student = parser.add_argument_group("student (with --distillation)")
        student.add_argument("--student-model", choices=list(DiT_models), default=None,
                             help="student architecture")
        student.add_argument("--student-depth", type=positive_int, default=None,
                             help="override the student's number of blocks (e.g. 14 for a half-depth DiT-XL/2)")
        student.add_argument("--student-init-from-teacher", action="store_true",
                             help="start from the teacher's embedders, final layer and evenly spaced blocks "
                                  "(needs the teacher's width)")
        kd = parser.add_argument_group("knowledge distillation losses (with --distillation)")
        kd.add_argument("--kd-output-weight", type=non_negative_float, default=1.0,
                        help="weight of the predicted-noise MSE")
        kd.add_argument("--kd-feature-weight", type=non_negative_float, default=0.1,
                        help="weight of the per-block feature MSE")
        kd.add_argument("--kd-kl-weight", type=non_negative_float, default=0.5,
                        help="weight of the output-distribution KL")
        kd.add_argument("--kd-kl-type", choices=["softmax", "gaussian"], default="softmax",
                        help="softmax: KL of channel softmaxes at temperature T, times T^2 (the method's formula); "
                             "gaussian: KL between the tempered Gaussians p(x_{t-1}|x_t) of teacher and student")
        kd.add_argument("--kd-temperature", type=positive_float, default=2.0, help="distillation temperature T")
        stages = parser.add_argument_group("stages (with --distillation)")
        stages.add_argument("--warmup-steps", type=non_negative_int, default=100_000,
                            help="steps of diffusion loss + per-block feature distillation")
        stages.add_argument("--feature-steps", type=non_negative_int, default=200_000,
                            help="steps adding output (noise) MSE distillation")
        stages.add_argument("--joint-steps", type=non_negative_int, default=300_000,
                            help="steps adding the tempered output-distribution KL")

    @classmethod
    def check_args(cls, parser, args):
        if not (args.teacher_model and args.teacher_ckpt and args.student_model):
            parser.error("--distillation needs --teacher-model, --teacher-ckpt and --student-model")
        if args.model:
            parser.error("--model is for plain training; with --distillation name the student with --student-model")
        if args.max_steps is not None:
            parser.error("with --distillation the run lasts --warmup-steps + --feature-steps + --joint-steps; "
                         "drop --max-steps")
        if args.warmup_steps + args.feature_steps + args.joint_steps < 1:
            parser.error("the stages add up to no steps")
        if not os.path.isfile(args.teacher_ckpt):
            parser.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
        if args.student_init_from_teacher and (model_config(args.student_model)["hidden_size"]
                                               != model_config(args.teacher_model)["hidden_size"]):
            parser.error("--student-init-from-teacher copies teacher blocks, so the student needs the teacher's "
                         "width: use --student-model of the teacher's size with a smaller --student-depth")
        check_image_size(parser, args, args.student_model)

    @staticmethod
    def total_steps(args):
        return args.warmup_steps + args.feature_steps + args.joint_steps

    def stage_at(self, step):
        return stage_at(step, self.args.warmup_steps, self.args.feature_steps, self.args.joint_steps)

    def label(self, step):
        return self.stage_at(step)

    def begin_step(self, step, ema):
        stage, previous = self.stage_at(step), self.stage
        self.stage = stage
        if stage == previous:  # a resumed run logs the stage it resumes in
            return None, ()
        return f"step {step}: stage {stage} (loss = diffusion" + "".join(
            f" + {getattr(self.args, f'kd_{term}_weight')} * kd_{term}" for term in STAGE_TERMS[stage]) + ")", ()

    def loss(self, update, nets, x0, y, draws, autocast):
        return compute_losses(nets["student"], nets["teacher"], nets["projections"], self.block_map, self.diffusion,
                              x0, y, draws["t"], draws["noise"], draws["drop"], self.stage, self.args, autocast)

    def scalars(self):
        return {"train/stage": STAGES.index(self.stage)}

    def state_dict(self):
        return {"stage": self.stage}

    def describe(self):
        return f"student block i <- teacher block {self.block_map}"
