"""Teacher-to-student distillation for DiT: the block map, feature projections, the KD losses and the stage schedule.

The method: a frozen teacher supervises a smaller student through
- its predicted noise (MSE),
- its per-block features (MSE after a learned projection where the widths differ),
- its output distribution at temperature T (softmax KL, or the KL between the two Gaussians p(x_{t-1} | x_t)),
on top of the student's own diffusion loss, trained in stages warmup -> feature -> joint.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusion.gaussian_diffusion import mean_flat
from diffusion.diffusion_utils import normal_kl

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
        raise ValueError(f"a student of depth {student_depth} cannot map onto a teacher of depth {teacher_depth}")
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
        raise ValueError(f"--student-init-from-teacher needs a student of the teacher's shape; (student, teacher) "
                         f"differ in {mismatched}; pick the teacher's --student-model and set --student-depth")
    indices = teacher_block_indices(student.config["depth"], teacher.config["depth"])
    with torch.no_grad():
        for name in ("x_embedder", "t_embedder", "y_embedder", "final_layer"):
            getattr(student, name).load_state_dict(getattr(teacher, name).state_dict())
        student.pos_embed.copy_(teacher.pos_embed)
        for student_block, teacher_index in zip(student.blocks, indices):
            student_block.load_state_dict(teacher.blocks[teacher_index].state_dict())
    return indices
