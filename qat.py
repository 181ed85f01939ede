"""Quantization-aware distillation as a training method (train.py --step-distillation qat): a model distilled into
its own fake-quantized INT8 copy (quantization.py holds the fake quantization and says what is quantized how).

    python train.py --step-distillation qat --teacher-ckpt results/fewstep/checkpoints/0001200.pt \
        --max-steps 400 --lr 1e-4 --results-dir results/qat

The checkpoint samples as its teacher does (the same sampler, steps and guidance range) and simulates INT8 when
sampled with sample.py; export.py --int8 writes its Q/DQ ONNX with exactly the learned scales.
"""
import torch
import torch.distributed as dist

from checks import UserError, number_in, positive_int
from diffusion.gaussian_diffusion import mean_flat
from method import TrainingMethod
from models import quantization_aware_copy
from quantization import DEFAULT_WEIGHT_BITS, calibrate, quantized_linears
from sampling import SAMPLERS, model_output, q_sample
from step_distill import StepDistillation, load_step_teacher


def visited_timesteps(spec, ddim_steps=None):
    """The timesteps a model is called at when it samples, descending, each once: a few-step student's own sampler at
    every step count it takes up to its default (a consistency student sampled in fewer steps meets a subset of
    others), else DDIM in ddim_steps steps. A UserError when neither says which."""
    if spec.sampler is None:
        if ddim_steps is None:
            raise UserError("the teacher samples with any eps sampler (a diffusion model, not a step-distilled "
                            "student), so it names no timesteps to calibrate and train the INT8 model on: pass "
                            "--qat-ddim-steps N (DDIM N's timesteps), or step-distil it first")
        return sorted(SAMPLERS["ddim"].timesteps(ddim_steps, spec), reverse=True)
    if ddim_steps is not None:
        raise UserError(f"the teacher samples with its own {spec.sampler} sampler, whose timesteps QAT uses: drop "
                        f"--qat-ddim-steps")
    counts = [n for n in (spec.steps or (spec.default_steps,)) if n <= spec.default_steps]
    timesteps = {int(t) for n in counts for t in SAMPLERS[spec.sampler].timesteps(n, spec)}
    if not timesteps:
        raise UserError(f"the teacher's {spec.sampler} sampler visits no timesteps at its {spec.default_steps} "
                        f"steps: nothing to calibrate on")
    return sorted(timesteps, reverse=True)


# Jacob et al. 2018 (QAT, straight-through fake quantization) with learned step sizes (LSQ, Esser et al. 2020); the
# target is the full-precision model itself (self-distillation, as ZeroQ / quantization-aware KD), not the data.
def quantization_distillation_loss(student, teacher, x_t, t, y, w, drop):
    """Per-example loss (N,): the mean squared gap between the INT8 student's and its fp32 teacher's outputs."""
    with torch.no_grad():
        target = model_output(teacher, x_t, t, y, w, drop)
    return mean_flat((model_output(student, x_t, t, y, w, drop).float() - target.float()) ** 2)


