"""DDPM objective and ancestral sampler: the DiT baseline of the framework.

Follows the recipe of DiT (improved-DDPM lineage): linear beta schedule, eps prediction
plus a learned variance interpolation ("learned range"), loss = MSE(eps) + VB with the
mean frozen, and respacing to a subset of steps for sampling.

Conventions
- ``t_index``: integer index into THIS diffusion's schedule, 0..num_timesteps-1
  (after respacing, 0..len(use_timesteps)-1).
- The model is called as ``model_fn(x_t, t_float)`` where ``t_float`` holds the ORIGINAL
  timestep (``timestep_map[t_index]``, 0..999) as float32, whatever x's dtype.
- Model output is ``[B, 2C, ...]``: channels ``[:C]`` predict eps, ``[C:]`` hold v in
  [-1, 1] with ``log var = frac*log(beta_t) + (1-frac)*log(posterior var clipped)``,
  ``frac = (v+1)/2``.
- Schedule arrays are float64 tensors; they are cast to x's dtype only where applied.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from vrpo.utils.randomness import normal

ModelFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "create_ddpm",
    "discretized_gaussian_log_likelihood",
    "linear_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]

_LN2 = math.log(2.0)


def linear_beta_schedule(
    num_steps: int = 1000, beta_start: float | None = None, beta_end: float | None = None
) -> Tensor:
    """Ho et al.'s linear schedule, scaled by 1000/num_steps so any length keeps its shape."""
    scale = 1000.0 / num_steps
    start = 1e-4 * scale if beta_start is None else beta_start
    end = 0.02 * scale if beta_end is None else beta_end
    return torch.linspace(start, end, num_steps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Pick steps of a ``num_timesteps`` process, evenly strided within equal sections.

    ``section_counts`` is an int, a list of per-section counts, a comma string ("10,15,20"),
    or "ddimN" (a single integer stride giving exactly N steps). Returns sorted indices.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            want = int(section_counts[4:])
            for stride in range(1, num_timesteps):
                steps = list(range(0, num_timesteps, stride))
                if len(steps) == want:
                    return steps
            raise ValueError(f"no integer stride gives exactly {want} of {num_timesteps} steps")
        section_counts = [int(c) for c in section_counts.split(",") if c.strip()]
    counts = list(section_counts)
    if not counts:
        raise ValueError("section_counts is empty")
    base, extra = divmod(num_timesteps, len(counts))
    chosen: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = base + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size}")
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        chosen.update(start + round(k * stride) for k in range(count))
        start += size
    return sorted(chosen)


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one."""
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """The tanh approximation of Phi used by the DDPM/DiT decoder likelihood."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-probability (nats) of x on a 256-level grid of [-1, 1] under N(means, e^(2 log_scales)).

    Edge bins absorb the tails so the 256 probabilities sum to one.
    """
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    centered = x - means
    cdf_hi = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_lo = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    # Clamp keeps log finite when a bin's mass underflows.
    log_cdf_hi = torch.log(cdf_hi.clamp(min=1e-12))
    log_sf_lo = torch.log((1.0 - cdf_lo).clamp(min=1e-12))
    log_delta = torch.log((cdf_hi - cdf_lo).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_hi, torch.where(x > 0.999, log_sf_lo, log_delta))


class GaussianDiffusion:
    """Discrete-time Gaussian diffusion with eps prediction and learned-range variance.

    ``betas`` are this process's own betas (already respaced if ``timestep_map`` is given);
    ``timestep_map[i]`` is the original step the model sees for index i.
    ``rescale_vb`` mirrors DiT's ``rescale_learned_sigmas`` (LossType.RESCALED_MSE): it
    multiplies vb by num_timesteps/1000. DiT's default is off, so it is off here too.
    """

    def __init__(
        self,
        betas: Tensor | Sequence[float],
        timestep_map: Iterable[int] | Tensor | None = None,
        *,
        rescale_vb: bool = False,
        original_num_steps: int | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().flatten()
        if betas.numel() == 0 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be non-empty and lie in (0, 1]")
        T = betas.numel()
        self.num_timesteps = T
        if timestep_map is None:
            timestep_map = torch.arange(T)
        self.timestep_map = (
            torch.as_tensor(
                list(timestep_map) if not isinstance(timestep_map, Tensor) else timestep_map, dtype=torch.long
            )
            .cpu()
            .flatten()
        )
        if self.timestep_map.numel() != T:
            raise ValueError(f"timestep_map has {self.timestep_map.numel()} entries for {T} betas")
        self.original_num_steps = int(self.timestep_map.max()) + 1 if original_num_steps is None else original_num_steps
        self.rescale_vb = rescale_vb

        one = torch.ones(1, dtype=torch.float64)
        alphas = 1.0 - betas
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([one, self.alphas_cumprod[:-1]])
        self.alphas_cumprod_next = torch.cat([self.alphas_cumprod[1:], torch.zeros(1, dtype=torch.float64)])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()

        # q(x_{t-1} | x_t, x_0)
        denom = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / denom
        # The variance is 0 at t=0; borrow t=1's value so the log stays finite.
        first = self.posterior_variance[1:2] if T > 1 else betas[:1]
        self.posterior_log_variance_clipped = torch.log(torch.cat([first, self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / denom
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / denom

        self._device_cache: dict[tuple[int, torch.device], Tensor] = {}

    @classmethod
    def respaced(
        cls,
        betas: Tensor | Sequence[float],
        use_timesteps: Iterable[int],
        *,
        rescale_vb: bool = False,
    ) -> GaussianDiffusion:
        """Keep only ``use_timesteps`` of the process given by ``betas``.

        New betas are chosen so alphas_cumprod at the kept steps equals the original.
        """
        base = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().flatten()
        keep = sorted({int(i) for i in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= base.numel():
            raise ValueError("use_timesteps must be a non-empty subset of range(len(betas))")
        ac = torch.cumprod(1.0 - base, dim=0)[keep]
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        return cls(1.0 - ac / ac_prev, keep, rescale_vb=rescale_vb, original_num_steps=base.numel())

    # ---- helpers -------------------------------------------------------------------------

    def _on(self, arr: Tensor, device: torch.device) -> Tensor:
        # Cache device copies so the per-step lookups skip a host-to-device transfer.
        key = (id(arr), device)
        hit = self._device_cache.get(key)
        if hit is None:
            hit = self._device_cache[key] = arr.to(device)
        return hit

    def _index(self, t: Tensor | int, x: Tensor) -> Tensor:
        if not isinstance(t, Tensor):
            t = torch.tensor(t)
        t = t.to(device=x.device, dtype=torch.long)
        return t.expand(x.shape[0]) if t.ndim == 0 else t

    def _extract(self, arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        vals = self._on(arr, x.device)[t].to(x.dtype)
        return vals.view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t_index: Tensor | int, x: Tensor) -> Tensor:
        """Original-step floats the model sees for ``t_index`` (float32 keeps 999 exact)."""
        t = self._index(t_index, x)
        return self._on(self.timestep_map, x.device)[t].to(torch.float32)

    # ---- forward process -------------------------------------------------------------------

    def q_sample(self, x0: Tensor, t_index: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar) x0, (1 - abar) I)."""
        if noise is None:
            noise = torch.randn_like(x0)
        t = self._index(t_index, x0)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior_mean_variance(
        self, x0: Tensor, x_t: Tensor, t_index: Tensor | int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        t = self._index(t_index, x_t)
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x0
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        var = self._extract(self.posterior_variance, t, x_t)
        log_var = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, var, log_var

    def predict_xstart_from_eps(self, x_t: Tensor, t_index: Tensor | int, eps: Tensor) -> Tensor:
        t = self._index(t_index, x_t)
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    # ---- reverse process -------------------------------------------------------------------

    def _p_from_output(self, out: Tensor, x_t: Tensor, t: Tensor, clip_denoised: bool) -> dict[str, Tensor]:
        C = x_t.shape[1]
        if out.shape != (x_t.shape[0], 2 * C, *x_t.shape[2:]):
            raise ValueError(f"model output {tuple(out.shape)} is not [B, 2C, ...] for x {tuple(x_t.shape)}")
        eps, v = out[:, :C], out[:, C:]
        min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
        max_log = self._extract(self.log_betas, t, x_t)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        pred_x0 = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_var),
            "log_variance": log_var,
            "pred_xstart": pred_x0,
            "eps": eps,
        }

    def p_mean_variance(
        self, model_fn: ModelFn, x_t: Tensor, t_index: Tensor | int, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """Model's p(x_{t-1} | x_t): keys mean, variance, log_variance, pred_xstart, eps."""
        t = self._index(t_index, x_t)
        out = model_fn(x_t, self.model_timesteps(t, x_t))
        return self._p_from_output(out, x_t, t, clip_denoised)

    def p_sample(
        self,
        model_fn: ModelFn,
        x_t: Tensor,
        t_index: Tensor | int,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> dict[str, Tensor]:
        """One ancestral step; rows at t=0 return the mean without noise."""
        t = self._index(t_index, x_t)
        p = self.p_mean_variance(model_fn, x_t, t, clip_denoised=clip_denoised)
        noise = normal(x_t.shape, generator, x_t.device, x_t.dtype)  # on the generator's device
        nonzero = (t != 0).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        sample = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": p["pred_xstart"]}

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_fn: ModelFn,
        shape: Sequence[int],
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        clip_denoised: bool = False,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Ancestral sampling from x_T (``noise``, or drawn from ``generator``) down to x_0."""
        shape = tuple(shape)
        if noise is None:
            dev = device if device is not None else (generator.device if generator is not None else "cpu")
            x = torch.randn(shape, generator=generator, device=dev)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != {shape}")
            x = noise
        steps: Iterable[int] = range(self.num_timesteps - 1, -1, -1)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=self.num_timesteps)
        for i in steps:
            t = torch.full((shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(model_fn, x, t, generator=generator, clip_denoised=clip_denoised)["sample"]
        return x

    # ---- training ---------------------------------------------------------------------------

    def _vb_bits(self, p: dict[str, Tensor], x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Per-sample VB term in bits/dim: decoder NLL at t=0, posterior KL elsewhere."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / _LN2
        nll = -discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])
        nll = mean_flat(nll) / _LN2
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model_fn: ModelFn, x0: Tensor, t_index: Tensor | int, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """DiT's hybrid loss: ``loss = mse(eps) + vb``, each of shape [B]."""
        if noise is None:
            noise = torch.randn_like(x0)
        t = self._index(t_index, x0)
        x_t = self.q_sample(x0, t, noise)
        return self.losses_from_output(model_fn(x_t, self.model_timesteps(t, x_t)), x0, x_t, t, noise)

    def losses_from_output(self, out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor) -> dict[str, Tensor]:
        """The hybrid loss of a model output ``out`` [B, 2C, ...] at ``x_t`` = q_sample(x0, t, noise).

        vb sees the eps prediction detached, so only the variance channels learn from it.
        """
        C = x0.shape[1]
        frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
        vb = self._vb_bits(self._p_from_output(frozen, x_t, t, clip_denoised=False), x0, x_t, t)
        if self.rescale_vb:
            vb = vb * (self.num_timesteps / 1000.0)
        mse = mean_flat((noise - out[:, :C]) ** 2)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def create_ddpm(
    respacing: int | str | Sequence[int] | None = None,
    num_steps: int = 1000,
    *,
    rescale_vb: bool = False,
) -> GaussianDiffusion:
    """DiT-style factory: linear schedule, optionally respaced (e.g. 250 for sampling)."""
    betas = linear_beta_schedule(num_steps)
    if respacing is None or respacing == "":
        respacing = [num_steps]
    return GaussianDiffusion.respaced(betas, space_timesteps(num_steps, respacing), rescale_vb=rescale_vb)
