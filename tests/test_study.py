import json
import math
import re

import pytest

from vrpo.config import ConfigError
from vrpo.study import RETENTION_MIN_RA, RunRecord, load_study, mean_ci, run_study, steps_to_reach

pytest.importorskip("efficientnet_lite_pytorch")


def write_study(tmp_path, methods, eval_every=2, **extra):
    tiny = [
        "data.name=digits",
        "data.limit=40",
        "model.arch=SiT-T/8",
        "train.batch_size=8",
        "train.threads=1",
        "train.progress=false",
        "train.tensorboard=false",
        "sampler.steps=2",
        "train.sample_grid=4",
        "objective.projector_width=64",
        "objective.encoder_input_size=64",
        f"objective.feature_cache={tmp_path / 'cache'}",
        "train.max_steps=2",
        "train.log_every=1",
        f"eval.every={eval_every}",
        "eval.num_samples=8",
        "eval.ref=digits:test",
        "eval.ref_num=16",
        "eval.ra_num=8",
        f"eval.cache_dir={tmp_path / 'refstats'}",
    ]
    study = {
        "name": "tiny",
        "out": str(tmp_path / "runs"),
        "report": str(tmp_path / "report.md"),
        "base": "configs/fmnist/repa-t2.yaml",
        "set": tiny,
        "baseline": "sit",
        "seeds": [0, 1],
        "methods": methods,
        "index": str(tmp_path / "results.md"),
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    return path


def test_study_runs_paired_seeds_resumes_and_reports(tmp_path):
    path = write_study(tmp_path, {"sit": ["objective={name: sit}"], "repa": []}, eval_every=1)  # two curve points
    spec = load_study(path)
    report = run_study(spec, log=lambda *_: None)
    text = report.read_text()
    assert "| repa | sit | fid |" in text and "(n=2)" in text and "## fid against steps" in text
    assert report.with_suffix(".png").is_file()
    assert (
        "| repa | semantic | 0.5 +- 0 | 0.5 +- 0 | 0.5 - 0.5 |" in text
        and "| sit |" not in text.split("## Alignment coefficients")[1].split("##")[0]
    )
    # and in the final table, beside the method's metrics ("-" for SiT, which aligns nothing)
    final = text.split("## Final evaluation")[1].split("\n\n")[1]
    assert re.search(r"^\| repa \|.* \| semantic 0\.5 \|$", final, re.M) and re.search(
        r"^\| sit \|.* \| - \|$", final, re.M
    )
    assert (tmp_path / "report-coefficients.png").is_file()
    # the report shows its plots inline, below the final table
    assert "![report](report.png)" in text and "![report-coefficients](report-coefficients.png)" in text
    assert text.index("![report](report.png)") < text.index("## Alignment coefficients")
    # paired: both methods of a seed start from the same network
    from safetensors.torch import load_file

    from vrpo.runs.checkpoint import step_dirs

    runs = tmp_path / "runs"
    for seed in (0, 1):
        assert (runs / "sit" / f"seed{seed}" / "metrics.jsonl").is_file()
    # a finished study is not redone
    before = {p: p.stat().st_mtime for p in runs.rglob("metrics.jsonl")}
    run_study(spec, log=lambda *_: None)
    assert before == {p: p.stat().st_mtime for p in runs.rglob("metrics.jsonl")}
    a = load_file(str(step_dirs(runs / "sit/seed0")[0] / "model.safetensors"))
    b = load_file(str(step_dirs(runs / "sit/seed1")[0] / "model.safetensors"))
    assert any((a[k] != b[k]).any() for k in a)  # different seeds differ
    # step times compare only within one machine: sit seed 0 moved to another one leaves one seed
    from vrpo.study import write_report

    ratio = r"^\| repa \| sit \| s/step ratio \(same machine\) \| [^|]* \| [^|]* \| {} \|"
    assert re.search(ratio.format(2), text, re.M)
    attempts = tmp_path / "report" / "sit" / "seed0" / "attempts.jsonl"
    attempts.write_text(attempts.read_text().replace('"machine": "', '"machine": "another '))
    assert re.search(ratio.format(1), write_report(spec).read_text(), re.M)
    # a run still in progress (no timing file yet, nothing archived) is in the curves, not in the
    # final table, the paired differences or the step-time ratio
    import shutil

    shutil.rmtree(tmp_path / "report" / "repa" / "seed1")
    (runs / "repa" / "seed1" / "timing.jsonl").unlink()
    text = write_report(spec).read_text()
    final = text.split("## Final evaluation")[1].split("## ")[0]
    assert "In progress, in the curves only: repa seed 1." in text
    assert re.search(r"^\| repa \| [^|]*\(n=1\) \|", final, re.M) and "| repa | sit | fid |" in final
    assert re.search(r"^\| repa \| sit \| fid \| [^|]* \| - \| 1 \|", final, re.M)
    curve = text.split("## fid against steps")[1]
    assert re.search(r"^\| 2 \| [^|]*\(n=2\) \| [^|]*\(n=2\) \|", curve, re.M)


def test_study_archive_representations_speedup_and_index(tmp_path):
    """Finished runs are archived and not redone once their run folders are gone (a new machine);
    representation metrics include the transfer set; the index block is replaced, not appended."""
    import shutil

    (tmp_path / "results.md").write_text("# Results\n\nHand-written notes stay.\n")
    path = write_study(
        tmp_path,
        {"sit": ["objective={name: sit}"], "repa": []},
        eval_every=1,
        seeds=[0, 1],
        metrics=["fid", "fid_12", "ra", "var:loss"],
        speedup={"reference": "repa", "metric": "fid"},
        final={"num_samples": 12, "metrics": ["fid"]},
        contrasts=[["sit", "repa"]],
        representations={"metrics": ["ra", "cknna"], "num": 16, "transfer": "fashion-mnist"},
    )
    spec = load_study(path)
    run_study(spec, log=lambda *_: None)
    archive = tmp_path / "report" / "repa" / "seed1"
    reps = json.loads((archive / "representations.json").read_text())
    assert reps["in_domain"]["split"] == "test" and reps["transfer"]["dataset"] == "fashion-mnist"
    assert -1 <= reps["transfer"]["ra"] <= 1 and reps["in_domain"]["cknna"] is not None
    text = (tmp_path / "report.md").read_text()
    assert "ra_retention" in text and "Speed-up against repa" in text and "s/step ratio" in text
    final = json.loads((archive / "final_eval.json").read_text())
    assert final["step"] == 2 and final["num_samples_12"] == 12 and final["fid_12"] > 0
    assert "| repa | sit | fid_12 |" in text and "| repa | sit | var:loss |" in text
    # variances span decades: significant digits, so that a tiny one does not read as 0.000000
    assert re.search(r"\| repa \| sit \| var:loss \| [+-]\d\.\d\de[+-]\d\d \|", text)
    assert "| sit | repa | fid_12 |" in text and "| sit - repa |" in text  # a contrast beyond the baseline
    assert "## fid_12 against steps" not in text  # a single (final) point has no curve section
    shutil.rmtree(tmp_path / "runs")  # the machine was replaced: only the archive is left
    run_study(spec, log=lambda *_: None)
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "report.md").read_text() == text
    index = (tmp_path / "results.md").read_text()
    assert index.count("<!-- study:tiny -->") == 1 and "Hand-written notes stay." in index
    block = index.split("<!-- study:tiny -->")[1].split("<!-- /study:tiny -->")[0]
    assert "![report](report.png)" in block and "![report-coefficients](report-coefficients.png)" in block
    # another study with a run of the same resolved config reuses that run's archive, also when it was
    # archived by an earlier version, before keys with behaviour-keeping defaults existed, and with
    # another checkpoint cadence (what is kept on disk, not what is trained)
    import yaml

    saved = archive.parent / "seed0" / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    del tree["conventions"], tree["objective"]["schedule"], tree["train"]["ema_heads"]
    tree["train"].update(ckpt_every=999, keep_last=7)
    saved.write_text(yaml.safe_dump(tree, sort_keys=False))
    twin = write_study(
        tmp_path,
        {"repa": [], "sit": ["objective={name: sit}"], "sit-lr": ["objective={name: sit}", "optim.lr=2e-3"]},
        eval_every=1,
        seeds=[0],
        name="twin",
        out=str(tmp_path / "twin-runs"),
        report=str(tmp_path / "twin.md"),
    )
    messages = []
    run_study(load_study(twin), log=messages.append)
    assert sum("reusing it" in m for m in messages) == 2  # repa and sit, not sit-lr
    assert sorted(p.name for p in (tmp_path / "twin-runs").iterdir()) == ["sit-lr"]
    assert (tmp_path / "twin" / "repa" / "seed0" / "metrics.jsonl").read_text() == (
        archive.parent / "seed0" / "metrics.jsonl"
    ).read_text()
    # a method imported from another study's archive: shown, a speed-up reference, never trained
    imported = write_study(
        tmp_path,
        {"sit": ["objective={name: sit}"]},
        eval_every=1,
        name="imported",
        out=str(tmp_path / "imported-runs"),
        report=str(tmp_path / "imported.md"),
        imported={"repa-old": str(archive.parent)},
        speedup={"reference": ["sit", "repa-old"], "metric": "fid"},
        contrasts=[["repa-old", "sit"]],
    )
    run_study(load_study(imported), log=lambda *_: None)
    text = (tmp_path / "imported.md").read_text()
    assert "Speed-up against sit" in text and "Speed-up against repa-old" in text
    assert re.search(r"\| repa-old \| [\d.]+ \+- [\d.]+ \(n=2\)", text)  # both archived seeds read
    assert not (tmp_path / "imported-runs" / "repa-old").exists()


