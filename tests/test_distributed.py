"""DDP on the CPU (gloo): two ranks equal one process that accumulates the same global batch,
for every family and for the methods that keep running statistics (VRPO's are reduced across
ranks before they update), through the real CLI."""

import json
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
ALIGN = ["objective.projector_width=64", "objective.encoder_input_size=64", "objective.feature_cache=null"]
CASES = {  # method -> (config, overrides)
    "sit": ("configs/fmnist/sit-t2.yaml", []),
    "dit": ("configs/fmnist/dit-t2.yaml", ["model.arch=DiT-T/8"]),
    "repa": ("configs/fmnist/repa-t2.yaml", ALIGN),
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
    steps = ["train.max_steps=5", "train.ckpt_every=5", "train.log_every=1", "train.label_dropout=0.0", *extra]
    args = ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "vrpo.cli", "train", "--config",
            str(ROOT / config), "--out", str(tmp_path / "ddp")]  # fmt: skip
    for item in [*tiny_overrides, *steps]:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
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