class QuantizationAwareDistillation(StepDistillation):
    """The INT8 student (the teacher's model with every Linear fake-quantized, started from its weights; input
    scales calibrated on the first step's inputs, then learned) and the frozen full-precision teacher. It shares
    StepDistillation's checks, draws and guidance scales, not its student (a copy of the teacher's own model)."""
    name = "qat"
    step_method = True
    summary = ("quantization-aware distillation to full INT8 (every Linear; the model keeps its sampler, steps and "
               "guidance range: run it after any step method)")
    flags = ("qat_weight_bits", "qat_ddim_steps", "guidance_min_fraction")

    def __init__(self, args, data, device):
        TrainingMethod.__init__(self, args, data, device)
        teacher, self.spec = load_step_teacher(args, data)
        if teacher.config.get("weight_bits") is not None:
            raise UserError(f"{args.teacher_ckpt} is already quantization-aware ({teacher.config['weight_bits']}-bit "
                            f"weights): give the full-precision model it was made from")
        self.timesteps = torch.tensor(visited_timesteps(self.spec, args.qat_ddim_steps))
        self.guidance_range = self.spec.guidance_range if teacher.w_embedder is not None else None
        self.frozen["teacher"] = teacher
        self.trainable["student"] = quantization_aware_copy(teacher, args.qat_weight_bits).float()
        self.calibrated = False  # input scales are set from the first step's inputs (state: resumed as True)
        self.ema = None

    @staticmethod
    def add_args(parser):
        group = parser.add_argument_group(
            "quantization-aware distillation (--step-distillation qat): the --teacher-ckpt model with INT8 on every "
            "Linear, trained to match its own full-precision outputs at its sampler's timesteps")
        group.add_argument("--qat-weight-bits", type=number_in(int, 2, 8), default=DEFAULT_WEIGHT_BITS,
                           help="bits of the per-channel symmetric weights (7: no int16 saturation in the int8 "
                                "kernels of AVX2-only x86 CPUs; 8: full range, for TensorRT only)")
        group.add_argument("--qat-ddim-steps", type=positive_int, default=None,
                           help="for a teacher without a sampler of its own (a diffusion model): train at DDIM N's "
                                "timesteps")

    def begin_step(self, step, ema):
        self.ema = ema  # calibration sets the EMA's scales too, so it does not average from the uncalibrated ones
        return None, ()

    def inputs(self, x0, y, draws):
        """x_t at the visited timesteps, t, y, w (over the guidance range, or None) and the label drops."""
        timesteps = self.timesteps.to(x0.device)
        t = timesteps[(draws["uniform"] * len(timesteps)).long().clamp(max=len(timesteps) - 1)]
        return (q_sample(x0, t, draws["noise"]), t, y, *self.guidance(draws))

    def calibrate_scales(self, x_t, t, y, w, drop):
        """Input scales from this step's batch (max |x| / 127 per Linear; the maximum over every process's slice),
        copied into the EMA."""
        calibrate(self.student, lambda model, _: model_output(model, x_t, t, y, w, drop), [None])
        layers = quantized_linears(self.student)
        if dist.is_available() and dist.is_initialized():
            scales = torch.stack([layer.input_log_scale.data for layer in layers.values()])
            dist.all_reduce(scales, op=dist.ReduceOp.MAX)
            for layer, scale in zip(layers.values(), scales):
                layer.input_log_scale.data.copy_(scale)
        if self.ema is not None:
            ema_layers = quantized_linears(self.ema)
            for name, layer in layers.items():
                ema_layers[name].input_log_scale.data.copy_(layer.input_log_scale.data)
        self.calibrated = True

    def loss(self, update, nets, x0, y, draws, autocast):
        x_t, t, y, w, drop = self.inputs(x0, y, draws)
        if not self.calibrated:
            self.calibrate_scales(x_t, t, y, w, drop)
        with autocast:
            loss = quantization_distillation_loss(nets["student"], nets["teacher"], x_t, t, y, w, drop)
        return loss, {"qat": loss}

    def scalars(self):
        scales = torch.stack([layer.input_log_scale.detach() for layer in quantized_linears(self.student).values()])
        return {"qat/mean_log_input_scale": scales.mean().item()}

    def state_dict(self):
        return {"qat_calibrated": self.calibrated}

    def load_state_dict(self, checkpoint):
        self.calibrated = bool(checkpoint["qat_calibrated"])

    def describe(self):
        layers = quantized_linears(self.student)
        return (f"quantization-aware distillation of {self.args.teacher_ckpt}: {len(layers)} Linear layers with "
                f"{self.args.qat_weight_bits}-bit per-channel weights and int8 per-tensor inputs, trained at the "
                f"timesteps {self.timesteps.tolist()}")

    def sampling(self):
        return self.spec
