"""A study's report: the final table with paired differences, the speed-up, the curves, the
PNG beside it, and the study's summary block in the results index."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vrpo.study.coefficients import coefficient_cell, coefficient_lines, plot_coefficients
from vrpo.study.records import RETENTION_MIN_RA, collect, finished_runs, measured_steps
from vrpo.study.selection import selection_lines
from vrpo.study.spec import StudySpec
from vrpo.study.statistics import mean_ci, ratio_ci, steps_to_reach, verdict


def _fmt(mean: float, half: float, n: int, fmt: str = ".2f") -> str:
    if n == 0:
        return "-"
    return f"{mean:{fmt}} +- {half:{fmt}} (n={n})" if n > 1 else f"{mean:{fmt}} (n=1)"


def _number_format(key: str) -> str:
    """Format spec of a metric's values: variances span decades, so they get significant digits."""
    if key.startswith("var:"):
        return ".2e"
    return ".4f" if key.startswith(("ra", "cknna", "transfer")) and key != "ra_retention" else ".2f"


def _interval(mean: float, half: float, fmt: str) -> str:
    """[low, high] of a 95 % interval of a difference; "-" where one seed gives none."""
    if math.isnan(half):
        return "-"
    return f"[{mean - half:+{fmt}}, {mean + half:+{fmt}}]"


def _ratio_cells(ratios: list[float], fmt: str) -> str:
    """ "x{geometric mean} | [x{low}, x{high}]" of per-seed ratios ("-" for the interval of one seed)."""
    center, low, high = ratio_ci(ratios)
    interval = "-" if math.isnan(low) else f"[x{low:{fmt}}, x{high:{fmt}}]"
    return f"x{center:{fmt}} | {interval}"


def paired(
    data, spec: StudySpec, method: str, key: str, step: int | None = None, reference: str | None = None
) -> list[float]:
    """Per-seed differences method - reference (default: the baseline) where both have the value."""
    out = []
    for s in spec.seeds:
        run, ref = data[method].get(s), data[reference or spec.baseline].get(s)
        a, b = (run.value(key, step), ref.value(key, step)) if run and ref else (None, None)
        if a is not None and b is not None:
            out.append(a - b)
    return out


def same_machine(a, b) -> bool:
    """Two runs whose step times compare: both timed, on one recorded machine (a study's runs
    move between machines of different speeds; the interleaved benchmarks measure overheads)."""
    return bool(a.seconds_per_step and b.seconds_per_step and a.machine and a.machine == b.machine)


