"""VRPO's diagnostics: gradient shares at the rewarded block, the known failure modes as
warnings, and the plot of the weights and lambda_s over a run."""

from __future__ import annotations

from pathlib import Path

import torch

from vrpo.objectives.vrpo.options import REWARDS
from vrpo.utils.jsonl import read_log


def gradient_shares(block: torch.nn.Module, denoise: torch.Tensor, reward_terms: torch.Tensor) -> torch.Tensor:
    """Norm shares at ``block`` (the block carrying the rewards): [denoise, align] of their sum,
    then each reward of the sum of the reward norms. Costs 1 + K partial backward passes."""
    params = [p for p in block.parameters() if p.requires_grad]

    def grad(term: torch.Tensor) -> torch.Tensor:
        if not term.requires_grad:
            return torch.zeros(sum(p.numel() for p in params), device=term.device)
        gs = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).flatten().float() for g, p in zip(gs, params)])

    parts = [grad(term) for term in reward_terms]
    norms = torch.stack([grad(denoise).norm(), torch.stack(parts).sum(0).norm()])
    reward_norms = torch.stack([v.norm() for v in parts])
    return torch.cat(
        [norms / norms.sum().clamp_min(1e-30), reward_norms / reward_norms.sum().clamp_min(1e-30)]
    ).detach()


def dominant_weight(record: dict[str, float], rewards: list[str]) -> str | None:
    """The warning for inverse-variance weights that give one reward >= 95 % of the total."""
    weights = {k: record[f"w_{k}"] for k in rewards if f"w_{k}" in record}
    if len(weights) < 2 or max(weights.values()) < 0.95:
        return None
    top = max(weights, key=weights.get)
    variances = ", ".join(f"{k} {record.get(f'r_{k}_var', float('nan')):.1e}" for k in weights)
    return (
        f"VRPO: the inverse-variance weights give the {top} reward {weights[top]:.1%} of the total (reward variances: "
        f"{variances}), so the other rewards no longer train the projector; with stability on top this collapsed the "
        "projector on the embedded benchmark (docs/results.md). Options: objective.weighting=fixed, "
        "objective.variance_eps=1e-3"
    )


def plot_vrpo(run_dir: str | Path) -> Path | None:
    """RUN/vrpo_weights.png: the weights w_k, lambda_s and the effective coefficients of the rewards
    in L_align over training, from RUN/log.jsonl."""
    run_dir = Path(run_dir)
    records = [r for r in read_log(run_dir / "log.jsonl") if "lambda_s" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    panels = [("w_", "weight w_k"), ("coef_", "coefficient in L_align")]
    panels = [(prefix, label) for prefix, label in panels if any(f"{prefix}{k}" in records[0] for k in REWARDS)]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(6, 2.5 * (len(panels) + 1)), sharex=True)
    for ax, (prefix, label) in zip(axes, panels):
        for k in REWARDS:
            if f"{prefix}{k}" in records[0]:
                ax.plot(steps, [r.get(f"{prefix}{k}", float("nan")) for r in records], label=k)
        ax.set_ylabel(label)
        ax.legend()
    axes[-1].plot(steps, [r["lambda_s"] for r in records], color="k")
    axes[-1].set_ylabel("lambda_s")
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "vrpo_weights.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
