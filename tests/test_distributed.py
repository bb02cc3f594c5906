"""DDP on the CPU (gloo): two ranks equal one process that accumulates the same global batch,
for every family and for the methods that keep running statistics (VRPO's are reduced across
ranks before they update), through the real CLI; a rank killed mid-run stops the others in one line, and SIGKILLed runs
resume bit-identically."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vrpo.config import load_config
from vrpo.runs.checkpoint import step_dirs
from vrpo.train import train

ROOT = Path(__file__).resolve().parents[1]
# one thread per rank; a rank that aborts in native code (SIGABRT) dumps its Python stack
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
ALIGN = ["objective.projector_width=64", "objective.encoder_input_size=64", "objective.feature_cache=null"]
CASES = {  # method -> (config, overrides)
    "sit": ("configs/fmnist/sit-t2.yaml", []),
    "dit": ("configs/fmnist/dit-t2.yaml", ["model.arch=DiT-T/8"]),
    # with the final evaluation spread over the ranks: the same record as one process's
    "repa": (
        "configs/fmnist/repa-t2.yaml",
        [
            *ALIGN,
            "eval.every=5",
            "eval.num_samples=6",
            "eval.ref=digits:test",
            "eval.ref_num=16",
            "eval.ra_num=8",
            "eval.batch_size=4",  # held-out RA in two batches: one on each rank
            "eval.metrics=[fd_encoder]",
        ],
    ),
    # the alignment stops after step 2: the projectors then get no gradient, DDP must not wait for them
    "repa-stop": ("configs/fmnist/repa-t2.yaml", [*ALIGN, "objective.schedule=stop", "objective.schedule_end=2"]),
    "vrpo": ("configs/fmnist/vrpo-t2.yaml", [*ALIGN, "objective.warmup_steps=2", "objective.grad_share_every=2"]),
}


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
@pytest.mark.parametrize("method", list(CASES))
def test_two_ranks_match_one_process_with_accumulation(tmp_path, tiny_overrides, method):
    if method != "sit":
        pytest.importorskip("efficientnet_lite_pytorch")
    config, extra = CASES[method]
    steps = ["train.max_steps=5", "train.ckpt_every=5", "train.log_every=1", "train.label_dropout=0.0",
             f"eval.cache_dir={tmp_path / 'refstats'}", *extra]  # fmt: skip
    args = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "vrpo.cli", "train", "--config",
            str(ROOT / config), "--out", str(tmp_path / "ddp")]  # fmt: skip
    for item in [*tiny_overrides, *steps]:
        args += ["--set", item]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, rank_errors(done.stderr)
    assert done.stdout.count("done: 5 steps") == 1  # rank 0 alone reports

    single = load_config(str(ROOT / config), [*tiny_overrides, *steps, "train.grad_accum=2"])
    train(single, tmp_path / "single")
    for part in ("model", "ema", "objective"):  # the objective's parameters and running statistics
        a = load_file(str(step_dirs(tmp_path / "ddp")[0] / f"{part}.safetensors"))
        b = load_file(str(step_dirs(tmp_path / "single")[0] / f"{part}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=f"{part}.{key}")
    logs = (tmp_path / "ddp/log.jsonl").read_text().splitlines()
    single_logs = (tmp_path / "single/log.jsonl").read_text().splitlines()
    for x, y in zip(logs, single_logs):  # the logged loss is the global batch's
        assert json.loads(x)["loss"] == pytest.approx(json.loads(y)["loss"], rel=1e-5)
    if method == "repa":
        (record,), (single_record,) = (
            [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("ddp", "single")
        )
        assert record["num_samples"] == 6 and record["fd_efficientnet"] > 0
        assert record["fd_efficientnet"] == pytest.approx(single_record["fd_efficientnet"], rel=1e-3)
        assert record["ra"] == pytest.approx(single_record["ra"], abs=1e-4)
        # the representation metrics spread over 2 ranks (batches 0 and 8 on rank 0, 4 on rank 1) equal one process
        from vrpo.eval.representations import evaluate_representations

        args = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "vrpo.cli", "--", "eval", "--run",
                str(tmp_path / "ddp"), "--num", "12", "--batch-size", "4", "--timesteps", "0.5"]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, rank_errors(done.stderr)
        (line,) = done.stdout.splitlines()  # rank 0 alone prints
        spread = json.loads(line)
        one = evaluate_representations(tmp_path / "ddp", num=12, batch_size=4, timesteps=(0.5,))
        assert spread["num"] == one["num"] == 12
        for key in ("ra", "cknna", "probe"):
            assert spread[key] == pytest.approx(one[key], abs=1e-5), key
    # sampling spread over 2 ranks (batch 3) equals one process (batch 4): per-sample noise; `--` keeps torchrun's
    # parser from reading --run and --num as abbreviations of its own options
    if method == "sit":
        from vrpo.sample import sample_run

        args = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "vrpo.cli", "--", "sample", "--run",
                str(tmp_path / "ddp"), "--num", "10", "--batch-size", "3", "--out",
                str(tmp_path / "ddp.npz")]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, rank_errors(done.stderr)
        assert done.stdout.count("wrote 10 samples") == 1
        sample_run(tmp_path / "ddp", 10, tmp_path / "one.npz", batch_size=4, progress=False)
        with np.load(tmp_path / "ddp.npz") as a, np.load(tmp_path / "one.npz") as b:
            assert np.array_equal(a["arr_1"], b["arr_1"])
            assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
            assert a["arr_0"].std() > 10  # real samples, not a constant


def rank_errors(stderr: str) -> str:
    """What the ranks printed before torchrun's own failure report, which otherwise fills the tail."""
    ranks = re.split(
        r"^\S+ \S+ \d+ \S*torch/distributed/elastic/multiprocessing/api\.py", stderr, maxsplit=1, flags=re.M
    )[0]
    # a crashed interpreter ends with the list of its extension modules, which would hide its traceback
    ranks = re.sub(r"^Extension modules:.*$", "", ranks, flags=re.M)
    return ranks[-3000:] + "\n[torchrun] " + stderr[-600:]


