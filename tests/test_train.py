"""End-to-end training: loss falls, exact resume after SIGKILL, damaged checkpoints, NaN guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from vrpo.config import load_config
from vrpo.runs import checkpoint
from vrpo.runs.checkpoint import step_dirs
from vrpo.train import TrainingDiverged, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/fmnist/sit-t2.yaml")


def tiny_cfg(tiny, *extra):
    return load_config(CONFIG, [*tiny, *extra])


def final_weights(run: Path) -> dict:
    last = step_dirs(run)[0]
    return {name: load_file(str(last / f"{name}.safetensors")) for name in ("model", "ema", "optimizer", "objective")}


def assert_bit_identical(a: dict, b: dict):
    for group in a:
        assert a[group].keys() == b[group].keys(), group
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), f"{group}.{key} differs"


def cli(run: Path, tiny, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "vrpo.cli", "train", "--config", CONFIG, "--out", str(run)]
    for item in [*tiny, *extra]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_short_run_loss_falls_and_writes_outputs(tmp_path, tiny_overrides):
    result = train(
        tiny_cfg(
            tiny_overrides, "train.max_steps=60", "train.log_every=5", "train.ckpt_every=30", "train.tensorboard=true"
        ),
        tmp_path,
    )
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 60
    first, last = records[0]["loss"], np.mean([r["loss"] for r in records[-3:]])
    assert last < 0.7 * first, (first, last)
    assert result.samples.is_file() and result.loss_curve.is_file()
    assert (tmp_path / "config.yaml").is_file() and any((tmp_path / "tb").iterdir())
    assert {"loss", "grad_norm", "lr", "images_per_s", "skipped_steps"} <= records[0].keys()
    assert len(step_dirs(tmp_path)) == 2  # steps 30 and 60


def test_sigkill_and_resume_is_bit_identical(tmp_path, tiny_overrides):
    steps = ["train.max_steps=16", "train.ckpt_every=2", "train.log_every=1"]
    reference = tmp_path / "reference"
    proc = cli(reference, tiny_overrides, *steps)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()

    killed = tmp_path / "killed"
    kills = 0
    for wait_for_lines in (3, 9):  # kill mid-training twice, at different steps
        proc = cli(killed, tiny_overrides, *steps)
        deadline = time.time() + 240
        log = killed / "log.jsonl"
        while time.time() < deadline and proc.poll() is None:
            lines = len(log.read_text().splitlines()) if log.exists() else 0
            if lines >= wait_for_lines:
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    assert kills == 2
    proc = cli(killed, tiny_overrides, *steps)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "resuming" in out
    assert_bit_identical(final_weights(reference), final_weights(killed))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_writes_a_checkpoint_at_the_current_step_and_a_rerun_resumes(tmp_path, tiny_overrides, stop):
    steps = ["train.max_steps=40", "train.ckpt_every=1000", "train.log_every=1"]
    run = tmp_path / "run"
    proc = cli(run, tiny_overrides, *steps)
    log = run / "log.jsonl"
    deadline = time.time() + 240
    while (
        time.time() < deadline and proc.poll() is None and len(log.read_text().splitlines() if log.exists() else []) < 3
    ):
        time.sleep(0.05)
    proc.send_signal(stop)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + stop, out
    stopped_at = int(out.split(" at step ")[1].split(":")[0])
    assert f"stopped by {signal.Signals(stop).name} at step {stopped_at}: checkpoint written" in out
    assert [int(d.name[5:]) for d in step_dirs(run)] == [stopped_at] and 3 <= stopped_at < 40  # not a ckpt_every step
    proc = cli(run, tiny_overrides, *steps)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0 and f"from step {stopped_at}" in out, out


KILL_IN_SAVE = """
import os, signal, sys
import vrpo.runs.checkpoint as ck
calls = {"n": 0}
real = ck._fsync
def fsync_then_die(path):
    real(path)
    calls["n"] += 1
    if calls["n"] == int(sys.argv[1]):  # mid-way through a later checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
