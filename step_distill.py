"""Step distillation for DiT: students that sample in 1-8 steps, with one forward per step under guidance.

Each method's loss is one function below, with its paper and equation named above it:
- progressive distillation (Salimans & Ho 2022): one student DDIM step matches two of its teacher's; each round
  halves the steps and the student becomes the next round's teacher;
- consistency distillation (Song et al. 2023), with LCM's skipping interval, multistep sampling and guidance folded
  into the teacher's ODE step (Luo et al. 2023);
- trajectory consistency distillation (TCD, Zheng et al. 2024): consistency distillation in which both sides jump to
  a random earlier time s through the trajectory consistency function, sampled with strategic stochastic sampling;
- guidance distillation (Meng et al. 2023): the student takes the guidance scale w as an input and learns the
  teacher's classifier-free-guided output.
The classes at the bottom hold each method's state (the round's teacher, the EMA target) for train.py's loop. The
schedule, the parametrisations and the students' samplers are sampling.py's.

The progressive and consistency students predict "x-eps" (sampling.py: x_0 = sigma_t^2 x~ + alpha_t (x_t - sigma_t
eps~), Salimans & Ho 2022, App. D), well posed at every noise level. An eps-predicting DiT converts at the start: its
eps channels stay, and the second group (the learned variance, which a deterministic few-step sampler does not use) is
zeroed and retrained as x~; at initialisation x_0 = alpha_t^2 x_0(eps): the teacher's own estimate at low noise.
"""
import copy
import dataclasses
import os

import torch

from checks import UserError, non_negative_float, number_in, positive_int
from diffusion.gaussian_diffusion import mean_flat
from method import TrainingMethod, derived_seed, diffusion_draws, freeze
from models import DiT, load_state_dict_strict, update_ema
from sampling import (DIFFUSION_STEPS, TCD_GAMMA, SamplingSpec, alpha_sigma, consistency_function, ddim_step, denoise,
                      model_output, q_sample, trailing_timesteps, trajectory_consistency_function)


#################################################################################
#                                    Losses                                     #
#################################################################################

# Salimans & Ho 2022, Algorithm 2: two teacher DDIM steps t -> t' -> t'' give the x_0 target whose single DDIM step
# from t lands on the same x_t'', x~ = (x_t'' - (sigma_t''/sigma_t) x_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),
# matched in x-space with the truncated-SNR weight max(alpha_t^2 / sigma_t^2, 1) (their Sec. 4).
def progressive_loss(student, teacher, teacher_parametrisation, x0, y, noise, index, teacher_steps, w=None,
                     drop=None, clip=False):
    """Per-example loss (N,). index: (N,) student steps in [0, teacher_steps / 2) on the trailing grid."""
    grid = torch.tensor(trailing_timesteps(teacher_steps) + [-1], device=x0.device)
    t, t_mid, t_next = grid[2 * index], grid[2 * index + 1], grid[2 * index + 2]
    x_t = q_sample(x0, t, noise)
    target = progressive_target(teacher, teacher_parametrisation, x_t, t, t_mid, t_next, y, w, drop, clip)
    student_x0, _ = denoise(student, "x-eps", x_t, t, y, w, drop)
    alpha_t, sigma_t = alpha_sigma(t)
    weight = (alpha_t ** 2 / sigma_t ** 2).clamp(min=1).flatten()
    return weight * mean_flat((student_x0 - target) ** 2)


@torch.no_grad()
def progressive_target(teacher, teacher_parametrisation, x_t, t, t_mid, t_next, y, w=None, drop=None, clip=False):
    """Algorithm 2's x~: the x_0 whose one DDIM step from t reaches the teacher's two-step x_t''."""
    x_mid = ddim_step(*denoise(teacher, teacher_parametrisation, x_t, t, y, w, drop, clip), t_mid)
    x_next = ddim_step(*denoise(teacher, teacher_parametrisation, x_mid, t_mid, y, w, drop, clip), t_next)
    alpha_t, sigma_t = alpha_sigma(t)
    alpha_next, sigma_next = alpha_sigma(t_next)
    ratio = sigma_next / sigma_t
    return (x_next - ratio * x_t) / (alpha_next - ratio * alpha_t)


