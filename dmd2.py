"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"): a 1-4 step
generator trained so that its samples' distribution matches the teacher's, with the gradient of the KL between them
estimated by two scores at noised generator samples.

- the real score is the frozen teacher (optionally classifier-free-guided at --dmd2-real-guidance);
- the fake score is a second DiT, started from the teacher and trained online with the denoising loss on
  stop-gradient generator samples, so that it tracks the generator's distribution;
- the two time-scale update rule: the fake score (and the GAN head) update every iteration, the generator every
  --dmd2-generator-every-th (DMD2: 5), each with its own AdamW and learning rate;
- a GAN term: FeatureHead (adversarial.py) on the fake score's middle block at noised inputs, real data against
  generator samples (DMD2's diffusion GAN), non-saturating losses;
- multi-step: the generator trains at every point of the trailing grid (999, 749, 499, 249 for 4 steps) with
  backward simulation (step_distill.py), so one checkpoint samples in 1, 2 or 4 steps.
The generator is step_distill's x-eps student (well posed at t = 999, where eps -> x_0 multiplies the error by 156).
"""
import copy

import torch

from adversarial import FeatureHead, discriminator_gan_loss, generator_gan_loss
from checks import UserError, non_negative_float, number_in, positive_float, positive_int
from diffusion.gaussian_diffusion import mean_flat
from method import Update
from sampling import DIFFUSION_STEPS, denoise, q_sample
from step_distill import FewStepGenerator

# DMD2's range of the distribution-matching timesteps: U[0.02 T, 0.98 T] (min / max_step_percent).
DM_MIN_STEP, DM_MAX_STEP = int(0.02 * DIFFUSION_STEPS), int(0.98 * DIFFUSION_STEPS)


# Yin et al. 2024 (DMD, Eq. 7, and DMD2's normalisation): the KL gradient at a generator sample x is estimated by
# the two scores' x_0 at x_t = q_sample(x, t): grad = (x0_fake - x0_real) / mean|x - x0_real|, applied through
# 0.5 ||x - sg(x - grad)||^2, whose gradient with respect to x is exactly grad.
def distribution_matching_loss(real_score, fake_score, x, y, t, noise, real_guidance=None):
    """Per-example loss (N,) and the gradient it applies (N, C, H, W). real_guidance: (N,) classifier-free guidance
    scales of the real score (None: unguided)."""
    with torch.no_grad():
        x_t = q_sample(x, t, noise)
        real_x0, _ = denoise(real_score, "eps", x_t, t, y, real_guidance)
        fake_x0, _ = denoise(fake_score, "eps", x_t, t, y)
        weight = (x - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True)
        grad = torch.nan_to_num((fake_x0 - real_x0) / weight)
    return 0.5 * mean_flat((x - (x - grad).detach()) ** 2), grad


# DMD2 (compute_loss_fake): the fake score learns the denoising loss of the generator's current samples, here DiT's
# own eps-prediction MSE (Ho et al. 2020, Eq. 14) at t ~ U[0, T); the samples carry no gradient to the generator.
def fake_score_loss(fake_score_output, x_t_noise):
    """Per-example loss (N,) from the fake score's output at q_sample(sg(x), t, noise) and that noise."""
    channels = x_t_noise.shape[1]
    return mean_flat((fake_score_output[:, :channels].float() - x_t_noise) ** 2)


class DMD2(FewStepGenerator):
    """The generator ("student"), the fake score and its GAN head (trained together, every iteration), the frozen
    teacher as the real score."""
    name = "dmd2"
    summary = "distribution matching distillation with a fake score, the two time-scale rule and a GAN term " \
              "(Yin et al. 2024)"
    flags = ("sampling_steps", "generator_init", "dmd2_generator_every", "dmd2_fake_lr", "dmd2_real_guidance",
             "dmd2_gan_generator_weight", "dmd2_gan_discriminator_weight", "dmd2_gan_max_t")

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        fake_score = copy.deepcopy(self.teacher).float().requires_grad_(True).train()
        self.trainable["fake_score"] = fake_score
        self.trainable["discriminator"] = FeatureHead(fake_score.config["hidden_size"])
        self.feature_block = fake_score.config["depth"] // 2 - 1  # the middle block (DMD2: the UNet's bottleneck)

    def check_teacher(self, teacher_sampling):
        if self.teacher_parametrisation != "eps" or self.teacher.w_embedder is not None:
            raise UserError(f"dmd2 needs a diffusion model as its real score (an eps-predicting DiT without a w "
                            f"input: a plain or size-distilled one); this teacher is a {teacher_sampling.method} "
                            f"student ({teacher_sampling.parametrisation}). Give its own teacher as --teacher-ckpt")
        if self.args.dmd2_real_guidance != 1 and self.teacher.config["class_dropout_prob"] == 0:
            raise UserError(f"--dmd2-real-guidance {self.args.dmd2_real_guidance}: the teacher was trained without "
                            f"label dropout, so it has no null label to guide against; use 1")

    @staticmethod
    def add_args(parser):
        group = parser.add_argument_group("DMD2 (--step-distillation dmd2; --sampling-steps: the grid it trains on, "
                                          "1, 2 or 4; --lr: the generator's learning rate)")
        group.add_argument("--dmd2-generator-every", type=positive_int, default=5,
                           help="the generator updates at every N-th iteration, the fake score at every one "
                                "(DMD2's two time-scale rule: 5)")
        group.add_argument("--dmd2-fake-lr", type=positive_float, default=None,
                           help="AdamW learning rate of the fake score and the GAN head (default: --lr)")
        group.add_argument("--dmd2-real-guidance", type=number_in(float, 1), default=1.0,
                           help="classifier-free guidance scale of the real score (1: none, as DMD2 on ImageNet; "
                                "DMD2 used 1.75 on SD1.5)")
        group.add_argument("--dmd2-gan-generator-weight", type=non_negative_float, default=3e-3,
                           help="weight of the generator's GAN loss (DMD2 ImageNet-64: 3e-3; 0: DMD without GAN)")
        group.add_argument("--dmd2-gan-discriminator-weight", type=non_negative_float, default=1e-2,
                           help="weight of the GAN head's loss in the fake-score update (DMD2 ImageNet-64: 1e-2)")
        group.add_argument("--dmd2-gan-max-t", type=number_in(int, 1, DIFFUSION_STEPS), default=DIFFUSION_STEPS,
                           help="the GAN head sees inputs noised at t ~ U[0, N) (DMD2's diffusion GAN: 1000)")

    def updates(self):
        args = self.args
        return [Update("student", ("student",), args.lr, args.weight_decay, every=args.dmd2_generator_every),
                Update("fake_score", ("fake_score", "discriminator"), args.dmd2_fake_lr or args.lr,
                       args.weight_decay)]

    def randomness(self, generator, batch, shape):
        draws = self.generator_draws(generator, batch, shape)
        draws["t_dm"] = torch.randint(DM_MIN_STEP, DM_MAX_STEP + 1, (batch,), generator=generator)
        draws["t_fake"] = torch.randint(0, DIFFUSION_STEPS, (batch,), generator=generator)
        draws["t_gan"] = torch.randint(0, self.args.dmd2_gan_max_t, (batch,), generator=generator)
        for name in ("noise_dm", "noise_fake", "noise_gan", "noise_gan_real"):
            draws[name] = torch.randn(batch, *shape, generator=generator)
        return draws

    def realism(self, fake_score, head, x_t, t, y):
        """The GAN head's logits (N,) on the fake score's middle-block tokens at x_t."""
        _, features = fake_score(x_t, t, y, return_features=True, force_drop_ids=torch.zeros_like(y))
        return head(features[self.feature_block])

    def loss(self, update, nets, x0, y, draws, autocast):
        args = self.args
        with autocast:
            if update.name == "student":
                return self.generator_loss(nets, y, draws, args)
            return self.fake_score_losses(nets, x0, y, draws, args)

    def generator_loss(self, nets, y, draws, args):
        x = self.generate(nets["student"], draws, y, with_grad=True)  # (N, C, H, W)
        guidance = None if args.dmd2_real_guidance == 1 else torch.full_like(y, args.dmd2_real_guidance,
                                                                             dtype=torch.float)
        dm, _ = distribution_matching_loss(nets["teacher"], nets["fake_score"], x, y, draws["t_dm"],
                                           draws["noise_dm"], guidance)
        terms = {"dm": dm}
        total = dm
        if args.dmd2_gan_generator_weight > 0:
            x_t = q_sample(x, draws["t_gan"], draws["noise_gan"])
            terms["gan_generator"] = generator_gan_loss(self.realism(nets["fake_score"], nets["discriminator"], x_t,
                                                                     draws["t_gan"], y))
            total = total + args.dmd2_gan_generator_weight * terms["gan_generator"]
        return total, terms

    def fake_score_losses(self, nets, x0, y, draws, args):
        x = self.generate(nets["student"], draws, y, with_grad=False).detach()
        n = len(x)
        inputs = [q_sample(x, draws["t_fake"], draws["noise_fake"])]
        timesteps = [draws["t_fake"]]
        gan = args.dmd2_gan_discriminator_weight > 0
        if gan:  # fake and real data noised at the same t, in the same forward
            inputs += [q_sample(x, draws["t_gan"], draws["noise_gan"]), q_sample(x0, draws["t_gan"],
                                                                                 draws["noise_gan_real"])]
            timesteps += [draws["t_gan"], draws["t_gan"]]
        labels = y.repeat(len(inputs))
        out, features = nets["fake_score"](torch.cat(inputs), torch.cat(timesteps), labels, return_features=True,
                                           force_drop_ids=torch.zeros_like(labels))  # one forward (DDP)
        terms = {"fake_denoising": fake_score_loss(out[:n], draws["noise_fake"])}
        total = terms["fake_denoising"]
        if gan:
            logits = nets["discriminator"](features[self.feature_block][n:])
            terms["gan_discriminator"] = discriminator_gan_loss(logits[n:], logits[:n])
            total = total + args.dmd2_gan_discriminator_weight * terms["gan_discriminator"]
        else:  # the head still takes part in the update (a zero-weight term keeps DDP's gradients complete)
            total = total + 0 * nets["discriminator"](features[self.feature_block][:n])
        return total, terms