ck._fsync = fsync_then_die
from vrpo.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_kill_during_save_leaves_the_previous_checkpoint(tmp_path, tiny_overrides):
    steps = ["train.max_steps=6", "train.ckpt_every=2", "train.log_every=1"]
    args = ["train", "--config", CONFIG, "--out", str(tmp_path / "run")]
    for item in [*tiny_overrides, *steps]:
        args += ["--set", item]
    # Each save fsyncs 6 files and the folder; die at the 10th fsync, inside the second save.
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_SAVE, "10", *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    assert [p.name for p in step_dirs(run)] == ["step_00000002"]
    assert list((run / "checkpoints").glob(".tmp_step_*"))  # the half-written one
    done = subprocess.run([sys.executable, "-m", "vrpo.cli", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and "from step 2" in done.stdout
    assert not list((run / "checkpoints").glob(".tmp_step_*"))
    reference = tmp_path / "reference"
    train(tiny_cfg(tiny_overrides, *steps), reference)
    assert_bit_identical(final_weights(reference), final_weights(run))


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_overrides, capsys):
    steps = ["train.max_steps=4", "train.ckpt_every=2"]
    train(tiny_cfg(tiny_overrides, *steps), tmp_path / "run")
    latest = step_dirs(tmp_path / "run")[0]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    result = train(tiny_cfg(tiny_overrides, "train.max_steps=6", "train.ckpt_every=2"), tmp_path / "run")
    out = capsys.readouterr().out
    assert "skipping damaged checkpoint step_00000004" in out and "truncated or corrupt" in out
    assert "resuming" in out and "from step 2" in out
    assert result.step == 6
    assert (tmp_path / "run/checkpoints/damaged_step_00000004").is_dir()  # kept for inspection
    reference = tmp_path / "reference"
    train(tiny_cfg(tiny_overrides, "train.max_steps=6", "train.ckpt_every=2"), reference)
    assert_bit_identical(final_weights(reference), final_weights(tmp_path / "run"))


def test_rank_0_alone_verifies_the_checkpoint_the_others_read_the_one_it_chose(tmp_path, tiny_overrides, monkeypatch):
    train(tiny_cfg(tiny_overrides, "train.max_steps=4", "train.ckpt_every=2"), tmp_path / "run")
    newest = step_dirs(tmp_path / "run")[0]
    weights = newest / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 1  # same size, another value: only its hash tells
    weights.write_bytes(bytes(damaged))

    def hashed(path):
        raise AssertionError(f"{path} hashed on a rank other than 0")

    with monkeypatch.context() as other_rank:  # rank 0 named step 4: read as it is, no hash
        other_rank.setattr(checkpoint, "is_main", lambda: False)
        other_rank.setattr(checkpoint, "broadcast_object", lambda value: str(newest))
        other_rank.setattr(checkpoint, "_sha256", hashed)
        assert checkpoint.agreed_checkpoint(tmp_path / "run").step == 4
    chosen = checkpoint.agreed_checkpoint(tmp_path / "run")  # rank 0 (one process): it verifies
    assert chosen.step == 2 and (tmp_path / "run/checkpoints/damaged_step_00000004").is_dir()


def test_resume_refuses_a_different_config(tmp_path, tiny_overrides):
    from vrpo.config import ConfigError

    train(tiny_cfg(tiny_overrides, "train.max_steps=2"), tmp_path)
    with pytest.raises(ConfigError, match="optim.lr"):
        train(tiny_cfg(tiny_overrides, "train.max_steps=4", "optim.lr=0.1"), tmp_path)
    assert train(tiny_cfg(tiny_overrides, "train.max_steps=3"), tmp_path).step == 3  # longer is fine


def test_a_run_saved_before_the_fused_adamw_keeps_torchs_default_path(tmp_path, tiny_overrides):
    import yaml

    from vrpo.config import ConfigError
    from vrpo.runs import load_run_config

    train(tiny_cfg(tiny_overrides, "train.max_steps=2"), tmp_path)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["optim"].pop("fused") is True  # the default now
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    assert load_run_config(tmp_path).optim.fused is False
    with pytest.raises(ConfigError, match="optim.fused"):  # another optimizer path is another run
        train(tiny_cfg(tiny_overrides, "train.max_steps=3"), tmp_path)
    assert train(tiny_cfg(tiny_overrides, "train.max_steps=3", "optim.fused=false"), tmp_path).step == 3


@pytest.mark.parametrize("text,problem", [("model: [unclosed", "not valid YAML"), ("- a list", "mapping")])
def test_a_corrupt_run_config_is_refused_in_one_line(tmp_path, text, problem):
    from vrpo.config import ConfigError
    from vrpo.runs import load_run_config

    (tmp_path / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=problem) as err:
        load_run_config(tmp_path)
    assert "\n" not in str(err.value) and "config.yaml" in str(err.value)


def _latent_shards(folder: Path, nan_rows: slice) -> Path:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 4, 8, 8, generator=g)
    latents[nan_rows] = float("nan")
    save_file({"images": latents, "labels": torch.arange(64) % 10}, str(folder / "shard-0.safetensors"))
    return folder


