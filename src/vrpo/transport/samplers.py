"""Samplers for flow models (ODE Euler/Heun, SDE Euler-Maruyama) and the guided prediction they call.

Time runs from t = 1 (noise) to t = 0 (data). Every random draw comes from an explicit
``torch.Generator`` on the CPU, so a fixed seed gives identical samples on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vrpo.transport.interpolants import Interpolant
from vrpo.utils.randomness import normal

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, t_start: float = 1.0, t_end: float = 0.0, last_from: float | None = None) -> torch.Tensor:
    """``steps`` + 1 times from t_start to t_end, uniform; with ``last_from``, ``steps`` uniform times
    from t_start to last_from and then t_end (the official REPA SDE's grid, last_from 0.04)."""
    if steps < 1:
        raise ValueError(f"sampling needs at least one step, got {steps}")
    if last_from is None:
        return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    end = torch.tensor([t_end], dtype=torch.float64)
    return torch.cat([torch.linspace(t_start, last_from, steps, dtype=torch.float64), end])


def _full(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)


def euler_ode(velocity: VelocityFn, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    for t, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t).item() * velocity(x, _full(t, x))
    return x


def heun_ode(
    velocity: VelocityFn, x: torch.Tensor, grid: torch.Tensor, last_corrector: bool = True, guide_at_step: bool = False
) -> torch.Tensor:
    """Second-order Heun: Euler predictor, trapezoidal corrector (2 evaluations per step).

    ``last_corrector=False`` makes the last step an Euler step; ``guide_at_step`` decides guidance
    for the corrector at the step's start time (both as the official REPA/SiT sampler).
    """
    steps = len(grid) - 1
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = (t_next - t).item()
        v = velocity(x, _full(t, x))
        x_pred = x + h * v
        if i == steps - 1 and not last_corrector:
            return x_pred
        # a plain v(x, t) is called with two arguments; the step's time decides guidance if asked
        corrected = (
            velocity(x_pred, _full(t_next, x), _full(t, x)) if guide_at_step else velocity(x_pred, _full(t_next, x))
        )
        x = x + 0.5 * h * (v + corrected)
    return x


def euler_maruyama_sde(
    velocity: VelocityFn,
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Reverse SDE dx = [v - w(t)/2 * score] dt + sqrt(w(t)) dW, any w >= 0 keeps the marginals.

    The last step is the mean step (no noise), as in SiT, so samples end noise-free.
    """
    steps = len(grid) - 1
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        h = (t_next - t).item()
        tt = _full(t, x)
        v = velocity(x, tt)
        w = diffusion(tt).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        x = x + h * (v - 0.5 * w * score(v, x, tt))
        if i < steps - 1:
            noise = normal(x.shape, generator, x.device, x.dtype)
            x = x + (w * abs(h)).sqrt() * noise
    return x


class GuidedPrediction:
    """Wraps a network as v(x, t) with classifier-free guidance inside [t_low, t_high].

    ``time_scale`` maps the interpolant's t in [0, 1] to the network's time input. A network
    with a global token (REG) is sampled on the joint state ``pack(image, token)``: both are
    denoised together, and guidance covers the token at ``global_cfg_scale`` (default cfg_scale).
    A ReDi network's representation channels are part of x; ``representation_guidance`` guides
    its image channels away from the pass without them.
    """

    def __init__(
        self,
        model,
        labels: torch.Tensor | None,
        interpolant: Interpolant | None,
        prediction: str = "velocity",
        cfg_scale: float = 1.0,
        interval: tuple[float, float] = (0.0, 1.0),
        time_scale: float = 1000.0,
        time_reversed: bool = False,
        global_cfg_scale: float | None = None,
        representation_guidance: float = 1.0,
    ):
        self.time_reversed = time_reversed  # the network's t = 1 is data and its velocity data - noise
        self.model, self.labels, self.interpolant = model, labels, interpolant
        self.prediction, self.cfg_scale, self.interval, self.time_scale = prediction, cfg_scale, interval, time_scale
        self.global_cfg_scale = cfg_scale if global_cfg_scale is None else global_cfg_scale
        self.guided = cfg_scale != 1.0 or (model.global_token_dim > 0 and self.global_cfg_scale != 1.0)
        self.sharing = None  # DDT's EncoderSharing of this sampling run (vrpo.transport.sharing)
        self.representation_guidance = representation_guidance  # ReDi's, instead of classifier-free guidance
        if self.guided and labels is None:
            raise ValueError("classifier-free guidance needs class labels (cfg_scale != 1 on an unconditional model)")

    def output(self, x: torch.Tensor, t: torch.Tensor, guide_t: torch.Tensor | None = None, global_token=None):
        """The network's guided ``ModelOutput`` (all channels) at interpolant time t; guidance applies
        where ``guide_t`` (default t) lies in the interval."""
        net_t = (1 - t if self.time_reversed else t) * self.time_scale
        if self.representation_guidance != 1.0:
            return self.model.forward_with_rg(x, net_t, self.labels, self.representation_guidance)
        extra = {} if global_token is None else {"global_token": global_token}
        if self.sharing is not None:  # guidance doubles the batch at every evaluation, the same all run
            extra["condition"] = self.sharing.condition(x.shape[0] * (2 if self.guided else 1))
        if not self.guided:
            out = self.model(x, net_t, self.labels, **extra)
        else:
            low, high = self.interval
            decide = t if guide_t is None else guide_t
            guide = (decide >= low) & (decide <= high)
            out = self.model.forward_with_cfg(
                x, net_t, self.labels, self.cfg_scale, guide, global_scale=self.global_cfg_scale, **extra
            )
        if self.sharing is not None:
            self.sharing.keep(out.condition)
        return out

    def raw(self, x: torch.Tensor, t: torch.Tensor, guide_t: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(x, t, guide_t).prediction

    def __call__(self, state: torch.Tensor, t: torch.Tensor, guide_t: torch.Tensor | None = None) -> torch.Tensor:
        x, token = self.unpack(state)
        out = self.output(x, t, guide_t, token)
        v = self.velocity(out.prediction[:, : x.shape[1]], x, t)
        return v if token is None else self.pack(v, self.velocity(out.global_prediction, token, t))

    def velocity(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = -out if self.time_reversed else out
        return self.interpolant.to_velocity(self.prediction, out, x, t)

    def pack(self, image: torch.Tensor, token: torch.Tensor | None) -> torch.Tensor:
        """The sampler's state: the image itself, or image and global token flattened side by side."""
        return image if token is None else torch.cat([image.flatten(1), token.to(image.dtype)], dim=1)

    def unpack(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.model.global_token_dim:
            return state, None
        m = self.model
        pixels = state.shape[1] - m.global_token_dim
        return state[:, :pixels].reshape(state.shape[0], m.in_channels, m.input_size, m.input_size), state[:, pixels:]


def sample_flow(
    guided: GuidedPrediction,
    noise: torch.Tensor,
    method: str = "heun",
    steps: int = 50,
    t_start: float = 1.0,
    t_end: float = 0.0,
    generator: torch.Generator | None = None,
    diffusion_scale: float = 1.0,
    heun_last_corrector: bool = True,
    guidance_at: str = "evaluation",
    sde_last_from: float | None = None,
) -> torch.Tensor:
    if method == "euler":
        return euler_ode(guided, noise, time_grid(steps, t_start, t_end))
    if method == "heun":
        return heun_ode(guided, noise, time_grid(steps, t_start, t_end), heun_last_corrector, guidance_at == "step")
    if method == "sde":
        grid = time_grid(steps, t_start, t_end, sde_last_from)
        if generator is None:
            raise ValueError("the SDE sampler needs a generator (or per-sample noise) for its noise")
        interp = guided.interpolant
        return euler_maruyama_sde(
            guided, interp.score, lambda t: diffusion_scale * interp.sigma(t), noise, grid, generator
        )
    raise ValueError(f"unknown flow sampler {method!r} (euler, heun, sde)")
