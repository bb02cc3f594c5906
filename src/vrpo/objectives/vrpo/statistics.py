"""VRPO's running statistics: buffers of the reward moments and the real-feature moments,
with bias correction, the weights and lambda_s derived from them, and the once-per-step commit.

Statistics are accumulated during ``loss`` (every micro-batch) and committed once per optimizer
step in ``end_of_step``, averaged over ranks, so gradient accumulation and DDP see one update per
step and a resumed run continues exactly. Inside ``loss`` they are constants.
"""

from __future__ import annotations

import math

import torch

from vrpo.utils.dist import all_reduce_mean


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def bounded_weights(w: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Weights summing to 1 within [low, high] that keep the ratios of ``w`` (summing to 1) where
    no bound binds: clip(c w, low, high) with the scale c that makes the sum 1 (bisection; the sum
    grows with c from K low to K high)."""
    if len(w) == 1 or bool(((w >= low) & (w <= high)).all()):
        return w
    lo, hi = 0.0, 1.0
    while float((hi * w).clamp(low, high).sum()) < 1.0 and hi < 1e300:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float((mid * w).clamp(low, high).sum()) < 1.0 else (lo, mid)
    return (hi * w).clamp(low, high)


class RewardStatistics:
    """Mixed into the VRPO module (its buffers keep their checkpoint names); needs ``self.options``,
    ``self.rewards`` and ``self.alignment``."""

    def register_statistics(self, encoders) -> None:
        o = self.options
        k = len(self.rewards)
        f64 = dict(dtype=torch.float64)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # committed steps (bias correction)
        self.register_buffer("reward_moments", torch.zeros(2, k, **f64))  # EMA of each batch mean and its square
        # per-sample moments: of the components (mean r_i, mean r_i r_i^T), and of R_i as it was computed
        self.register_buffer("sample_first", torch.zeros(k, **f64))
        self.register_buffer("sample_second", torch.zeros(k, k, **f64))
        self.register_buffer("total_moments", torch.zeros(2, **f64))
        self.register_buffer("v_R_ref", torch.zeros((), **f64))  # 0 until the end of warm-up
        if "fidelity" in self.rewards:
            for j, e in enumerate(encoders):
                second = (e.token_dim, e.token_dim) if o.fidelity == "full" else (e.token_dim,)
                self.register_buffer(f"real_first_{j}", torch.zeros(e.token_dim, **f64))
                self.register_buffer(f"real_second_{j}", torch.zeros(second, **f64))
        if o.lambda_variance == "prior":  # sum and count of v_P over the last tenth of warm-up
            self.register_buffer("ref_accumulator", torch.zeros(2, **f64))
        self.bins = o.timestep_bins if o.advantage_baseline == "timestep" and o.group_size == 1 else 0
        if self.bins:  # EMA of the mean of R and of R^2 per bin of t, and each bin's updates
            self.register_buffer("bin_moments", torch.zeros(2, self.bins, **f64))
            self.register_buffer("bin_updates", torch.zeros(self.bins, dtype=torch.long))
        self._pending: list[torch.Tensor] = []
        self._reference: tuple[int, list] | None = None
        self._counts: dict | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._reference, self._pending, self._counts = None, [], None  # derived from the buffers being replaced
        super()._load_from_state_dict(*args, **kwargs)

    def counts(self) -> dict:
        """The counters as Python values, read from the buffers once and then kept in step, so
        that the loss never waits for the device to decide a branch."""
        if self._counts is None:
            self._counts = {
                "updates": int(self.updates),
                "steps": int(self.steps_done),
                "ref_set": float(self.v_R_ref) > 0,
            }
        return self._counts

    def _corrected(self, buffer: torch.Tensor, decay: float) -> torch.Tensor:
        return buffer / (1 - decay ** self.counts()["updates"])

    def reward_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Bias-corrected EMA mean m_k and variance v_k of each component's batch mean."""
        if self.counts()["updates"] == 0:
            return None
        first, second = self._corrected(self.reward_moments, self.options.stats_decay)
        return first, (second - first**2).clamp_min(0)

    def total_stats(
        self, w: torch.Tensor, total: torch.Tensor | None = None, direct: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """m_R and the per-sample variance v_R of R = w . r; this batch's own (``total``) before
        any history. ``components``: from the components' moments, so a change of weights
        (the end of warm-up) does not leave R's statistics on another scale."""
        o = self.options
        if self.counts()["updates"] == 0:
            r = total.detach().double()
            return r.mean(), r.var(unbiased=False).clamp_min(o.variance_eps)
        if o.total_stats == "direct" if direct is None else direct:
            first, second = self._corrected(self.total_moments, o.stats_decay)
            return first, (second - first**2).clamp_min(o.variance_eps)
        first = self._corrected(self.sample_first, o.stats_decay)
        cov = self._corrected(self.sample_second, o.stats_decay) - torch.outer(first, first)
        return w @ first, (w @ cov @ w).clamp_min(o.variance_eps)

    def prior_weights(self) -> torch.Tensor:
        """w0: the configured weights of the enabled rewards, summing to 1."""
        w = self.reward_moments.new_tensor([getattr(self.options, f"weight_{r}") for r in self.rewards])
        return w / w.sum()

    def weights(self) -> torch.Tensor:
        """w0 during warm-up (and for fixed weighting); then inverse variance u shrunk towards w0,
        w = (1 - alpha) w0 + alpha u, within the bounds (alpha 1, bounds [0, 1]: version 1)."""
        o = self.options
        stats, counts = self.reward_stats(), self.counts()
        w0 = self.prior_weights()
        if o.weighting == "fixed" or counts["steps"] < o.warmup_steps or counts["updates"] < 2:
            return w0
        u = 1.0 / (stats[1] + o.variance_eps)
        u = u / u.sum()
        return bounded_weights((1.0 - o.weight_shrinkage) * w0 + o.weight_shrinkage * u, *o.weight_bounds)

    def prior_variance(self, prior_total: torch.Tensor | None = None) -> torch.Tensor:
        """v_P: the per-sample variance of R under the prior weights w0 (this batch's before any history)."""
        return self.total_stats(self.prior_weights(), prior_total, direct=False)[1]

    def lambda_s(self, v: torch.Tensor) -> float | torch.Tensor:
        """clip(lambda_0 (v / v_ref)^kappa), lambda_0 until the reference is set at the end of warm-up."""
        o = self.options
        if not o.adaptive_lambda or not self.counts()["ref_set"]:
            return o.lambda_0
        return (o.lambda_0 * (v / self.v_R_ref) ** o.kappa).clamp(o.lambda_min, o.lambda_max)

    def timestep_baseline(self, bins: torch.Tensor, m_R, v_R) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, the bias-corrected EMA mean and variance of R in its bin of t; a bin with no
        history yet takes the global m_R, v_R."""
        o = self.options
        seen = self.bin_updates > 0
        correction = (1 - o.stats_decay ** self.bin_updates.double()).where(seen, torch.ones_like(m_R))
        first, second = self.bin_moments / correction
        mean = first.where(seen, m_R)
        var = (second - first**2).clamp_min(o.variance_eps).where(seen, v_R)
        return mean[bins], var[bins]

    def reference(self, real: list[torch.Tensor]) -> list[tuple]:
        """Real-feature (mean, variance or covariance, covariance root) per encoder; this
        batch's before any history. Cached per committed step (the root costs an eigh)."""
        n = self.counts()["updates"]
        if n and self._reference is not None and self._reference[0] == n:
            return self._reference[1]
        full = self.options.fidelity == "full"
        out = []
        for j, f in enumerate(real):
            if n == 0:
                f = f.detach().double()
                first, second = f.mean(0), (f.T @ f / f.shape[0] if full else f.pow(2).mean(0))
            else:
                decay = self.options.real_stats_decay
                first = self._corrected(getattr(self, f"real_first_{j}"), decay)
                second = self._corrected(getattr(self, f"real_second_{j}"), decay)
            if full:
                cov = second - torch.outer(first, first)
                out.append((first, cov, psd_sqrt(cov)))
            else:
                out.append((first, (second - first**2).clamp_min(0), None))
        self._reference = (n, out)
        return out

    def record(
        self, components: torch.Tensor, samples: torch.Tensor, total: torch.Tensor, real: list[torch.Tensor],
        bins: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """Keep one micro-batch's statistics (batch values [K], per-sample components [K, B],
        R_i [B], real features, and R per bin of t) until ``end_of_step`` commits the step."""
        samples = samples.detach().double()
        parts = [
            components.detach().double(),
            samples.mean(1),
            samples @ samples.T / samples.shape[1],
            torch.stack([total.mean(), total.pow(2).mean()]).detach().double(),
        ]
        for f in real:
            f = f.detach().double()
            parts += [f.mean(0), (f.T @ f / f.shape[0] if self.options.fidelity == "full" else f.pow(2).mean(0))]
        if self.bins:  # sums and counts, so that the ratio of the rank means is the global mean per bin
            r = total.detach().double()
            zeros = r.new_zeros(self.bins)
            parts += [zeros.index_add(0, bins, r), zeros.index_add(0, bins, r**2), zeros.index_add(0, bins, r**0)]
        self._pending.append(torch.cat([p.flatten() for p in parts]))

    def end_of_step(self, step: int, applied: bool) -> None:
        pending, self._pending = self._pending, []
        counts = self.counts()
        self.steps_done.fill_(step + 1)
        counts["steps"] = step + 1
        if not applied or not pending:
            return  # a skipped step leaves every statistic as it was
        # Equal micro-batches on every rank: the mean of the means is the global batch's.
        stats = all_reduce_mean(torch.stack(pending).mean(0))
        o, k = self.options, len(self.rewards)
        self.updates += 1
        counts["updates"] += 1
        comps, stats = stats[:k], stats[k:]
        self.reward_moments.mul_(o.stats_decay).add_((1 - o.stats_decay) * torch.stack([comps, comps**2]))
        names = ["sample_first", "sample_second", "total_moments"]
        if "fidelity" in self.rewards:
            names += [f"real_{m}_{j}" for j in range(len(self.alignment.encoders)) for m in ("first", "second")]
        for name in names:
            buf = getattr(self, name)
            decay = o.real_stats_decay if name.startswith("real") else o.stats_decay
            buf.mul_(decay).add_((1 - decay) * stats[: buf.numel()].view_as(buf))
            stats = stats[buf.numel() :]
        if self.bins:
            sums, squares, seen = stats.view(3, self.bins)
            hit = seen > 0
            batch = torch.stack([sums, squares]) / seen.clamp_min(1e-12)
            moments = self.bin_moments * o.stats_decay + (1 - o.stats_decay) * batch
            self.bin_moments.copy_(moments.where(hit, self.bin_moments))
            self.bin_updates += hit.long()
        if not counts["ref_set"]:
            self.update_reference(step)

    def update_reference(self, step: int) -> None:
        """The reference of the adaptive lambda. ``prior``: the mean of v_P over the last tenth of
        warm-up; ``total`` (version 1): v_R at its end, under the weights that apply from the next
        step on (so lambda_s starts at lambda_0)."""
        o, counts = self.options, self.counts()
        if o.lambda_variance == "prior":
            if step + 1 > o.warmup_steps - max(1, math.ceil(o.warmup_steps / 10)):
                self.ref_accumulator += torch.stack([self.prior_variance(), torch.ones_like(self.v_R_ref)])
            if step + 1 >= o.warmup_steps:
                self.v_R_ref.copy_(self.ref_accumulator[0] / self.ref_accumulator[1])
                counts["ref_set"] = True
        elif step + 1 >= o.warmup_steps:
            self.v_R_ref.copy_(self.total_stats(self.weights())[1])
            counts["ref_set"] = True
