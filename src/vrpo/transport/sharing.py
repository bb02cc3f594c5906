"""DDT's encoder sharing at sampling: the condition encoder of a decoupled network runs at some of
the network evaluations, and the others reuse its last output.

A schedule is the set of evaluation indices (0-based, counted over every network call of one
sampling run: one per Euler or SDE step, two per Heun step) at which the encoder runs.
``sampler.encoder_sharing`` k recomputes every k-th evaluation; ``optimal_schedule`` is DDT's dynamic
programme: on a template batch sampled without sharing, it picks the recompute points that
minimise the summed cosine distance between each evaluation's encoder output and the one it reuses.
"""

from __future__ import annotations

import torch


class EncoderSharing:
    """The shared encoder output of one sampling run: the encoder runs at the evaluations in
    ``recompute``, or, without a set, at every ``every``-th (1: always).

    ``record`` keeps every evaluation's output (the template run of ``optimal_schedule``).
    """

    def __init__(self, recompute: set[int] | None = None, every: int = 1, record: bool = False):
        if every < 1:
            raise ValueError(f"encoder sharing needs a period >= 1, got {every}")
        self.recompute, self.every, self.record = recompute, every, record
        self.evaluation, self.encoder_runs = 0, 0
        self.state: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []

    def condition(self, rows: int) -> torch.Tensor | None:
        """The output to reuse at this evaluation, or None to run the encoder (its batch must match:
        a guidance interval changes the rows between a doubled and a plain batch)."""
        index, self.evaluation = self.evaluation, self.evaluation + 1
        fresh = index in self.recompute if self.recompute is not None else index % self.every == 0
        if not fresh and self.state is not None and self.state.shape[0] == rows:
            return self.state
        self.encoder_runs += 1
        return None

    def keep(self, condition: torch.Tensor | None) -> None:
        self.state = condition
        if self.record and condition is not None:
            self.history.append(condition.detach())


def sharing_costs(history: list[torch.Tensor]) -> torch.Tensor:
    """cost[j, i] (i >= j): the summed cosine distance of evaluations j..i to evaluation j's output,
    averaged over samples and tokens (their batches must match: one guidance regime)."""
    states = torch.nn.functional.normalize(torch.stack([h.double() for h in history]).flatten(1, 2), dim=-1)
    similarity = torch.einsum("ird,jrd->ij", states, states) / states.shape[1]  # [N, N], mean over rows
    distance = (1.0 - similarity).tril()  # row m, column j: m reusing j (m >= j)
    return distance.cumsum(0).T  # [j, i]: sum over m = j..i


def optimal_schedule(costs: torch.Tensor, count: int) -> set[int]:
    """The ``count`` recompute points (0 among them) minimising the summed cost of the segments they
    start, each segment j..i costing ``costs[j, i]`` (DDT's dynamic programme)."""
    n = costs.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"encoder sharing needs 1..{n} recompute points, got {count}")
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(count + 1)]  # best[k][i]: evaluations 0..i-1 in k segments
    start = [[-1] * (n + 1) for _ in range(count + 1)]
    for i in range(1, n + 1):
        best[1][i], start[1][i] = float(costs[0, i - 1]), 0
    for k in range(2, count + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = best[k - 1][j] + float(costs[j, i - 1])
                if value < best[k][i]:
                    best[k][i], start[k][i] = value, j
    points, end = set(), n
    for k in range(count, 0, -1):
        end = start[k][end]
        points.add(end)
    return points
