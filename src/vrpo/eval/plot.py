"""Metric curves of several runs: each run's metrics.jsonl, one line per run, one panel per metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vrpo.errors import EvalError
from vrpo.utils.jsonl import read_log
from vrpo.utils.types import PathLike


def metric_curves(run: PathLike, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` in RUN/metrics.jsonl (or that file itself); a later record for a step wins."""
    path = Path(run)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise EvalError(f"{path} not found: evaluate the run with `vrpo eval ... --append {path}` first")
    points = {}
    for record in read_log(path):
        value = record.get(metric)
        if "step" in record and isinstance(value, (int, float)) and not isinstance(value, bool):
            points[int(record["step"])] = float(value)
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_runs(runs: Sequence[PathLike], out: PathLike, metrics: Sequence[str] = ("fid",)) -> Path:
    """Draw ``metrics`` against steps for every run into one PNG (matplotlib Agg)."""
    if not runs or not metrics:
        raise EvalError("plot needs at least one run and one metric")
    curves = {metric: {str(run): metric_curves(run, metric) for run in runs} for metric in metrics}
    for metric, per_run in curves.items():
        if not any(steps for steps, _ in per_run.values()):
            raise EvalError(f"no record with 'step' and {metric!r} in {', '.join(per_run)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, (metric, per_run) in zip(axes[0], curves.items()):
        for run, (steps, values) in per_run.items():
            if steps:
                ax.plot(steps, values, marker="o", markersize=3, label=run)
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
