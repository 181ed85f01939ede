"""Adversarial distillation: ADD (Sauer et al. 2023, "Adversarial Diffusion Distillation") with LADD's discriminator
(Sauer et al. 2024, "Fast High-Resolution Image Synthesis with Latent Adversarial Diffusion Distillation"), and the
pieces DMD2 shares: a light discriminator head on DiT block features and the GAN losses.

- the student starts from the teacher (step_distill.FewStepGenerator: x-eps, 1-4 steps on the trailing grid) and,
  as in ADD, sees noised real data: x_s = q_sample(x_0, s) at a grid point s, and predicts x_0 in one step;
- the discriminator is LADD's: the frozen teacher's block features at re-noised inputs (real data and the student's
  x_0, noised to the same t), a trainable FeatureHead per feature level (a latent DiT has no pixel DINOv2, and the
  teacher's features exist at every noise level and in latent space); the logits of the levels are summed;
- ADD's distillation term: the teacher's x_0 at the noised student sample is the target of the student's x_0,
  weighted by alpha_bar_t (more weight where the teacher's estimate is sharp); --adversarial-distill-weight 2.5 is
  ADD's lambda, 0 leaves LADD's purely adversarial objective;
- hinge losses (ADD) or the non-saturating softplus ones (DMD2, StyleGAN).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from checks import UserError, non_negative_float, number_in, positive_float
from diffusion.gaussian_diffusion import mean_flat
from distill import teacher_block_indices
from method import Update
from sampling import DIFFUSION_STEPS, alpha_sigma, denoise, q_sample
from step_distill import FewStepGenerator, generator_x0


class FeatureHead(nn.Module):
    """A realism logit per image from one block's tokens (N, T, D): LayerNorm, a per-token MLP, the mean over tokens.

    The block's tokens already carry the timestep and class through adaLN, so the head needs no conditioning of its
    own. The last layer starts at zero: every logit is 0 (chance) until the head is trained.
    """

    def __init__(self, hidden_size):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, tokens):
        return self.net(tokens.float()).squeeze(-1).mean(1)  # (N, T, D) -> (N, T) -> (N,)


# The non-saturating GAN losses (Goodfellow et al. 2014, Sec. 3) in softplus form, as DMD2 writes them:
# the generator minimises softplus(-D(fake)) = -log sigmoid(D(fake)); the discriminator softplus(D(fake)) +
# softplus(-D(real)). Per example, (N,).
def generator_gan_loss(fake_logits):
    return F.softplus(-fake_logits)


def discriminator_gan_loss(real_logits, fake_logits):
    return F.softplus(fake_logits) + F.softplus(-real_logits)


# The hinge losses (Lim & Ye 2017; ADD, Sauer et al. 2023, Eq. 2 and 3): the generator -D(fake), the discriminator
# relu(1 - D(real)) + relu(1 + D(fake)). Per example, (N,).
def generator_hinge_loss(fake_logits):
    return -fake_logits


def discriminator_hinge_loss(real_logits, fake_logits):
    return F.relu(1 - real_logits) + F.relu(1 + fake_logits)


GAN_LOSSES = {"hinge": (generator_hinge_loss, discriminator_hinge_loss),
              "softplus": (generator_gan_loss, discriminator_gan_loss)}


class FeatureHeads(nn.Module):
    """One FeatureHead per feature level (teacher block); the realism logit is their sum, (N,)."""

    def __init__(self, hidden_size, blocks):
        super().__init__()
        self.blocks = list(blocks)
        self.heads = nn.ModuleList([FeatureHead(hidden_size) for _ in self.blocks])

    def forward(self, features):
        return sum(head(features[b]) for head, b in zip(self.heads, self.blocks))


def adversarial_distill_loss(student_x0, teacher_x0, t):
    """ADD's distillation term (Sauer et al. 2023, Eq. 5, squared L2): c(t) ||x_0 - sg(teacher's x_0)||^2 with
    c(t) = alpha_bar_t, per example (N,)."""
    alpha, _ = alpha_sigma(t)
    return alpha.flatten() ** 2 * mean_flat((student_x0 - teacher_x0.detach()) ** 2)


class AdversarialDistillation(FewStepGenerator):
    """The student and the discriminator heads (an update each, every iteration), the frozen teacher that gives the
    discriminator its features and the distillation term its target."""
    name = "adversarial"
    summary = "ADD with LADD's discriminator on the teacher's features (Sauer et al. 2023, 2024)"
    flags = ("sampling_steps", "generator_init", "adversarial_disc_lr", "adversarial_loss",
             "adversarial_distill_weight", "adversarial_gan_weight", "adversarial_levels", "adversarial_max_t")

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        depth = self.teacher.config["depth"]
        if args.adversarial_levels > depth:
            raise UserError(f"--adversarial-levels {args.adversarial_levels}: the teacher has {depth} blocks")
        blocks = teacher_block_indices(args.adversarial_levels, depth)  # evenly spaced, the last block included
        self.trainable["discriminator"] = FeatureHeads(self.teacher.config["hidden_size"], blocks)

    def check_teacher(self, teacher_sampling):
        if self.teacher_parametrisation != "eps" or self.teacher.w_embedder is not None:
            raise UserError("adversarial distillation needs a diffusion model as its teacher (an eps-predicting "
                            "DiT without a w input); give a plain or size-distilled checkpoint as --teacher-ckpt")

    @staticmethod
    def add_args(parser):
        group = parser.add_argument_group("adversarial distillation (--step-distillation adversarial; "
                                          "--sampling-steps: its grid, 1, 2 or 4; --lr: the student's learning rate)")
        group.add_argument("--adversarial-disc-lr", type=positive_float, default=None,
                           help="AdamW learning rate of the discriminator heads (default: --lr)")
        group.add_argument("--adversarial-loss", choices=list(GAN_LOSSES), default="hinge",
                           help="hinge (ADD) or softplus (non-saturating) GAN losses")
        group.add_argument("--adversarial-distill-weight", type=non_negative_float, default=2.5,
                           help="weight of ADD's distillation term (ADD's lambda 2.5; 0: LADD, adversarial only)")
        group.add_argument("--adversarial-gan-weight", type=non_negative_float, default=1.0,
                           help="weight of the student's adversarial loss")
        group.add_argument("--adversarial-levels", type=number_in(int, 1), default=4,
                           help="teacher blocks (evenly spaced, the last included) that get a discriminator head")
        group.add_argument("--adversarial-max-t", type=number_in(int, 1, DIFFUSION_STEPS), default=DIFFUSION_STEPS,
                           help="the discriminator sees inputs re-noised at t ~ U[0, N)")

    def updates(self):
        args = self.args
        return [Update("student", ("student",), args.lr, args.weight_decay),
                Update("discriminator", ("discriminator",), args.adversarial_disc_lr or args.lr, args.weight_decay)]

    def randomness(self, generator, batch, shape):
        draws = {"grid_uniform": torch.rand(batch, generator=generator),
                 "t_gan": torch.randint(0, self.args.adversarial_max_t, (batch,), generator=generator),
                 "t_distill": torch.randint(0, DIFFUSION_STEPS, (batch,), generator=generator)}
        for name in ("noise", "noise_gan", "noise_distill"):
            draws[name] = torch.randn(batch, *shape, generator=generator)
        return draws

    def student_x0(self, student, x0, y, draws):
        """ADD's student step: x_0 = G(q_sample(x_0, s), s) at a grid point s of noised real data."""
        index = (draws["grid_uniform"] * len(self.grid)).long().clamp(max=len(self.grid) - 1)
        s = torch.tensor(self.grid, device=x0.device)[index]
        return generator_x0(student, q_sample(x0, s, draws["noise"]), s, y)

    def realism(self, teacher, heads, x, t, noise, y):
        """The heads' logits (N,) on the teacher's block features at q_sample(x, t, noise). The teacher is frozen
        (no grads, eval) but not under no_grad here: the student's gradient flows through it to its sample."""
        _, features = teacher(q_sample(x, t, noise), t, y, return_features=True, force_drop_ids=torch.zeros_like(y))
        return heads(features)

    def loss(self, update, nets, x0, y, draws, autocast):
        args = self.args
        generator_loss, discriminator_loss = GAN_LOSSES[args.adversarial_loss]
        with autocast:
            if update.name == "discriminator":
                with torch.no_grad():
                    fake = self.student_x0(nets["student"], x0, y, draws)
                both = torch.cat([x0, fake])  # real and fake in one forward of the teacher and of the heads (DDP)
                logits = self.realism(nets["teacher"], nets["discriminator"], both, draws["t_gan"].repeat(2),
                                      draws["noise_gan"].repeat(2, 1, 1, 1), y.repeat(2))
                loss = discriminator_loss(*logits.chunk(2))
                return loss, {"discriminator": loss}
            x = self.student_x0(nets["student"], x0, y, draws)
            terms = {"adversarial": generator_loss(self.realism(nets["teacher"], nets["discriminator"], x,
                                                                draws["t_gan"], draws["noise_gan"], y))}
            total = args.adversarial_gan_weight * terms["adversarial"]
            if args.adversarial_distill_weight > 0:
                with torch.no_grad():
                    x_t = q_sample(x, draws["t_distill"], draws["noise_distill"])
                    teacher_x0, _ = denoise(nets["teacher"], "eps", x_t, draws["t_distill"], y)
                terms["distill"] = adversarial_distill_loss(x, teacher_x0, draws["t_distill"])
                total = total + args.adversarial_distill_weight * terms["distill"]
            return total, terms
