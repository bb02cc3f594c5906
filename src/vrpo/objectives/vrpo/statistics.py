"""VRPO's running statistics: buffers of the reward moments and the real-feature moments,
with bias correction, the weights and lambda_s derived from them, and the once-per-step commit.

Statistics are accumulated during ``loss`` (every micro-batch) and committed once per optimizer
step in ``end_of_step``, averaged over ranks, so gradient accumulation and DDP see one update per
step and a resumed run continues exactly. Inside ``loss`` they are constants.
"""

from __future__ import annotations

import torch

from vrpo.utils.dist import all_reduce_mean


def psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


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

    def total_stats(self, w: torch.Tensor, total: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """m_R and the per-sample variance v_R of R = w . r; this batch's own (``total``) before
        any history. ``components``: from the components' moments, so a change of weights
        (the end of warm-up) does not leave R's statistics on another scale."""
        o = self.options
        if self.counts()["updates"] == 0:
            r = total.detach().double()
            return r.mean(), r.var(unbiased=False).clamp_min(o.variance_eps)
        if o.total_stats == "direct":
            first, second = self._corrected(self.total_moments, o.stats_decay)
            return first, (second - first**2).clamp_min(o.variance_eps)
        first = self._corrected(self.sample_first, o.stats_decay)
        cov = self._corrected(self.sample_second, o.stats_decay) - torch.outer(first, first)
        return w @ first, (w @ cov @ w).clamp_min(o.variance_eps)

    def weights(self) -> torch.Tensor:
        o = self.options
        stats, counts = self.reward_stats(), self.counts()
        if o.weighting == "fixed" or counts["steps"] < o.warmup_steps or counts["updates"] < 2:
            w = self.reward_moments.new_tensor([getattr(o, f"weight_{r}") for r in self.rewards])
        else:
            w = 1.0 / (stats[1] + o.variance_eps)
        return w / w.sum()

    def lambda_s(self, v_R: torch.Tensor) -> float | torch.Tensor:
        o = self.options
        if not o.adaptive_lambda or not self.counts()["ref_set"]:
            return o.lambda_0
        return (o.lambda_0 * (v_R / self.v_R_ref) ** o.kappa).clamp(o.lambda_min, o.lambda_max)

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
        self, components: torch.Tensor, samples: torch.Tensor, total: torch.Tensor, real: list[torch.Tensor]
    ) -> None:
        """Keep one micro-batch's statistics (batch values [K], per-sample components [K, B],
        R_i [B], real features) until ``end_of_step`` commits the step."""
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
        if not counts["ref_set"] and step + 1 >= o.warmup_steps:
            # under the weights that apply from the next step on, so lambda_s starts at lambda_0
            self.v_R_ref.copy_(self.total_stats(self.weights())[1])
            counts["ref_set"] = True