# Song et al. 2023, Eq. 7 (consistency distillation, squared L2 distance, lambda = 1), on LCM's grid (Luo et al. 2023,
# Eq. 9): the teacher's DDIM step goes k timesteps back, from t_{n+k} to t_n, and the EMA target network's f at the
# result is the target for the online f at x_{t_{n+k}}. With guidance, w enters the teacher's step and both f's.
def consistency_loss(student, target, teacher, teacher_parametrisation, x0, y, noise, index, skip, w=None, drop=None,
                     clip=False):
    """Per-example loss (N,). index: (N,) grid points in [0, 1000 / skip); t_{n+k} = (index + 1) skip - 1."""
    x_t, t, x_s, s = teacher_ode_step(teacher, teacher_parametrisation, x0, y, noise, index, skip, w, drop, clip)
    with torch.no_grad():
        target_f = consistency_function(target, x_s, s, y, w, drop)
    online_f = consistency_function(student, x_t, t, y, w, drop)
    return mean_flat((online_f - target_f) ** 2)


@torch.no_grad()
def teacher_ode_step(teacher, teacher_parametrisation, x0, y, noise, index, skip, w=None, drop=None, clip=False):
    """(x_{t_{n+k}}, t_{n+k}, x_{t_n}, t_n): the noised data at grid point `index` and the teacher's DDIM step from it
    k = skip timesteps back (LCM's skipping interval), guided at w."""
    t = (index + 1) * skip - 1
    t_n = (t - skip).clamp(min=0)  # the first grid point steps to t = 0, where f is the identity
    x_t = q_sample(x0, t, noise)
    x_n = ddim_step(*denoise(teacher, teacher_parametrisation, x_t, t, y, w, drop, clip), t_n)
    return x_t, t, x_n, t_n


# Zheng et al. 2024 (TCD), the training algorithm (their Algorithm 1, as the authors cite it): Song et al.'s Eq. 7 as
# in consistency_loss, with both the online f at x_{t_{n+k}} and the EMA target's f at the teacher's ODE point
# x_{t_n} mapped by the trajectory consistency function to the same earlier time s = t_m, m drawn uniformly from the
# grid points 0 ... n (s = -1, the clean end: consistency_loss exactly; s = t_n: the target is the teacher's point).
def trajectory_consistency_loss(student, target, teacher, teacher_parametrisation, x0, y, noise, index, s_index, skip,
                                w=None, drop=None, clip=False):
    """Per-example loss (N,). index: (N,) grid points as consistency_loss's; s_index: (N,) in [0, index], s =
    s_index skip - 1."""
    x_t, t, x_n, t_n = teacher_ode_step(teacher, teacher_parametrisation, x0, y, noise, index, skip, w, drop, clip)
    s = s_index * skip - 1
    with torch.no_grad():
        target_x = trajectory_consistency_function(target, x_n, t_n, s, y, w, drop)
    online_x = trajectory_consistency_function(student, x_t, t, s, y, w, drop)
    return mean_flat((online_x - target_x) ** 2)


# Meng et al. 2023, Eq. 7 (stage one): the w-conditioned student matches the teacher's classifier-free-guided output,
# eps_T(x_t, null) + w (eps_T(x_t, y) - eps_T(x_t, null)), for w drawn from the training range; all output channels
# (the variance channels follow the conditional teacher, as forward_with_cfg leaves them).
def guidance_loss(student, teacher, x0, y, noise, t, w):
    """Per-example loss (N,)."""
    x_t = q_sample(x0, t, noise)
    with torch.no_grad():
        guided = model_output(teacher, x_t, t, y, w)
    return mean_flat((model_output(student, x_t, t, y, w).float() - guided.float()) ** 2)


