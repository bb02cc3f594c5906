import json

import pytest

from vrpo.config import ConfigError
from vrpo.study import load_study, mean_ci, run_study

pytest.importorskip("efficientnet_lite_pytorch")


@pytest.fixture(autouse=True)
def _root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def write_study(tmp_path, methods):
    tiny = [
        "data.name=digits", "data.limit=40", "model.arch=SiT-T/8", "train.batch_size=8", "train.threads=1",
        "train.progress=false", "train.tensorboard=false", "sampler.steps=2", "train.sample_grid=4",
        "objective.projector_width=64", "objective.encoder_input_size=64",
        f"objective.feature_cache={tmp_path / 'cache'}", "train.max_steps=2", "eval.every=2", "eval.num_samples=8",
        "eval.ref=digits:test", "eval.ref_num=16", "eval.ra_num=8", f"eval.cache_dir={tmp_path / 'refstats'}",
    ]
    study = {
        "name": "tiny", "out": str(tmp_path / "runs"), "report": str(tmp_path / "report.md"),
        "base": "configs/fmnist/repa-t2.yaml", "set": tiny, "baseline": "sit", "seeds": [0, 1], "methods": methods,
    }
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(study))
    return path


def test_study_runs_paired_seeds_resumes_and_reports(tmp_path):
    path = write_study(tmp_path, {"sit": ["objective={name: sit}"], "repa": []})
    spec = load_study(path)
    report = run_study(spec, log=lambda *_: None)
    text = report.read_text()
    assert "| repa | 2 |" in text and "(n=2)" in text
    assert report.with_suffix(".png").is_file()
    # paired: both methods of a seed start from the same network
    from safetensors.torch import load_file

    from vrpo.train.checkpoint import step_dirs

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


def test_bad_study_files(tmp_path):
    with pytest.raises(ConfigError, match="baseline"):
        load_study(write_study(tmp_path, {"repa": []}))
    with pytest.raises(ConfigError, match="unknown config key"):
        load_study(write_study(tmp_path, {"sit": ["objective={name: sit}"], "repa": ["train.stepz=3"]}))


def test_interval_of_the_mean():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5, rel=1e-3)
