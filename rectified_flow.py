"""Rectified flow for DiT: reflow on a teacher's ODE pairs (Liu et al. 2022) and InstaFlow's one-step distillation
(Liu et al. 2024), with the straightness measure of both.

- The straight path and the velocity of a DiT are sampling.py's (flow_timestep, velocity, flow_euler_sample):
  x_s = s x + (1 - s) z, s = 0 the noise z, s = 1 the data x, v = x - z. A DiT's VP point x_t = alpha_t x + sigma_t z
  is x_s scaled by 1 / (alpha + sigma) at s = alpha / (alpha + sigma), so any eps DiT is a velocity model, v = x_0 -
  eps at (x_t, t(s)). A reflow student starts as its teacher exactly (an eps teacher stays eps-parametrised: Euler on
  the grid of DDIM's timesteps is then the teacher's DDIM, tests/test_rectified_flow.py).
- Pairs (z, x): noise and the teacher's ODE sample from it, written by reflow_pairs.py into a folder that names the
  teacher (path and sha256 of the checkpoint, its step, config and method) and the settings; load_pairs refuses pairs
  of another teacher and an unfinished folder.
- ReflowDistillation (--step-distillation reflow): the student regresses x - z on the pairs' straight path; sampled
  with flow-euler at any step count.
- InstaFlow (--step-distillation instaflow): a reflowed model (its checkpoint samples with flow-euler) distilled to
  one Euler step, x = z + v(z, 0), on pairs of its own ODE. Departure: InstaFlow's distance is LPIPS, which needs a
  pretrained VGG / AlexNet on pixels (no weights offline here, and latents would need a VAE decode per step); we use
  the pseudo-Huber distance on x in the model's space (pixels for digits, latents for ImageNet) of Song & Dhariwal
  2023 (iCT), c = 0.00054 sqrt(dim), a robust L2 (L2 for large errors' direction, L1-like weight on outliers). The
  student is x-eps (sampling.py) so that its x at s = 0 (t = 999) is predicted directly, not divided by alpha_999.
"""
import glob
import json
import os

import numpy as np
import torch

from checks import UserError, file_sha256, read_file
from diffusion.gaussian_diffusion import mean_flat
from method import diffusion_draws
from sampling import FLOW_S_RANGE, SamplingSpec, flow_grid, velocity
from step_distill import StepDistillation

PAIRS_META = "meta.json"
PSEUDO_HUBER_C = 0.00054  # Song & Dhariwal 2023, Sec. 3.3: c = 0.00054 sqrt(d)


#################################################################################
#                                    Losses                                     #
#################################################################################

# Liu et al. 2022, Eq. 1 on the teacher's coupling (reflow, their Algorithm 1): min_v E_{s ~ U[0, 1]}
# ||(x - z) - v(s x + (1 - s) z, s)||^2, the mean over values.
def reflow_loss(student, parametrisation, z, x, y, s, drop=None):
    """Per-example loss (N,). z, x: (N, C, H, W) a pair; s: (N,) in [0, 1]."""
    s4 = s.float().view(-1, 1, 1, 1)
    x_s = s4 * x + (1 - s4) * z  # (N, C, H, W)
    return mean_flat(((x - z) - velocity(student, parametrisation, x_s, s, y, drop=drop)) ** 2)


def pseudo_huber(a, b):
    """sqrt(||a - b||^2 + c^2) - c per example, c = 0.00054 sqrt(dim) (iCT)."""
    c = PSEUDO_HUBER_C * a[0].numel() ** 0.5
    return (((a - b) ** 2).flatten(1).sum(1) + c ** 2).sqrt() - c


# InstaFlow (Liu et al. 2024, Sec. 3.3 / Eq. 4, "distillation"): one Euler step x = z + v(z, 0) matched to the
# 2-rectified flow's ODE sample x of the same z; pseudo-Huber instead of LPIPS (module docstring).
def instaflow_loss(student, parametrisation, z, x, y, drop=None):
    """Per-example loss (N,)."""
    one_step = z + velocity(student, parametrisation, z, torch.zeros(len(z), device=z.device), y, drop=drop)
    return pseudo_huber(one_step, x)


