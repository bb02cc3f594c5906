"""DDP on the CPU (gloo): two ranks equal one process that accumulates the same global batch."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vrpo.config import load_config
from vrpo.runs.checkpoint import step_dirs
from vrpo.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_two_ranks_match_one_process_with_accumulation(tmp_path, tiny_overrides):
    steps = ["train.max_steps=3", "train.ckpt_every=3", "train.log_every=1", "train.label_dropout=0.0"]
    args = [
        "torchrun",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vrpo.cli",
        "train",
        "--config",
        str(ROOT / "configs/fmnist/sit-t2.yaml"),
        "--out",
        str(tmp_path / "ddp"),
    ]
    for item in [*tiny_overrides, *steps]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("done: 3 steps") == 1  # rank 0 alone reports

    single = load_config(str(ROOT / "configs/fmnist/sit-t2.yaml"), [*tiny_overrides, *steps, "train.grad_accum=2"])
    train(single, tmp_path / "single")
    a = load_file(str(step_dirs(tmp_path / "ddp")[0] / "model.safetensors"))
    b = load_file(str(step_dirs(tmp_path / "single")[0] / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    logs = [line for line in (tmp_path / "ddp/log.jsonl").read_text().splitlines()]
    single_logs = (tmp_path / "single/log.jsonl").read_text().splitlines()
    import json

    for x, y in zip(logs, single_logs):  # the logged loss is the global batch's
        assert json.loads(x)["loss"] == pytest.approx(json.loads(y)["loss"], rel=1e-5)