#################################################################################
#                         Students and the methods' state                       #
#################################################################################

def share_at_zero(u, p):
    """u, uniform on [0, 1), made 0 for its share p (u < p) and uniform on [0, 1) again for the rest: a draw that is a
    function of the same uniform whatever p, so resume and the split over processes hold as before."""
    return ((u - p) / (1 - p)).clamp(min=0) if p < 1 else torch.zeros_like(u)


def make_student(teacher, teacher_parametrisation, parametrisation, guidance):
    """A trainable copy of the teacher that predicts in `parametrisation`, with a zero-initialised w-embedding if
    `guidance`. An eps teacher becoming x-eps keeps its eps channels; its variance channels (or, without learned
    sigma, new channels) become x~ with zero weights. Everything else is copied exactly."""
    if teacher_parametrisation == "x-eps" and parametrisation == "eps":
        raise UserError("the teacher is already a few-step (x-eps) student; guidance-distil its eps-predicting "
                         "teacher instead, or pass --guidance-range to progressive or consistency distillation")
    learn_sigma = True if parametrisation == "x-eps" else teacher.config["learn_sigma"]
    student = DiT(**dict(teacher.config, learn_sigma=learn_sigma,
                         guidance_embed=guidance or teacher.w_embedder is not None))
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("final_layer.linear.")}
    if student.w_embedder is not None and teacher.w_embedder is None:
        state.update({k: v for k, v in student.state_dict().items() if k.startswith("w_embedder.")})
    # final_layer.linear's rows are (patch row, patch column, output channel) flattened, channel fastest.
    C, student_out, teacher_out = teacher.in_channels, student.out_channels, teacher.out_channels
    rows = torch.arange(student.final_layer.linear.out_features)
    channel, position = rows % student_out, rows // student_out
    kept = channel < (C if teacher_parametrisation != parametrisation else teacher_out)
    source = position[kept] * teacher_out + channel[kept]
    weight = torch.zeros_like(student.final_layer.linear.weight)
    bias = torch.zeros_like(student.final_layer.linear.bias)
    weight[kept] = teacher.final_layer.linear.weight.detach()[source].to(weight.dtype)  # a bf16 teacher too
    bias[kept] = teacher.final_layer.linear.bias.detach()[source].to(bias.dtype)
    state["final_layer.linear.weight"], state["final_layer.linear.bias"] = weight, bias
    load_state_dict_strict(student, state, "the teacher")
    return student


#################################################################################
#                     The methods train.py runs (--step-distillation)           #
#################################################################################

def load_step_teacher(args, data):
    """The frozen teacher of step distillation and its sampling entry: any DiT checkpoint this project writes (config
    read from it: a plain, size-distilled or step-distilled model) or a raw state_dict with --teacher-model."""
    from models import load_dit_checkpoint
    raw = dict(model_name=args.teacher_model, image_size=data["image_size"], num_classes=data["num_classes"]) \
        if args.teacher_model else {}
    teacher, teacher_data = load_dit_checkpoint(args.teacher_ckpt, **raw)  # a UserError names the file
    shape = {k: teacher.config[k] for k in ("input_size", "in_channels", "num_classes")}
    if shape != {k: data[k] for k in shape} or teacher_data["latent"] != data["latent"]:
        raise UserError(f"the teacher {args.teacher_ckpt} denoises {shape} "
                        f"({'latents' if teacher_data['latent'] else 'pixels'}), the training data is "
                        f"{ {k: data[k] for k in shape} } ({'latents' if data['latent'] else 'pixels'}): train on "
                        f"the teacher's own data")
    return freeze(teacher, args.precision), SamplingSpec.from_checkpoint_entry(teacher_data["sampling"])