def test_study_extends_another(tmp_path):
    parent = write_study(tmp_path, {"sit": ["objective={name: sit}"], "repa": []})
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent}\nname: child\nset: [train.max_steps=3]\nseeds: [4]\n")
    spec = load_study(child)
    assert spec.name == "child" and spec.seeds == [4] and spec.set[-1] == "train.max_steps=3"
    assert "data.name=digits" in spec.set and list(spec.methods) == ["sit", "repa"]
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"extends: {loop}\n")
    with pytest.raises(ConfigError, match="loop"):
        load_study(loop)


def test_study_runs_only_the_chosen_methods_and_seeds(tmp_path):
    spec = load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"], "repa": []}))
    run_study(spec, log=lambda *_: None, only_seeds=[1], only_methods=["repa"])
    assert sorted(str(p.relative_to(tmp_path / "runs")) for p in (tmp_path / "runs").glob("*/seed*")) == ["repa/seed1"]


def test_steps_to_reach_interpolates():
    curve = [(100, 50.0), (200, 30.0), (300, 20.0)]
    assert steps_to_reach(curve, 40.0) == pytest.approx(150.0)
    assert steps_to_reach(curve, 60.0) == 100.0 and steps_to_reach(curve, 10.0) is None


def test_bad_study_files(tmp_path):
    with pytest.raises(ConfigError, match="baseline"):
        load_study(write_study(tmp_path, {"repa": []}))
    with pytest.raises(ConfigError, match="unknown config key"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"], "repa": ["train.stepz=3"]}))
    with pytest.raises(ConfigError, match="speedup.reference"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"]}, speedup={"reference": "vrpo"}))
    with pytest.raises(ConfigError, match="representations key"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"]}, representations={"transfr": "digits"}))
    with pytest.raises(ConfigError, match="not in the study's seeds"):
        run_study(load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"]})), only_seeds=[7])
    with pytest.raises(ConfigError, match="not in the study's methods"):
        run_study(load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"]})), only_methods=["vrpo"])
    with pytest.raises(ConfigError, match="study.contrasts"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"], "repa": []}, contrasts=[["repa", "vrpo"]]))
    with pytest.raises(ConfigError, match="no archive folder"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"]}, imported={"old": str(tmp_path / "x")}))
    with pytest.raises(ConfigError, match="name it once"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"]}, imported={"sit": str(tmp_path)}))
    with pytest.raises(ConfigError, match="study.final"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"]}, final={"num": 5000}))


def test_selection_rule_chooses_the_lowest_kept_and_breaks_ties_to_the_first():
    from types import SimpleNamespace

    from vrpo.study.records import RunRecord
    from vrpo.study.selection import choose, selection_lines

    def run(fid, ra):
        return {10: RunRecord(metrics={1200: {"fid": fid}}, seconds_per_step=None, wall_s=0.0,
                              representations={"in_domain": {"ra": ra}})}  # fmt: skip

    data = {"a-1": run(100.0, 0.7), "a-2": run(99.5, 0.7), "a-4": run(90.0, 0.2), "b-1": run(80.0, 0.6)}
    data["b-2"] = {10: RunRecord(metrics={}, seconds_per_step=None, wall_s=0.0, representations={})}
    rule = {"groups": {"a": ["a-1", "a-2", "a-4"], "b": ["b-1", "b-2"]}, "require": {"ra": 0.5}, "tie": 1.0}
    spec = SimpleNamespace(selection=rule, metric="fid")
    a, b = choose(spec, data)
    assert (a.chosen, a.excluded, a.measured) == ("a-1", ["a-4"], 3)  # a-4 is lower but collapsed; a-2 ties
    assert (b.chosen, b.measured, b.candidates) == ("b-1", 1, 2)
    text = "\n".join(selection_lines(spec, data))
    assert "| a | a-1 | 100.00 | 3/3 | a-4 | final |" in text and "| b | b-1 | 80.00 | 1/2 | - | provisional |" in text
    rule["tie"] = 0.0
    assert choose(spec, data)[0].chosen == "a-2"
    with pytest.raises(ConfigError, match="selection.groups.a"):
        from vrpo.study.selection import check_selection

        check_selection({"groups": {"a": ["a-1", "zz"]}}, data)


def test_interval_of_the_mean():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-3)


def test_one_seed_has_no_interval():
    from vrpo.study.report import _interval

    mean, half = mean_ci([4.0])
    assert mean == 4.0 and _interval(mean, half, ".2f") == "-"
    assert _interval(-2.0, 1.0, ".1f") == "[-3.0, -1.0]"


def test_ratio_interval_is_geometric_and_stays_positive():
    from vrpo.study.statistics import ratio_ci

    center, low, high = ratio_ci([2.0, 0.5])
    assert center == pytest.approx(1.0) and 0.0 < low < 0.5 and high == pytest.approx(1.0 / low)
    # a spread that an arithmetic interval would take below zero (the report once printed x-1.643)
    center, low, high = ratio_ci([0.6, 1.8])
    assert low > 0.0 and center == pytest.approx((0.6 * 1.8) ** 0.5)
    assert math.isnan(ratio_ci([1.1])[1])


def test_defer_final_leaves_the_final_evaluation_for_a_later_call(tmp_path):
    from vrpo.cli import main

    path = write_study(
        tmp_path, {"sit": ["objective={name: sit}"]}, seeds=[0], final={"num_samples": 8, "metrics": ["fid"]}
    )
    archive = tmp_path / "report" / "sit" / "seed0"
    assert main(["study", "--config", str(path), "--defer-final"]) == 0
    assert (archive / "metrics.jsonl").is_file() and not (archive / "final_eval.json").exists()
    trained = (archive / "log.jsonl").read_text()
    assert main(["study", "--config", str(path)]) == 0
    final = json.loads((archive / "final_eval.json").read_text())
    assert final["num_samples_8"] == 8
    assert (archive / "log.jsonl").read_text() == trained  # not retrained
    # on a new machine (run folder gone) the deferred final needs the weights: the study says it
    # retrains for them, and the retrained run is the same run
    import shutil

    shutil.rmtree(tmp_path / "runs")
    (archive / "final_eval.json").unlink()
    logged = []
    run_study(load_study(path), log=logged.append)
    assert any("final weights are no longer in" in m for m in logged)
    assert json.loads((archive / "final_eval.json").read_text())["fid_8"] == pytest.approx(final["fid_8"], rel=1e-4)

    def trained_values(text):  # the log without its clock readings
        return [
            {k: v for k, v in json.loads(r).items() if k not in ("time", "images_per_s")} for r in text.splitlines()
        ]

    assert trained_values((archive / "log.jsonl").read_text()) == trained_values(trained)


def test_curve_steps_are_evaluated_later_from_kept_checkpoints(tmp_path):
    """A curve point added after training equals the one the training loop measured at that step
    (same weights, samples and noise); with the checkpoints gone it is reported, not retrained."""
    import shutil

    from vrpo.cli import main

    methods = {"sit": ["objective={name: sit}", "train.max_steps=4", "train.ckpt_every=2"]}
    path = write_study(tmp_path, methods, seeds=[0], curve_steps=[2])
    assert main(["study", "--config", str(path), "--defer-final"]) == 0
    run, archive = tmp_path / "runs" / "sit" / "seed0", tmp_path / "report" / "sit" / "seed0"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    measured = next(r for r in records if r["step"] == 2)
    kept = "".join(json.dumps(r) + "\n" for r in records if r["step"] != 2)
    for folder in (run, archive):
        (folder / "metrics.jsonl").write_text(kept)
    trained = (archive / "log.jsonl").read_text()
    logged = []
    run_study(load_study(path), log=logged.append)
    later = {
        json.loads(line)["step"]: json.loads(line) for line in (archive / "metrics.jsonl").read_text().splitlines()
    }
    assert later[2]["fid"] == pytest.approx(measured["fid"], rel=1e-4) and later[4] == next(
        r for r in records if r["step"] == 4
    )
    assert (archive / "log.jsonl").read_text() == trained and any("curve steps [2]" in m for m in logged)
    # the checkpoints are gone (a new machine): the study says so and does not retrain
    for folder in (run, archive):
        (folder / "metrics.jsonl").write_text(kept)
    shutil.rmtree(run)
    logged.clear()
    run_study(load_study(path), log=logged.append)
    assert not run.exists() and any("not evaluated" in m for m in logged)
    with pytest.raises(ConfigError, match="curve_steps"):
        load_study(write_study(tmp_path, methods, seeds=[0], curve_steps=[3]))


def test_ra_retention_needs_an_in_domain_alignment():
    def record(ra_in, ra_out):
        reps = {"in_domain": {"ra": ra_in}, "transfer": {"ra": ra_out}}
        return RunRecord(metrics={}, seconds_per_step=None, wall_s=0.0, representations=reps)

    assert record(0.8, 0.6).value("ra_retention") == pytest.approx(75.0)
    assert record(0.8, 0.6).value("transfer_ra") == 0.6
    # a collapsed alignment: 0.2 / 0.1 would read as 200 % retention
    assert record(0.1, 0.2).value("ra_retention") is None and RETENTION_MIN_RA > 0.1


def test_training_wall_time_counts_killed_attempts(tmp_path):
    from vrpo.study import training_wall_s
    from vrpo.utils.jsonl import read_log

    def lines(name, records):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))

    lines("timing.jsonl", [{"wall_s": 70.0, "at": 270.0}])
    assert training_wall_s(tmp_path, []) == 70.0  # a run from before attempts were recorded
    lines("attempts.jsonl", [{"start": 100.0}, {"start": 200.0}])
    lines("log.jsonl", [{"step": 10, "time": 120.0}, {"step": 20, "time": 150.0}, {"step": 10, "time": 230.0}])
    assert (
        training_wall_s(tmp_path, read_log(tmp_path / "log.jsonl")) == 50.0 + 70.0
    )  # killed after its log line at 150, then completed
