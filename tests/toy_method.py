"""A toy training method with two networks and two optimizers on a 5:1 schedule, to test train.py's loop with a method
it has never seen (the shape of DMD2: a critic updated every step, the student every 5th).

Run as train.py with the method registered: python tests/toy_method.py --step-distillation toy --model ... (also
under torchrun). Nothing in train.py knows this method; registering it is the one line a new method adds.
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from checks import positive_float, positive_int, run_script  # noqa: E402
from method import PlainTraining, Update  # noqa: E402


class Critic(nn.Module):
    """A small conv net that scores an image (N, C, H, W) -> (N,)."""

    def __init__(self, channels):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return self.net(x).flatten(1).mean(1)


class ToyMethod(PlainTraining):
    """The student's diffusion loss plus 0.1 x the critic's score of its x_0 estimate; the critic learns to tell
    real data from those estimates (a least-squares GAN on the side)."""
    name = "toy"
    summary = "a test method: critic every step, student every --toy-student-every-th"
    step_method = True
    flags = ("model", "toy_critic_lr", "toy_student_every")

    def __init__(self, args, data, device):
        super().__init__(args, data, device)
        self.trainable["critic"] = Critic(data["in_channels"])  # seeded by PlainTraining's init seed
        self.counts = {"critic": 0, "student": 0}

    @staticmethod
    def add_args(parser):
        group = parser.add_argument_group("toy method (tests only)")
        group.add_argument("--toy-critic-lr", type=positive_float, default=1e-3, help="the critic's learning rate")
        group.add_argument("--toy-student-every", type=positive_int, default=5, help="student update every N-th step")

    @classmethod
    def check_args(cls, parser, args):
        if not args.model or args.max_steps is None:
            parser.error("--step-distillation toy needs --model and --max-steps")

    def updates(self):
        return [Update("critic", ("critic",), self.args.toy_critic_lr),
                Update("student", ("student",), self.args.lr, every=self.args.toy_student_every)]

    def randomness(self, generator, batch, shape):
        draws = super().randomness(generator, batch, shape)
        draws["critic_t"] = torch.randint(0, 1000, (batch,), generator=generator)
        return draws

    def estimate(self, student, x0, y, t, noise):
        """(the student's output, its x_0 estimate) at x_t = q_sample(x0, t, noise)."""
        x_t = self.diffusion.q_sample(x0, t, noise=noise)
        out = student(x_t, t, y, force_drop_ids=torch.zeros_like(y))  # one forward per update (DDP)
        return x_t, out, self.diffusion._predict_xstart_from_eps(x_t, t, out[:, :x0.shape[1]])

    def loss(self, update, nets, x0, y, draws, autocast):
        self.counts[update.name] += 1
        if update.name == "critic":
            with torch.no_grad():
                fake = self.estimate(nets["student"], x0, y, draws["critic_t"], draws["noise"])[2]
            real_score, fake_score = nets["critic"](x0), nets["critic"](fake)
            loss = (real_score - 1) ** 2 + fake_score ** 2
            return loss, {"critic": loss}
        x_t, out, fake = self.estimate(nets["student"], x0, y, draws["t"], draws["noise"])
        terms = self.diffusion.hybrid_loss_terms(out.float(), x0, x_t, draws["t"], draws["noise"])
        terms = {"diffusion": terms.pop("loss"), "student_critic": (nets["critic"](fake) - 1) ** 2}
        return terms["diffusion"] + 0.1 * terms["student_critic"], terms

    def state_dict(self):
        return {"toy_counts": dict(self.counts)}

    def load_state_dict(self, checkpoint):
        self.counts = dict(checkpoint["toy_counts"])


if __name__ == "__main__":
    train.METHODS["toy"] = ToyMethod
    run_script(train.main, train.parse_args)