class StepDistillation(TrainingMethod):
    """What the step-distillation methods share: the frozen teacher (any checkpoint of this project), a student of
    its own architecture started from its weights (make_student), the guidance range and the step flags.

    clip: clamp x_0 estimates to [-1, 1] in the teacher's steps (pixel models, as their sampler does).
    """
    parametrisation = "x-eps"
    step_method = True
    flags = ("guidance_range", "guidance_min_fraction")

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        teacher, teacher_sampling = load_step_teacher(args, data)
        self.frozen["teacher"] = teacher
        torch.manual_seed(derived_seed(args.seed, "init"))  # the same new weights (a w-embedding) in every run
        self.clip = not data["latent"]
        self.teacher_parametrisation = teacher_sampling.parametrisation
        self.guidance_range = tuple(args.guidance_range or teacher_sampling.guidance_range or ()) or None
        if teacher.w_embedder is not None and not self.guidance_range:
            raise UserError("the teacher is guidance-distilled (it takes w): pass --guidance-range")
        if args.guidance_min_fraction and not self.guidance_range:
            raise UserError(f"--guidance-min-fraction {args.guidance_min_fraction} draws w from a guidance range: "
                            f"pass --guidance-range WMIN WMAX too")
        self.check_teacher(teacher_sampling)
        self.trainable["student"] = make_student(teacher, self.teacher_parametrisation, self.parametrisation,
                                                 bool(self.guidance_range)).float()

    def check_teacher(self, teacher_sampling):
        pass

    @property
    def teacher(self):
        return self.frozen["teacher"]

    @staticmethod
    def add_args(parser):
        steps = parser.add_argument_group(
            "step distillation (--step-distillation): a student of the teacher's own architecture, started from its "
            "weights, that samples in a few steps (--teacher-ckpt: any checkpoint of this project, or a raw "
            "state_dict with --teacher-model); runs --max-steps steps")
        steps.add_argument("--sampling-steps", type=positive_int, default=4,
                           help="steps the student samples in: progressive distils down to it; consistency and tcd "
                                "record it as the checkpoint's default (any count up to 1000 / --consistency-skip "
                                "works)")
        steps.add_argument("--progressive-start-steps", type=number_in(int, 2), default=64,
                           help="DDIM steps of the teacher in the first progressive round (--sampling-steps times a "
                                "power of two); --max-steps is split evenly over the rounds")
        steps.add_argument("--consistency-skip", type=positive_int, default=20,
                           help="skipping interval k: the teacher's DDIM step goes from t to t - k (LCM's 20; "
                                "consistency and tcd)")
        steps.add_argument("--consistency-target-decay", type=number_in(float, 0, 1, high_open=True), default=0.95,
                           help="EMA decay of the consistency (and tcd) target network (LCM's 0.95)")
        steps.add_argument("--guidance-range", type=non_negative_float, nargs=2, metavar=("WMIN", "WMAX"),
                           default=None,
                           help="guidance scales the student learns to take as input (w drawn uniformly; 1 = no "
                                "guidance): required for guidance, optional with progressive or consistency (then "
                                "the teacher's steps are guided, as LCM)")
        steps.add_argument("--guidance-min-fraction", type=number_in(float, 0, 1), default=0.0, metavar="P",
                           help="with --guidance-range: the fraction of examples drawn at WMIN exactly, the rest "
                                "uniform over the range (0: all uniform; more keeps the unguided model's quality "
                                "when WMIN is 1)")
        steps.add_argument("--generator-init", default=None, metavar="CKPT",
                           help="dmd2 and adversarial: start the 1-4 step generator from this few-step (x-eps) "
                                "student of the same teacher, e.g. a consistency student, instead of from the "
                                "teacher (whose x~ head starts at zero, so its 1-step sample starts gray); the fake "
                                "score and the discriminator still start from the teacher")

    @classmethod
    def check_args(cls, parser, args):
        if args.distillation or args.model or args.student_model or args.student_depth or \
                args.student_init_from_teacher:
            parser.error("--step-distillation trains a student of the teacher's own architecture: drop "
                         "--distillation, --model and --student-* (distil the size first, then give that checkpoint "
                         "as --teacher-ckpt)")
        if not args.teacher_ckpt:
            parser.error("--step-distillation needs --teacher-ckpt")
        if not os.path.isfile(args.teacher_ckpt):
            parser.error(f"--teacher-ckpt {args.teacher_ckpt} does not exist")
        if args.max_steps is None:
            parser.error("--step-distillation needs --max-steps N (N >= 1)")
        if args.guidance_range is not None:
            low, high = args.guidance_range
            if low > high:
                parser.error(f"--guidance-range {low} {high}: give WMIN <= WMAX (1 is no guidance)")
            args.guidance_range = [low, high]

    def randomness(self, generator, batch, shape):
        """The diffusion draws, a uniform for the grid point and one for the guidance scale."""
        draws = diffusion_draws(generator, batch, shape, self.student.config["class_dropout_prob"])
        draws["uniform"], draws["w_uniform"] = torch.rand(2, batch, generator=generator)
        return draws

    @property
    def student(self):
        return self.trainable["student"]

    def guidance(self, draws):
        """(w, drop): w drawn from the guidance range (then every label is kept: w = 1 is the conditional model),
        else (None, the step's label drops)."""
        if not self.guidance_range:
            return None, draws["drop"]
        low, high = self.guidance_range
        spread = share_at_zero(draws["w_uniform"], self.args.guidance_min_fraction)
        return low + (high - low) * spread, torch.zeros_like(draws["drop"])

    def describe(self):
        return f"{self.name} distillation"