LATENT = ["data.name=tensors", "data.resolution=8", "data.limit=0", "model.arch=SiT-T/4", "train.batch_size=8"]


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, tiny_overrides):
    shards = _latent_shards(tmp_path / "shards", slice(0, 2))  # 2 of 64 latents are NaN
    cfg = tiny_cfg(
        tiny_overrides,
        *LATENT,
        f"data.root={shards}",
        "train.max_steps=16",
        "train.log_every=16",
        "train.max_nonfinite=3",
    )
    result = train(cfg, tmp_path / "run")
    assert 0 < result.skipped_steps < 16
    record = json.loads((tmp_path / "run/log.jsonl").read_text().splitlines()[-1])
    assert record["skipped_steps"] == result.skipped_steps
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run")["model"].values())


def test_nonfinite_streak_stops_with_the_last_good_checkpoint(tmp_path, tiny_overrides):
    shards = _latent_shards(tmp_path / "shards", slice(0, 64))  # every latent is NaN
    cfg = tiny_cfg(tiny_overrides, *LATENT, f"data.root={shards}", "train.max_steps=10", "train.max_nonfinite=3")
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with a non-finite"):
        train(cfg, tmp_path / "run")


def test_dit_ddpm_trains_and_samples(tmp_path, tiny_overrides):
    cfg = tiny_cfg(
        tiny_overrides,
        "model.arch=DiT-T/8",
        "objective.name=ddpm",
        "sampler.method=ddpm",
        "sampler.steps=5",
        "train.max_steps=3",
    )
    result = train(cfg, tmp_path / "run")
    assert result.samples.is_file() and np.isfinite(result.last_loss)
    from vrpo.sample import sample_run

    out = sample_run(tmp_path / "run", 6, tmp_path / "s.npz", batch_size=4, progress=False)
    with np.load(out) as f:
        assert f["arr_0"].shape == (6, 32, 32, 1) and f["arr_0"].dtype == np.uint8
        assert f["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]


def test_sampling_is_reproducible_and_resumable(tmp_path, tiny_overrides):
    from vrpo.sample import sample_run

    train(tiny_cfg(tiny_overrides, "train.max_steps=2"), tmp_path / "run")
    a = sample_run(tmp_path / "run", 10, tmp_path / "a.npz", batch_size=4, progress=False)
    parts = tmp_path / "b.npz.parts-b4-s0-sample"
    parts.mkdir()
    # a job killed after its first batch: that batch is kept and reused
    sample_run(tmp_path / "run", 4, tmp_path / "first.npz", batch_size=4, progress=False)
    with np.load(tmp_path / "first.npz") as f:
        np.savez(parts / "00000000.npz", images=f["arr_0"].transpose(0, 3, 1, 2), labels=f["arr_1"])
    b = sample_run(tmp_path / "run", 10, tmp_path / "b.npz", batch_size=4, progress=False)
    with np.load(a) as fa, np.load(b) as fb:
        assert np.array_equal(fa["arr_0"], fb["arr_0"]) and np.array_equal(fa["arr_1"], fb["arr_1"])


def test_evaluation_during_training_and_after_a_stop(tmp_path, tiny_overrides):
    pytest.importorskip("efficientnet_lite_pytorch")
    evals = [
        "objective.name=repa",
        "objective.projector_width=64",
        "objective.encoder_input_size=64",
        "eval.every=1",
        "eval.num_samples=8",
        "eval.ref=digits:test",
        "eval.ref_num=16",
        "eval.ra_num=8",
        "eval.final_num_samples=12",
        "eval.final_metrics=[fid, fd_encoder]",
        f"eval.cache_dir={tmp_path / 'refstats'}",
        "train.max_steps=2",
    ]
    cfg = load_config(
        str(ROOT / "configs/fmnist/repa-t2.yaml"), [*tiny_overrides, "objective.feature_cache=null", *evals]
    )
    train(cfg, tmp_path / "run")
    metrics = tmp_path / "run/metrics.jsonl"
    first, record = (json.loads(line) for line in metrics.read_text().splitlines())
    assert first["step"] == 1 and first["num_samples"] == 8 and "fd_efficientnet" not in first
    # the last step gets the final evaluation: more samples, more metrics
    assert record["step"] == 2 and record["num_samples"] == 12 and record["fd_efficientnet"] > 0
    assert record["fid"] > 0 and -1 <= record["ra"] <= 1
    metrics.write_text(json.dumps(first) + "\n")  # as if killed after the checkpoint, before the evaluation
    train(cfg, tmp_path / "run")
    again = json.loads(metrics.read_text().splitlines()[-1])
    assert (
        again["step"] == 2
        and again["fid"] == pytest.approx(record["fid"])
        and again["ra"] == pytest.approx(record["ra"])
    )


def test_methods_with_one_seed_are_paired(tmp_path, tiny_overrides):
    """Same seed: same initial network and data order, whatever the method."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from vrpo.train.loop import Trainer

    sit = Trainer(tiny_cfg(tiny_overrides, "train.seed=5"), tmp_path / "sit")
    repa_cfg = load_config(
        str(ROOT / "configs/fmnist/repa-t2.yaml"),
        [
            *tiny_overrides,
            "train.seed=5",
            "objective.feature_cache=null",
            "objective.projector_width=64",
            "objective.encoder_input_size=64",
        ],
    )
    repa = Trainer(repa_cfg, tmp_path / "repa")
    for (k, a), (_, b) in zip(sit.model.state_dict().items(), repa.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert all(torch.equal(a, b) for a, b in zip(sit._micro_batches(3), repa._micro_batches(3)))
    other = Trainer(tiny_cfg(tiny_overrides, "train.seed=6"), tmp_path / "other")
    assert not torch.equal(other.model.blocks[0].attn.qkv.weight, sit.model.blocks[0].attn.qkv.weight)


def test_resume_refuses_changed_data(tmp_path, tiny_overrides):
    from vrpo.config import ConfigError

    train(tiny_cfg(tiny_overrides, "train.max_steps=2"), tmp_path)
    # same config, other images behind it (e.g. the files were replaced): refuse, do not diverge silently
    import vrpo.train.loop as loop

    real = loop.load_dataset

    def other_images(cfg):
        data = real(cfg)
        data.images = 255 - data.images
        data.__dict__.pop("fingerprint", None)
        return data

    loop.load_dataset = other_images
    try:
        with pytest.raises(ConfigError, match="training data changed"):
            train(tiny_cfg(tiny_overrides, "train.max_steps=4"), tmp_path)
    finally:
        loop.load_dataset = real


@pytest.mark.parametrize(
    "option",
    [["train.activation_checkpointing=true"], ["train.compile=true", "train.compile_backend=aot_eager"],
     ["optim.fused=false"]],
    ids=["activation-checkpointing", "compile", "unfused-adamw"],
)  # fmt: skip
def test_memory_and_speed_options_leave_the_training_unchanged(tmp_path, tiny_overrides, option):
    from vrpo.train.loop import Trainer

    steps = ["train.max_steps=3", "train.ckpt_every=3", "objective.name=sit"]
    train(tiny_cfg(tiny_overrides, *steps), tmp_path / "plain")
    trainer = Trainer(tiny_cfg(tiny_overrides, *steps, *option), tmp_path / "option")
    block = trainer.model.blocks[0]
    unfused = not trainer.optimizer.defaults["fused"]
    assert trainer.model.checkpoint_activations or block._compiled_call_impl is not None or unfused  # the option is on
    trainer.fit()
    plain, other = final_weights(tmp_path / "plain"), final_weights(tmp_path / "option")
    for part in ("model", "ema"):
        assert plain[part].keys() == other[part].keys()  # the same parameter names: checkpoints stay portable
        for key in plain[part]:
            torch.testing.assert_close(other[part][key], plain[part][key], rtol=1e-5, atol=1e-6, msg=key)