def _descendants(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == pid:
                found += [int(entry.name), *_descendants(int(entry.name))]
    return found


def _wait_for_checkpoint(folder: Path, step: int, process, limit: float = 300.0) -> None:
    start = time.monotonic()
    while not (folder / "checkpoints" / f"step_{step:08d}").exists():
        assert process.poll() is None, "the run ended before the checkpoint it was to be killed at"
        assert time.monotonic() - start < limit, f"no checkpoint at step {step} after {limit} s"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None or not Path("/proc").is_dir(), reason="torchrun and /proc")
def test_a_killed_rank_stops_the_run_in_one_line_and_sigkilled_runs_resume_exactly(tmp_path, tiny_overrides):
    steps = ["train.max_steps=20", "train.ckpt_every=5", "train.log_every=1", "train.dist_timeout_s=60"]

    def launch(out: Path):
        args = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "vrpo.cli", "train", "--config",
                str(ROOT / "configs/fmnist/sit-t2.yaml"), "--out", str(out)]  # fmt: skip
        for item in [*tiny_overrides, *steps]:
            args += ["--set", item]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                start_new_session=True)  # fmt: skip

    straight = launch(tmp_path / "straight")
    assert straight.wait(timeout=600) == 0, rank_errors(straight.stderr.read())
    run = tmp_path / "killed"
    first = launch(run)
    _wait_for_checkpoint(run, 5, first)
    ranks = {}
    for pid in _descendants(first.pid):
        with contextlib.suppress(OSError):
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
            if b"LOCAL_RANK" in env:
                ranks[int(env[b"RANK"])] = pid
    killed_at = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)  # rank 1 dies: rank 0 must stop, in one line, well before the timeout
    _, err = first.communicate(timeout=120)
    assert first.returncode != 0 and time.monotonic() - killed_at < 60
    assert "error: rank 0 of 2: a collective failed" in err and "rerun the command to resume" in err
    second = launch(run)  # resumes from its newest checkpoint; then the whole job is SIGKILLed
    _wait_for_checkpoint(run, 10, second)
    os.killpg(second.pid, signal.SIGKILL)
    second.wait(timeout=60)
    third = launch(run)
    assert third.wait(timeout=600) == 0, rank_errors(third.stderr.read())
    for part in ("model", "ema", "optimizer"):
        a = load_file(str(step_dirs(tmp_path / "straight")[0] / f"{part}.safetensors"))
        b = load_file(str(step_dirs(run)[0] / f"{part}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


@pytest.mark.slow
def test_submitit_launcher_runs_the_same_two_rank_training(tmp_path, tiny_overrides):
    pytest.importorskip("submitit")
    steps = ["train.max_steps=3", "train.ckpt_every=3", "train.label_dropout=0.0"]
    args = ["submit", "--config", str(ROOT / "configs/fmnist/sit-t2.yaml"), "--out", str(tmp_path / "job"),
            "--cluster", "local", "--tasks-per-node", "2", "--time", "10", "--wait"]  # fmt: skip
    for item in [*tiny_overrides, *steps]:
        args += ["--set", item]
    from vrpo.cli import main

    assert main(args) == 0
    single = load_config(str(ROOT / "configs/fmnist/sit-t2.yaml"), [*tiny_overrides, *steps, "train.grad_accum=2"])
    train(single, tmp_path / "single")
    a = load_file(str(step_dirs(tmp_path / "job")[0] / "model.safetensors"))
    b = load_file(str(step_dirs(tmp_path / "single")[0] / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=key)
    logs = sorted((tmp_path / "job" / "slurm").glob("*_log.out"))
    assert len(logs) == 2 and sum("done: 3 steps" in p.read_text() for p in logs) == 1  # two ranks, rank 0 reports


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_fsdp2_equals_one_process_and_its_sharded_checkpoints_load_either_way(tmp_path, tiny_overrides):
    """REPA under FSDP2 on 2 gloo ranks (network and EMA sharded, projectors replicated) equals one
    process accumulating the same batch, evaluation included; its sharded (DCP) checkpoint resumes in
    one process and under FSDP2 (each rank reading its own shards), and one process's checkpoint resumes
    under FSDP2, each to the same weights."""
    pytest.importorskip("efficientnet_lite_pytorch")
    from vrpo.runs.checkpoint import latest_checkpoint

    config = str(ROOT / "configs/fmnist/repa-t2.yaml")
    steps = [*tiny_overrides, *ALIGN, "train.max_steps=4", "train.ckpt_every=2", "train.label_dropout=0.0",
             "train.ema_heads=true", "eval.every=4", "eval.num_samples=6", "eval.ref=digits:test", "eval.ref_num=16",
             "eval.ra_num=8", "eval.metrics=[fd_encoder]", f"eval.cache_dir={tmp_path / 'refstats'}"]  # fmt: skip
    fsdp = [*steps, "train.parallel=fsdp"]

    def torchrun(out: Path, sets: list[str]) -> None:
        args = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "vrpo.cli", "train", "--config", config,
                "--out", str(out), *(a for item in sets for a in ("--set", item))]  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
        assert done.returncode == 0, rank_errors(done.stderr)

    def same(a: Path, b: Path) -> None:
        first, second = latest_checkpoint(a), latest_checkpoint(b)
        assert first.step == second.step == 4
        for part in ("model", "ema", "objective", "optimizer", "ema_heads"):
            x, y = first.tensors[part], second.tensors[part]
            assert x.keys() == y.keys(), part
            for key in x:
                torch.testing.assert_close(x[key], y[key], rtol=1e-5, atol=1e-6, msg=f"{part}.{key}")

    torchrun(tmp_path / "fsdp", fsdp)
    assert (step_dirs(tmp_path / "fsdp")[0] / "dcp").is_dir()  # written sharded
    train(load_config(config, [*steps, "train.grad_accum=2"]), tmp_path / "single")
    same(tmp_path / "fsdp", tmp_path / "single")
    (record,), (single_record,) = (
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("fsdp", "single")
    )  # the evaluation sampled a whole copy of the sharded EMA
    assert record["fd_efficientnet"] == pytest.approx(single_record["fd_efficientnet"], rel=1e-4)
    assert record["ra"] == pytest.approx(single_record["ra"], abs=1e-5)
    pairs = (("fsdp", "single-from-fsdp"), ("single", "fsdp-from-single"), ("fsdp", "fsdp-from-fsdp"))
    for source, resumed in pairs:
        shutil.copytree(tmp_path / source, tmp_path / resumed)
        shutil.rmtree(step_dirs(tmp_path / resumed)[0])  # back to step 2
        (tmp_path / resumed / "metrics.jsonl").unlink()
    train(load_config(config, [*steps, "train.grad_accum=2"]), tmp_path / "single-from-fsdp")
    torchrun(tmp_path / "fsdp-from-single", fsdp)
    same(tmp_path / "single-from-fsdp", tmp_path / "single")
    same(tmp_path / "fsdp-from-single", tmp_path / "fsdp")
    torchrun(tmp_path / "fsdp-from-fsdp", fsdp)  # each rank reads its own shards back (never the whole checkpoint)
    same(tmp_path / "fsdp-from-fsdp", tmp_path / "fsdp")
    assert not list((tmp_path / "fsdp-from-fsdp" / "checkpoints").glob(".tmp_step_*"))