class ProgressiveDistillation(StepDistillation):
    """Rounds halve the steps from --progressive-start-steps to --sampling-steps; each round's teacher is the EMA of
    the previous round's student (round 0: the given teacher), and the student restarts from it."""
    name = "progressive"
    summary = "rounds halving the DDIM steps (Salimans & Ho 2022)"
    flags = ("progressive_start_steps", "sampling_steps", "guidance_range", "guidance_min_fraction")
    fixed_on_resume = ("max_steps",)  # the rounds split --max-steps evenly, so it fixes where each round starts

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        ratio = args.progressive_start_steps // args.sampling_steps
        if args.progressive_start_steps % args.sampling_steps or ratio < 2 or ratio & (ratio - 1):
            raise UserError(f"--progressive-start-steps {args.progressive_start_steps} must be --sampling-steps "
                            f"{args.sampling_steps} times a power of two >= 2, so that rounds can halve it to "
                            f"{args.sampling_steps} (e.g. 64 -> 32 -> 16 -> 8 -> 4)")
        self.num_rounds = ratio.bit_length() - 1
        if args.max_steps < self.num_rounds:
            raise UserError(f"--max-steps {args.max_steps} is fewer than the {self.num_rounds} rounds")
        self.round_length = args.max_steps // self.num_rounds  # the last round also takes the remainder
        self.round = 0

    def round_at(self, step):
        return min(step // self.round_length, self.num_rounds - 1)

    def teacher_steps(self, round_index):
        return self.args.progressive_start_steps >> round_index

    def label(self, step):
        r = self.round_at(step)
        return f"round {r + 1}/{self.num_rounds}: {self.teacher_steps(r)}->{self.teacher_steps(r) // 2} steps"

    def begin_step(self, step, ema):
        r = self.round_at(step)
        if r == self.round:
            return None, ()
        # Round r starts: the last round's student (its EMA) becomes the teacher and the student starts from it, with
        # a fresh AdamW: the round regresses onto a new target from a new starting point, so the moments of the last
        # round's gradients (and Adam's bias correction at its step count) describe another problem. Salimans & Ho
        # train each round as a run of its own (the learning rate restarts too).
        self.teacher.load_state_dict(ema.state_dict())
        self.student.load_state_dict(ema.state_dict())
        self.teacher_parametrisation, self.round = self.parametrisation, r
        return f"step {step}: {self.label(step)} (the teacher is now the previous round's EMA student)", ("student",)

    def loss(self, update, nets, x0, y, draws, autocast):
        w, drop = self.guidance(draws)
        student_steps = self.teacher_steps(self.round) // 2
        index = (draws["uniform"] * student_steps).long().clamp(max=student_steps - 1)
        with autocast:
            loss = progressive_loss(nets["student"], nets["teacher"], self.teacher_parametrisation, x0, y,
                                    draws["noise"], index, self.teacher_steps(self.round), w, drop, self.clip)
        return loss, {"progressive": loss}

    def state_dict(self):
        return {"round": self.round, "round_teacher": self.teacher.state_dict(),
                "round_teacher_parametrisation": self.teacher_parametrisation}

    def load_state_dict(self, checkpoint):
        self.round = checkpoint["round"]
        self.teacher.load_state_dict(checkpoint["round_teacher"])
        self.teacher_parametrisation = checkpoint["round_teacher_parametrisation"]

    def sampling(self):
        steps = self.teacher_steps(self.round) // 2  # this round's student: a checkpoint at a round's end samples so
        return SamplingSpec("progressive", "x-eps", "ddim-trailing", (steps,), steps, self.guidance_range)


class ConsistencyDistillation(StepDistillation):
    """The online student, an EMA target network of it (decay --consistency-target-decay, LCM's 0.95) and the
    frozen teacher that makes the ODE step."""
    name = "consistency"
    summary = "consistency distillation with multistep sampling (Song et al. 2023, LCM)"
    flags = ("consistency_skip", "consistency_target_decay", "sampling_steps", "guidance_range",
             "guidance_min_fraction")

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        if DIFFUSION_STEPS % args.consistency_skip:
            raise UserError(f"--consistency-skip {args.consistency_skip} must divide {DIFFUSION_STEPS}")
        self.points = DIFFUSION_STEPS // args.consistency_skip
        if not 1 <= args.sampling_steps <= self.points:
            raise UserError(f"--sampling-steps {args.sampling_steps} must lie in [1, {self.points}], the grid of "
                            f"--consistency-skip {args.consistency_skip}")
        self.frozen["target"] = copy.deepcopy(self.student).requires_grad_(False).eval()

    def grid_index(self, draws):
        """(N,) grid points in [0, 1000 / k), uniform."""
        return (draws["uniform"] * self.points).long().clamp(max=self.points - 1)

    def loss(self, update, nets, x0, y, draws, autocast):
        w, drop = self.guidance(draws)
        with autocast:
            loss = consistency_loss(nets["student"], nets["target"], nets["teacher"], self.teacher_parametrisation,
                                    x0, y, draws["noise"], self.grid_index(draws), self.args.consistency_skip, w, drop,
                                    self.clip)
        return loss, {"consistency": loss}

    def end_step(self, step):
        update_ema(self.frozen["target"], self.student, self.args.consistency_target_decay)

    def state_dict(self):
        return {"consistency_target": self.frozen["target"].state_dict()}

    def load_state_dict(self, checkpoint):
        self.frozen["target"].load_state_dict(checkpoint["consistency_target"])

    def sampling(self):
        return SamplingSpec("consistency", "x-eps", "consistency", tuple(range(1, self.points + 1)),
                            self.args.sampling_steps, self.guidance_range, self.args.consistency_skip)


class TrajectoryConsistencyDistillation(ConsistencyDistillation):
    """Consistency distillation (the same teacher step, EMA target, grid and flags) in which both sides jump to a
    random earlier time s (trajectory_consistency_loss); its checkpoint samples with strategic stochastic sampling
    (sampling.tcd_sample) at --tcd-gamma by default."""
    name = "tcd"
    summary = "trajectory consistency distillation with strategic stochastic sampling (Zheng et al. 2024)"
    flags = ("tcd_gamma", "tcd_clean_fraction") + ConsistencyDistillation.flags

    @staticmethod
    def add_args(parser):
        group = parser.add_argument_group(
            "trajectory consistency distillation (--step-distillation tcd; also reads --consistency-skip, "
            "--consistency-target-decay, --sampling-steps and --guidance-range as consistency does)")
        group.add_argument("--tcd-gamma", type=number_in(float, 0, 1), default=TCD_GAMMA,
                           help="stochasticity gamma of strategic stochastic sampling that the checkpoint records as "
                                "its default (0: deterministic, 1: multistep consistency sampling; diffusers' "
                                "default 0.3); sampling only, training does not use it (sample.py --gamma overrides)")
        group.add_argument("--tcd-clean-fraction", type=number_in(float, 0, 1), default=0.0, metavar="P",
                           help="share of each batch whose jump target s is the clean end (the consistency function), "
                                "the rest uniform over the grid points 0 ... n as the paper draws it (0: the paper; "
                                "1: consistency distillation). Not in Zheng et al.: the last step of every sampler "
                                "jumps to the clean end, which uniform s trains in about 1 example in 10")

    def randomness(self, generator, batch, shape):
        """Consistency's draws and a uniform for the jump target s."""
        draws = super().randomness(generator, batch, shape)
        draws["s_uniform"] = torch.rand(batch, generator=generator)
        return draws

    def jump_index(self, u, index):
        """s's grid index (N,): 0 (the clean end) for the share --tcd-clean-fraction of u, the rest uniform in
        [0, index]."""
        spread = share_at_zero(u, self.args.tcd_clean_fraction)
        return torch.minimum((spread * (index + 1)).long(), index)

    def loss(self, update, nets, x0, y, draws, autocast):
        w, drop = self.guidance(draws)
        index = self.grid_index(draws)
        s_index = self.jump_index(draws["s_uniform"], index)
        with autocast:
            loss = trajectory_consistency_loss(nets["student"], nets["target"], nets["teacher"],
                                               self.teacher_parametrisation, x0, y, draws["noise"], index, s_index,
                                               self.args.consistency_skip, w, drop, self.clip)
        return loss, {"tcd": loss}

    def sampling(self):
        return dataclasses.replace(super().sampling(), method="tcd", sampler="tcd", gamma=self.args.tcd_gamma)


class GuidanceDistillation(StepDistillation):
    """One stage of Meng et al.: an eps-predicting student that takes w, sampled by any of the teacher's samplers."""
    name = "guidance"
    summary = "the student takes the guidance scale as an input (Meng et al. 2023)"
    parametrisation = "eps"

    def check_teacher(self, teacher_sampling):
        if not self.args.guidance_range:
            raise UserError("guidance distillation needs --guidance-range WMIN WMAX")
        if teacher_sampling.parametrisation != "eps":
            raise UserError("guidance distillation needs an eps-predicting teacher (a plain or size-distilled DiT)")

    def loss(self, update, nets, x0, y, draws, autocast):
        w, _ = self.guidance(draws)
        with autocast:
            loss = guidance_loss(nets["student"], nets["teacher"], x0, y, draws["noise"], draws["t"], w)
        return loss, {"guidance": loss}

    def sampling(self):
        return SamplingSpec("guidance", guidance_range=self.guidance_range)


#################################################################################
#        One to four steps from a generator: what DMD2 and ADD / LADD share     #
#################################################################################

def generator_grid(num_steps):
    """The trailing grid a 1-4 step generator trains on (4 steps: 999, 749, 499, 249) and the step counts it then
    samples in: those whose own trailing grid lies on it (4 -> 1, 2, 4)."""
    grid = trailing_timesteps(num_steps)
    return grid, tuple(n for n in range(1, num_steps + 1) if set(trailing_timesteps(n)) <= set(grid))


def generator_x0(generator, x_t, t, y, w=None, clip=False):
    """The generator's sample x_0 = G(x_t, t): its x-eps estimate through the consistency boundary, which at the grid's
    timesteps (t >= 249) is within 1e-7 of the estimate itself, so the consistency sampler samples it as trained."""
    return consistency_function(generator, x_t, t, y, w, clip=clip)


# DMD2 (Yin et al. 2024, Sec. 4.5, "backward simulation"): a multi-step generator's input at grid point k is made by
# its own earlier steps, x_{t_0} = z and x_{t_{j+1}} = q_sample(G(x_{t_j}, t_j), t_{j+1}), not by noising real data,
# so that training sees what sampling will (no gradient flows through these steps).
@torch.no_grad()
def backward_simulation(generator, noise, renoise, index, grid, y, w=None, clip=False):
    """(x_t (N, C, H, W), t (N,)): each example's input at grid[index[i]]; renoise: (N, len(grid) - 1, C, H, W)."""
    grid = torch.tensor(grid, device=noise.device)
    x = noise
    for j in range(int(index.max()) if len(index) else 0):
        x0 = generator_x0(generator, x, grid[j].expand(len(x)), y, w, clip)
        x0 = x0.clamp(-1, 1) if clip else x0  # as the consistency sampler steps
        step = q_sample(x0, grid[j + 1].expand(len(x)), renoise[:, j])
        x = torch.where((index > j).view(-1, 1, 1, 1), step, x)
    return x, grid[index]


class FewStepGenerator(StepDistillation):
    """A student that samples in 1 to --sampling-steps steps (a power of two) on the trailing grid: started from the
    teacher as an x-eps model, trained at every grid point through backward simulation, sampled by the consistency
    sampler (x_0 = G(x, t_i), re-noised to t_{i+1}). The base of DMD2 and of adversarial distillation."""
    flags = ("sampling_steps", "generator_init")

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        if args.sampling_steps & (args.sampling_steps - 1):
            raise UserError(f"--sampling-steps {args.sampling_steps} must be a power of two (1, 2, 4, 8) so that "
                            f"fewer steps lie on its grid")
        self.grid, self.step_counts = generator_grid(args.sampling_steps)
        if args.generator_init:
            self.start_from(args.generator_init)

    def start_from(self, path):
        """The generator's weights from a few-step checkpoint of this teacher's architecture (a warm start: DMD2
        refines a generator that already samples, rather than growing one from the teacher's zero x~ head)."""
        from models import load_dit_checkpoint
        init, init_data = load_dit_checkpoint(path)
        spec = SamplingSpec.from_checkpoint_entry(init_data["sampling"])
        if spec.parametrisation != "x-eps" or init.w_embedder is not None:
            raise UserError(f"--generator-init {path}: a {spec.method} model predicting {spec.parametrisation}"
                            f"{' with a w input' if init.w_embedder is not None else ''}; give a few-step x-eps "
                            f"student without guidance (e.g. --step-distillation consistency of this teacher, "
                            f"without --guidance-range)")
        if init.config != self.student.config:
            differing = sorted(k for k in set(init.config) | set(self.student.config)
                               if init.config.get(k) != self.student.config.get(k))
            raise UserError(f"--generator-init {path} is not of the teacher's architecture (it differs in "
                            f"{', '.join(differing)}): step-distil this teacher first and give that checkpoint")
        load_state_dict_strict(self.student, init.state_dict(), path)

    def generator_draws(self, generator, batch, shape):
        """The generator's input noise, its grid point and backward simulation's re-noising draws."""
        return {"z": torch.randn(batch, *shape, generator=generator),
                "grid_uniform": torch.rand(batch, generator=generator),
                "renoise": torch.randn(batch, len(self.grid) - 1, *shape, generator=generator)}

    def generate(self, generator, draws, y, with_grad):
        """The generator's samples x_0 (N, C, H, W) at this step's grid points (gradient to G when with_grad)."""
        index = (draws["grid_uniform"] * len(self.grid)).long().clamp(max=len(self.grid) - 1)
        x_t, t = backward_simulation(generator, draws["z"], draws["renoise"], index, self.grid, y, clip=self.clip)
        with torch.set_grad_enabled(with_grad):
            return generator_x0(generator, x_t, t, y)

    def sampling(self):
        return SamplingSpec(self.name, "x-eps", "consistency", self.step_counts, len(self.grid), None, 1)