def final_table(spec: StudySpec, data) -> list[str]:
    keys = spec.report_metrics
    if spec.representations:
        keys += [k for k in ("ra", "cknna") if k not in keys]
        if spec.representations.get("transfer"):
            keys += ["transfer_ra", "ra_retention"]
    header = " | ".join(keys) + " | s/step (as run) | training h | alignment coefficient (second half)"
    lines = [f"| method | {header} |", "| --- |" + " --- |" * (len(keys) + 3)]
    for m, runs in data.items():
        cells = []
        for k in keys:
            vals = [v for r in runs.values() if (v := r.value(k)) is not None]
            cells.append(_fmt(*mean_ci(vals), len(vals), _number_format(k)))
        sps = [r.seconds_per_step for r in runs.values() if r.seconds_per_step]
        cells.append(_fmt(*mean_ci(sps), len(sps), ".3f"))
        cells.append(f"{sum(r.wall_s for r in runs.values()) / 3600:.2f}")
        cells.append(coefficient_cell(runs))  # beside the metrics: a gain is read with its coefficient
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired differences at the final evaluation, method - reference (negative = lower than the reference; "
        "for RA, CKNNA and retention higher is better); the interval is the 95 % Student-t interval over seeds"
        + (
            f"; retention is left out where the in-domain RA is below {RETENTION_MIN_RA}"
            if spec.representations.get("transfer")
            else ""
        )
        + ":",
        "",
        "| method | reference | metric | mean difference | 95 % interval | seeds | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, ref in spec.pairs:
        for k in keys:
            diffs = paired(data, spec, m, k, reference=ref)
            if diffs:
                mean, half = mean_ci(diffs)
                f = _number_format(k)
                lines.append(
                    f"| {m} | {ref} | {k} | {mean:+{f}} | {_interval(mean, half, f)} | {len(diffs)} | "
                    f"{verdict(k, mean, half, len(diffs))} |"
                )
        ratios = [
            data[m][s].seconds_per_step / data[ref][s].seconds_per_step
            for s in spec.seeds
            if s in data[m] and s in data[ref] and same_machine(data[m][s], data[ref][s])
        ]
        if ratios:  # a ratio, not a difference
            lines.append(
                f"| {m} | {ref} | s/step ratio (same machine) | {_ratio_cells(ratios, '.3f')} | {len(ratios)} | - |"
            )
    return lines


def speedup_lines(spec: StudySpec, data) -> list[str]:
    """Per reference method: the steps each method needs to reach its final value, as a ratio per seed."""
    return [line for ref in spec.speedup_references for line in speedup_against(spec, data, ref)]


def speedup_against(spec: StudySpec, data, ref: str) -> list[str]:
    key = spec.speedup.get("metric", spec.metric)
    lines = [
        f"## Speed-up against {ref}'s final {key}",
        "",
        f"Per seed: the step at which a method's {key} curve first reaches {ref}'s final value of that seed "
        "(linear between evaluations); speed-up = final step / that step. 'not reached' runs are counted, not "
        "averaged.",
        "",
        "| method | speed-up (geometric mean) | 95 % interval | seeds reached | per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in (m for m in spec.methods if m != ref):
        ratios, per_seed = [], []
        for s in spec.seeds:
            if s not in data[ref] or s not in data[m]:
                continue
            target_curve, curve = data[ref][s].curve(key), data[m][s].curve(key)
            if not target_curve or not curve:
                continue
            final_step, target = target_curve[-1]
            reached = steps_to_reach(curve, target)
            per_seed.append(f"{s}: " + (f"x{final_step / reached:.2f}" if reached else "not reached"))
            if reached:
                ratios.append(final_step / reached)
        if per_seed:
            cells = _ratio_cells(ratios, ".2f") if ratios else "- | -"
            lines.append(f"| {m} | {cells} | {len(ratios)}/{len(per_seed)} | {'; '.join(per_seed)} |")
    return lines + [""]


def write_report(spec: StudySpec) -> Path:
    data = collect(spec)
    final = finished_runs(data)  # final values, step times, selection and speed-up: finished runs only
    report = Path(spec.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    hours = sum(r.wall_s for runs in data.values() for r in runs.values()) / 3600
    running = [f"{m} seed {s}" for m, runs in data.items() for s, r in runs.items() if not r.finished and r.log]
    head = [
        f"# Study {spec.name}",
        "",
        f"Base config `{spec.base}`, overrides `{' '.join(spec.set)}`; seeds {spec.seeds} (paired); "
        f"training wall time of the runs so far: {hours:.2f} h."
        + (f" In progress, in the curves only: {', '.join(running)}." if running else ""),
        "",
        "## Final evaluation (mean +- 95 % interval over seeds; n = seeds measured)",
        "",
    ]
    summary = final_table(spec, final)
    plots = [
        _plot(spec, data, report.with_suffix(".png")),
        plot_coefficients(data, spec.name, report.with_name(f"{report.stem}-coefficients.png")),
    ]
    plots = [p for p in plots if p is not None]
    # inline below the final table, so that the report (and the index's block) shows them
    figures = ["", *(f"![{p.stem}]({p.name})" for p in plots)] if plots else []
    lines = [*head, *summary, *figures, ""]
    lines += selection_lines(spec, final) + coefficient_lines(final) + speedup_lines(spec, final)
    for key in spec.report_metrics:
        steps = measured_steps(data, key)
        if len(steps) < 2:  # a single point (a final-only metric) is already in the final table
            continue
        lines += [
            f"## {key} against steps",
            "",
            "| step | " + " | ".join(spec.methods) + " | " + " | ".join(f"{m} - {ref}" for m, ref in spec.pairs) + " |",
            "| --- |" + " --- |" * (len(spec.methods) + len(spec.pairs)),
        ]
        for st in steps:
            cells = []
            for m in spec.methods:
                vals = [v for r in data[m].values() if (v := r.value(key, st)) is not None]
                cells.append(_fmt(*mean_ci(vals), len(vals), _number_format(key)))
            for m, ref in spec.pairs:
                diffs, f = paired(data, spec, m, key, st, reference=ref), _number_format(key)
                if not diffs:
                    cells.append("-")
                    continue
                mean, half = mean_ci(diffs)
                cells.append(f"{mean:+{f}} " + (_interval(mean, half, f) if len(diffs) > 1 else "(n=1)"))
            lines.append(f"| {st} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "Per-run files: the archive beside this report (config, metrics.jsonl, log.jsonl, representations.json).",
        "Regenerate with `vrpo study --config STUDY.yaml --report-only`.",
    ]
    report.write_text("\n".join(lines) + "\n")
    if spec.index:
        update_index(Path(spec.index), spec, summary, report, plots)
    return report


def _relative(path: Path, folder: Path) -> Path:
    try:
        return path.resolve().relative_to(folder.resolve())
    except ValueError:
        return path


def update_index(index: Path, spec: StudySpec, summary: list[str], report: Path, plots: list[Path] = ()) -> None:
    """Replace (or append) this study's block in the results index; the rest of the file is left as written."""
    begin, end = f"<!-- study:{spec.name} -->", f"<!-- /study:{spec.name} -->"
    link = _relative(report, index.parent)
    figures = [f"![{p.stem}]({_relative(p, index.parent)})\n" for p in plots]
    block = "\n".join([begin, f"### Study `{spec.name}` ([report]({link}))", "", *summary, "", *figures, end])
    text = index.read_text() if index.is_file() else "# Results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    index.parent.mkdir(parents=True, exist_ok=True)
    index.write_text(text)


def _plot(spec: StudySpec, data, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in spec.report_metrics if len(measured_steps(data, k)) > 1]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    colors = {m: f"C{i}" for i, m in enumerate(data)}  # one colour per method in every panel
    for ax, key in zip(axes[0], keys):
        for m, runs in data.items():
            steps = sorted({st for r in runs.values() for st, _ in r.curve(key)})
            if not steps:
                continue
            stats = [mean_ci([v for r in runs.values() if (v := r.value(key, st)) is not None]) for st in steps]
            mean = np.array([s[0] for s in stats])
            half = np.nan_to_num(np.array([s[1] for s in stats]))
            ax.plot(steps, mean, marker="o", label=m, color=colors[m])
            ax.fill_between(steps, mean - half, mean + half, alpha=0.2, color=colors[m])
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{spec.name} (mean, 95 % interval over seeds {spec.seeds})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
