"""The report's effective alignment coefficients: what multiplies each alignment term of the loss
(REPA's lambda, VRPO's lambda_s w_k), read from every run's training log through the objective
contract, as a table and a plot beside the report, so that a gain is read beside its coefficient."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vrpo.study.statistics import mean_ci


def terms_of(data, curves: str = "coefficients") -> list[str]:
    """The names any run of the study logs in its ``curves`` (``coefficients``: the alignment terms;
    ``schedule``: the adaptive quantities behind them), in first-seen order."""
    seen: dict[str, None] = {}
    for runs in data.values():
        for record in runs.values():
            seen.update(dict.fromkeys(getattr(record, curves)))
    return list(seen)


def summary(curve: list[tuple[int, float]]) -> tuple[float, float, float, float]:
    """(last, mean over the second half of the run's steps, min, max) of one run's coefficient."""
    steps, values = np.array([st for st, _ in curve]), np.array([v for _, v in curve])
    late = values[steps >= steps[-1] / 2]
    return float(values[-1]), float(late.mean()), float(values.min()), float(values.max())


def coefficient_cell(runs) -> str:
    """One method's coefficients for its row of the final table: per term, the mean over seeds of
    the second-half mean ("semantic 1.87, stability 0.75"); "-" for a method that aligns nothing."""
    late: dict[str, list[float]] = {}
    for record in runs.values():
        for term, curve in record.coefficients.items():
            if curve:
                late.setdefault(term, []).append(summary(curve)[1])
    return ", ".join(f"{term} {np.mean(v):.3g}" for term, v in late.items()) or "-"


def coefficient_lines(data) -> list[str]:
    terms = terms_of(data)
    if not terms:
        return []
    lines = [
        "## Alignment coefficients",
        "",
        "What multiplies each alignment term in the loss, from the training logs (REPA: lambda; VRPO v2: "
        "lambda_s w_k; VRPO v1: lambda_s w_k / sqrt(v_R); 0 where the term trains only the heads): at the last "
        "logged step and over the second half of training, mean +- 95 % interval over seeds; the range is over "
        "every logged step of every seed.",
        "",
        "| method | term | last | second half | range |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m, runs in data.items():
        for term in terms:
            rows = [summary(r.coefficients[term]) for r in runs.values() if r.coefficients.get(term)]
            if not rows:
                continue
            last, late = mean_ci([r[0] for r in rows]), mean_ci([r[1] for r in rows])
            cells = [f"{mean:.3g}" + (f" +- {half:.2g}" if len(rows) > 1 else "") for mean, half in (last, late)]
            low, high = min(r[2] for r in rows), max(r[3] for r in rows)
            lines.append(f"| {m} | {term} | {cells[0]} | {cells[1]} | {low:.3g} - {high:.3g} |")
    return lines + [""]


def plot_coefficients(data, title: str, out: Path) -> Path | None:
    """Top row, one panel per alignment term: each method's coefficient against steps; bottom row
    (where a method adapts them), what it is made of: lambda_s and each weight w_k. Means over seeds."""
    rows = [(curves, terms) for curves in ("coefficients", "schedule") if (terms := terms_of(data, curves))]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(len(terms) for _, terms in rows)
    fig, axes = plt.subplots(len(rows), width, figsize=(5 * width, 3.8 * len(rows)), squeeze=False)
    # the report's colours; dashes so that methods with equal values (fixed prior weights) stay visible
    styles = {m: {"color": f"C{i}", "linestyle": ("-", "--", ":", "-.")[i % 4]} for i, m in enumerate(data)}
    for row, (curves, terms) in enumerate(rows):
        for ax in axes[row][len(terms) :]:
            ax.set_visible(False)
        for ax, name in zip(axes[row], terms):
            for m, runs in data.items():
                per_step: dict[int, list[float]] = {}
                for record in runs.values():
                    for st, v in getattr(record, curves).get(name, []):
                        per_step.setdefault(st, []).append(v)
                if per_step:
                    steps = sorted(per_step)
                    ax.plot(steps, [np.mean(per_step[st]) for st in steps], label=m, **styles[m])
            ax.set_xlabel("step")
            ax.set_ylabel(f"coefficient on {name}" if curves == "coefficients" else name)
            if name.startswith("w_"):  # weights: a share in [0, 1]
                ax.set_ylim(0.0, 1.0)
            else:  # collapsed coefficients (1e-6) and v1's scale (~155) on one axis
                ax.set_yscale("symlog", linthresh=1e-3)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: effective alignment coefficients, and lambda_s and the weights (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
