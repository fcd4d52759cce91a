"""MeanFlow (Geng et al. 2025): a generator that draws in one step, trained from scratch with no
teacher, on flow matching's path (flow.py) and through the same objective contract.

The path is flow matching's: x_t = (1 - t) x_0 + t eps, with velocity v = eps - x_0. Flow
matching learns the instantaneous velocity v(x_t, t); a walk must integrate it in many small
steps, because the path x_t follows under the learned field curves. MeanFlow learns the average
velocity over an interval [r, t] instead,

    u(x_t, r, t) = 1 / (t - r) * integral from r to t of v(x_s, s) ds,

so that a step of any length is exact, x_r = x_t - (t - r) u(x_t, r, t), and one step from
t = 1 to r = 0 draws an image. Differentiating (t - r) u = integral of v in t gives the
MeanFlow identity

    u(x_t, r, t) = v(x_t, t) - (t - r) du/dt,

du/dt being the total derivative along the path, v . du/dx + du/dt. The network learns u by
regressing onto the right-hand side, with du/dt taken of the network itself by a
Jacobian-vector product (torch.func.jvp: forward mode, the tangent (v, 1) for (x_t, t) with r
held) and the whole target held fixed (no gradient flows through it). At r = t the identity is
u = v: flow matching's target, which most images of a batch keep (diffusion.interval_share).

Guidance is trained in (the paper's section 4.2): for a labelled image the velocity in the
target is w v + (1 - w) u(x_t, t, t | no label), the network's own unconditional answer, so a
guided model draws in one network call per step. Networks take the interval as a second time
input (model.interval_input: time_position_emb.embed_time).
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .diffusion import StepOutput
from .flow import FlowMatching, FlowSampler

ADAPTIVE_C = 1e-3  # the adaptive weighting's constant: 1 / (error + c) stays finite at 0


class MeanFlow(FlowMatching):
    """The training side: times (t, r) per image, the target from the MeanFlow identity, the
    adaptive loss weights. Sampling is MeanFlowJumps."""

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """(n, 2): each image's time t and the interval's end r <= t. Two draws from flow
        matching's time distribution (logit-normal in the preset), sorted; then all but a
        diffusion.interval_share of the images get r = t, flow matching's case."""
        a, b = super().sample_timesteps(n, generator), super().sample_timesteps(n, generator)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        flat = torch.rand(n, generator=generator, device=generator.device) >= self.cfg.interval_share
        return torch.stack([t, torch.where(flat, t, r)], dim=1)

    def net_times(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """(B, 2): the time and the interval t - r, both on the network's time scale."""
        return torch.stack([t, t - r], dim=1) * self.time_scale

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """A time alone asks for the instantaneous velocity: the interval is 0."""
        return self.net_times(t, t)

    def guided_velocity(self, net, x_t, t, v, labels) -> torch.Tensor:
        """The velocity in the target: v, or with diffusion.trained_guidance = w != 1, for each
        labelled image w v + (1 - w) u(x_t, t, t | no label) (the network's own unconditional
        velocity, no gradient); images whose label was dropped keep v."""
        w = self.cfg.trained_guidance
        if w == 1:
            return v
        with torch.no_grad():
            null = torch.full_like(labels, net.null_label)
            uncond = net(x_t, self.net_time(t), null)
        labelled = (labels != net.null_label).view(-1, *[1] * (v.dim() - 1))
        return torch.where(labelled, w * v + (1 - w) * uncond, v)

    def total_derivative(self, net, x_t, t, r, labels, v) -> tuple:
        """(u(x_t, r, t), du/dt along the path whose velocity is v), in one forward-mode pass.
        The fused attention kernels have no forward-mode derivative, so attention runs as
        plain matrix products here."""
        def u_at(x, time):
            return net(x, self.net_times(time, r), labels)
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(u_at, (x_t, t), (v, torch.ones_like(t)))

    def prediction_and_target(self, net, x0, noise, times, labels) -> tuple:
        """The network's average velocity and the MeanFlow identity's target for it, both
        scaled per image by the square root of the adaptive weight, so that the loss's mean
        squared error is the weighted one. Images with r = t take one plain forward (their
        target is v); only the others pay for the Jacobian-vector product. The rows come back
        in that order, not the batch's, which a mean over the rows does not see."""
        t, r = times[:, 0], times[:, 1]
        x_t = self.add_noise(x0, noise, t)
        v = self.guided_velocity(net, x_t, t, noise - x0, labels)
        flat = r == t
        preds, targets = [], []
        if flat.any():
            preds.append(net(x_t[flat], self.net_time(t[flat]), labels[flat]))
            targets.append(v[flat])
        span = ~flat
        if span.any():
            u, du_dt = self.total_derivative(net, x_t[span], t[span], r[span], labels[span], v[span])
            preds.append(u)
            targets.append(v[span] - self._column(t[span] - r[span], u) * du_dt)
        pred, target = torch.cat(preds), torch.cat(targets).detach()
        return self.weighted(pred, target)

    def weighted(self, pred: torch.Tensor, target: torch.Tensor) -> tuple:
        """pred and target times sqrt(w) per image, w = 1 / (mean squared error + c) ** p held
        fixed (diffusion.adaptive_p = p): the mean squared error of the pair is then the mean
        of w times each image's error, which weighs down the images whose targets are far off
        (the paper's adaptive weighting, on the mean error per pixel where it takes the sum)."""
        if self.cfg.adaptive_p == 0:
            return pred, target
        error = (pred - target).detach().square().flatten(1).mean(dim=1)
        scale = (error + ADAPTIVE_C).pow(-self.cfg.adaptive_p / 2)
        scale = self._column(scale, pred)
        return pred * scale, target * scale


class MeanFlowJumps(MeanFlow, FlowSampler):
    """k jumps from t = 1 to 0 on flow's time grid (sample.shift bends it as for Euler):
    x_r = x_t - (t - r) u(x_t, r, t), one network call each; k = 1 is the one-step draw. The
    network is told the jump's end r through its time input (net_time), which the sampling
    loop asks for before each step."""

    name = "jump"

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        r = float(self.sigmas[self._i + 1])  # where this step lands
        return self.net_times(t, torch.full_like(t, r))

    def step(self, model_out, t, x_t, generator=None) -> StepOutput:
        t, r = float(self.sigmas[self._i]), float(self.sigmas[self._i + 1])
        self._i += 1
        # the x_0 shown beside each step: where the jump would land if the average velocity
        # held to the data (exact for the last jump, whose r is 0)
        return StepOutput(self.finish(x_t - (t - r) * model_out), x_t - t * model_out)


MeanFlow.samplers = {"jump": MeanFlowJumps}
MeanFlow.preview = {"sampler": "jump", "steps": 1}