@torch.no_grad()
def straightness(model, parametrisation, noise, y, num_steps=100, clip=False):
    """Liu et al. 2022, Def. 2.2: S = int_0^1 E ||(Z_1 - Z_0) - v(Z_s, s)||^2 ds along the flow's own ODE (Euler,
    num_steps uniform steps from the noise), the mean over values and examples. Euler's displacement Z_1 - Z_0 is the
    mean of its velocities, so S = mean_i ||v_i||^2 - ||mean_i v_i||^2, kept as running sums. 0: straight."""
    x, total, squares = noise, torch.zeros_like(noise), torch.zeros(len(noise), device=noise.device)
    grid = flow_grid(num_steps)
    for s, s_next in zip(grid[:-1], grid[1:]):
        v = velocity(model, parametrisation, x, torch.full((len(x),), s, dtype=torch.float64, device=x.device), y,
                     clip=clip)
        total, squares = total + v, squares + mean_flat(v ** 2)
        x = x + (s_next - s) * v
    return float((squares / num_steps - mean_flat((total / num_steps) ** 2)).mean())


#################################################################################
#                         The pair folder (reflow_pairs.py)                     #
#################################################################################

def pair_chunk_path(folder, chunk):
    return os.path.join(folder, f"pairs_{chunk:05d}.npz")


def read_pair_meta(folder, flag="--reflow-pairs"):
    """The folder's meta.json (teacher, settings, num_chunks), or a UserError saying how to write one."""
    path = os.path.join(folder, PAIRS_META)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {folder}: not a pair folder (no {PAIRS_META}) - write the teacher's pairs first: "
                        f"python reflow_pairs.py --ckpt TEACHER --out {folder}")
    return read_file(path, lambda p: json.load(open(p)), "rerun reflow_pairs.py into a new --out")


def pair_cost(folder):
    """{"pairs", "seconds_per_pair", "forwards_per_pair"} of a finished folder: the time reflow_pairs.py measured per
    chunk (kept in each chunk, so a resumed folder counts every chunk once)."""
    meta = read_pair_meta(folder)
    seconds = sum(float(np.load(pair_chunk_path(folder, k))["seconds"]) for k in range(meta["num_chunks"]))
    pairs = meta["settings"]["num_pairs"]
    return {"pairs": pairs, "seconds_per_pair": seconds / pairs, "forwards_per_pair": meta["forwards_per_pair"]}


def load_pairs(folder, teacher_ckpt):
    """{"z", "x": (P, C, H, W) float32, "y": (P,) int64} of a finished pair folder made by teacher_ckpt (its sha256),
    else a UserError naming the problem and the fix."""
    meta = read_pair_meta(folder)
    made_by, sha256 = meta["teacher"], file_sha256(teacher_ckpt)
    if made_by["sha256"] != sha256:
        raise UserError(f"--reflow-pairs {folder}: its pairs were made by teacher {made_by['path']} (sha256 "
                        f"{made_by['sha256'][:12]}, step {made_by['step']}), not by --teacher-ckpt {teacher_ckpt} "
                        f"(sha256 {sha256[:12]}) - pass the teacher that made them, or write pairs of this one: "
                        f"python reflow_pairs.py --ckpt {teacher_ckpt} --out NEW_FOLDER")
    missing = [k for k in range(meta["num_chunks"]) if not os.path.isfile(pair_chunk_path(folder, k))]
    if missing:
        raise UserError(f"--reflow-pairs {folder}: unfinished, {len(missing)} of {meta['num_chunks']} chunks missing "
                        f"- rerun its reflow_pairs.py command to finish it (it resumes)")
    arrays = {"z": [], "x": [], "y": []}
    for path in sorted(glob.glob(os.path.join(folder, "pairs_*.npz")))[:meta["num_chunks"]]:
        with np.load(path) as chunk:
            for key in arrays:
                arrays[key].append(chunk[key])
    return {key: torch.from_numpy(np.concatenate(parts)) for key, parts in arrays.items()}


#################################################################################
#                     The methods train.py runs (--step-distillation)           #
#################################################################################

class ReflowDistillation(StepDistillation):
    """The student (the teacher's copy in the teacher's own parametrisation: its initial velocity is the teacher's)
    regresses x - z on the straight paths of --reflow-pairs (the teacher's ODE pairs); any --sampling-steps of
    flow-euler sample it, the checkpoint records --sampling-steps as its default. The teacher network is not needed
    once its pairs are written (only its file, to check that it made them)."""
    name = "reflow"
    summary = "rectified flow on the teacher's ODE pairs, sampled with Euler (Liu et al. 2022)"
    flags = ("reflow_pairs", "sampling_steps", "guidance_range")

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        del self.frozen["teacher"]  # the pairs hold what the teacher gives
        self.pairs = load_pairs(args.reflow_pairs, args.teacher_ckpt)
        shape = (data["in_channels"], data["input_size"], data["input_size"])
        if tuple(self.pairs["z"].shape[1:]) != shape:
            raise UserError(f"--reflow-pairs {args.reflow_pairs} holds {tuple(self.pairs['z'].shape[1:])} pairs, "
                            f"the data is {shape}: write pairs of this teacher on its own data")

    def check_teacher(self, teacher_sampling):
        self.parametrisation = teacher_sampling.parametrisation  # the teacher's copy, exactly

    @staticmethod
    def add_args(parser):
        group = parser.add_argument_group(
            "rectified flow (--step-distillation reflow / instaflow; also reads --sampling-steps)")
        group.add_argument("--reflow-pairs", default=None,
                           help="folder of (noise, ODE sample) pairs of --teacher-ckpt, written by reflow_pairs.py")

    @classmethod
    def check_args(cls, parser, args):
        super().check_args(parser, args)
        if not args.reflow_pairs:
            parser.error(f"--step-distillation {args.step_distillation} trains on the teacher's ODE pairs: pass "
                         f"--reflow-pairs FOLDER (write it with python reflow_pairs.py --ckpt {args.teacher_ckpt} "
                         f"--out FOLDER)")

    def randomness(self, generator, batch, shape):
        """The pair of each example, its time s on the straight path and its label drop."""
        draws = diffusion_draws(generator, batch, shape, self.student.config["class_dropout_prob"])
        return {"index": torch.randint(0, len(self.pairs["z"]), (batch,), generator=generator),
                "s": torch.rand(batch, generator=generator, dtype=torch.float64), "drop": draws["drop"]}

    def pair_batch(self, draws):
        index = draws["index"].cpu()
        return tuple(self.pairs[key][index].to(draws["index"].device) for key in ("z", "x", "y"))

    def drop(self, draws):
        return torch.zeros_like(draws["drop"]) if self.guidance_range else draws["drop"]

    def loss(self, update, nets, x0, y, draws, autocast):
        z, x, pair_y = self.pair_batch(draws)  # the pairs replace the data batch
        with autocast:
            loss = reflow_loss(nets["student"], self.parametrisation, z, x, pair_y, draws["s"], self.drop(draws))
        return loss, {"reflow": loss}

    def describe(self):
        return (f"{self.name}: {len(self.pairs['z']):,} pairs from {self.args.reflow_pairs}, the student "
                f"{self.parametrisation}-parametrised, s in [0, 1] (DiT's range {FLOW_S_RANGE[0]:.4f}.."
                f"{FLOW_S_RANGE[1]:.4f})")

    def sampling(self):
        return SamplingSpec(self.name, self.parametrisation, "flow-euler", None, self.args.sampling_steps,
                            self.guidance_range)


class InstaFlowDistillation(ReflowDistillation):
    """InstaFlow's stage 3: a reflowed model (--teacher-ckpt, a velocity model sampled with flow-euler) distilled into
    one Euler step on pairs of its own ODE (reflow_pairs.py --ckpt REFLOWED); the x-eps student starts from it with
    its x~ channels at zero (step_distill.make_student) and samples in 1 step."""
    name = "instaflow"
    summary = "the reflowed model distilled to one Euler step (InstaFlow, Liu et al. 2024)"
    flags = ("reflow_pairs", "guidance_range")
    parametrisation = "x-eps"

    def check_teacher(self, teacher_sampling):
        if teacher_sampling.sampler != "flow-euler":
            kind = f"a {teacher_sampling.method} model" + (f" sampled with {teacher_sampling.sampler}"
                                                            if teacher_sampling.sampler else " (a diffusion model)")
            raise UserError(f"--step-distillation instaflow distils a velocity model (a --step-distillation reflow "
                            f"checkpoint, sampled with flow-euler); --teacher-ckpt {self.args.teacher_ckpt} is {kind} "
                            f"- reflow it first (reflow_pairs.py on it, train.py --step-distillation reflow), then "
                            f"write pairs of the reflowed checkpoint and distil that")

    def loss(self, update, nets, x0, y, draws, autocast):
        z, x, pair_y = self.pair_batch(draws)
        with autocast:
            loss = instaflow_loss(nets["student"], self.parametrisation, z, x, pair_y, self.drop(draws))
        return loss, {"instaflow": loss}

    def sampling(self):
        return SamplingSpec(self.name, self.parametrisation, "flow-euler", (1,), 1, self.guidance_range)
