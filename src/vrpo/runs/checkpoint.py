"""Checkpoints without pickle: tensors in safetensors files, everything else in JSON.

Layout: ``RUN/checkpoints/step_00000040/`` with ``model``, ``ema``, ``objective``,
``optimizer`` and ``rng`` safetensors files and ``state.json`` (step, optimizer scalars,
Python/NumPy RNG states, counters, data position, and the SHA-256 of every file).

A sharded checkpoint (an FSDP2 run, ``train.parallel: fsdp``) holds instead ``dcp/``, written by
torch.distributed.checkpoint from every rank's shards, beside ``rng.safetensors`` and
``state.json`` (``layout: dcp``, the SHA-256 of every file). It reads back as whole tensors in
any process, so a single-process run resumes from it, and an FSDP2 run from a plain one.

A checkpoint is written to a temporary folder, each file fsynced, then renamed into place
in one atomic step; a reader therefore sees a whole checkpoint or none. On load every
file is checked against its recorded hash, and a damaged checkpoint is reported and
skipped in favour of the previous one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from vrpo.utils.dist import barrier, broadcast_object, is_main

STATE_FILE = "state.json"
TENSOR_FILES = ("model", "ema", "objective", "optimizer", "rng")
OPTIONAL_TENSOR_FILES = ("ema_heads",)  # written only by runs that keep them (train.ema_heads)
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives (whether or not it exists)."""
    return checkpoint_dir(run_dir) / f"step_{step:08d}"


def step_dirs(run_dir: Path) -> list[Path]:
    """Complete-looking checkpoint folders, newest first (temporary folders are ignored)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]), reverse=True)


# ---------------------------------------------------------------- optimizer and RNG as tensors + JSON


def flatten_optimizer(state: dict, to_cpu: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous() if to_cpu else value.detach()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- save / load


@dataclass
class Checkpoint:
    """One verified checkpoint. A sharded one reads its tensors whole on first use of ``tensors``;
    an FSDP2 run reads only its own shards instead (``load_shards``)."""

    step: int
    path: Path
    meta: dict
    loaded: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def sharded(self) -> bool:
        return self.meta.get("layout") == "dcp"

    def rng(self) -> dict[str, torch.Tensor]:
        """The RNG states, without reading a sharded checkpoint's tensors (verified when it was read)."""
        return self.loaded["rng"] if self.loaded is not None else load_file(str(self.path / "rng.safetensors"))

    @property
    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.loaded is None:
            self.loaded = _read_sharded(self.path, self.meta)
        return self.loaded


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict,
    keep_last: int,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    sharded: bool = False,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep the newest ``keep_last``; ``extra``: optional
    tensor groups (OPTIONAL_TENSOR_FILES) beside the required ones. ``sharded``: every rank calls it
    and torch.distributed.checkpoint writes each rank's shards (FSDP2); else rank 0 alone calls it."""
    root = checkpoint_dir(run_dir)
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict(), to_cpu=not sharded)
    rng_tensors, rng_meta = capture_rng()
    state = {"format": FORMAT_VERSION, "step": step, "optimizer": opt_meta, "rng": rng_meta, **meta}
    groups = {
        "model": _state(model, sharded),
        "ema": _state(ema, sharded),
        "objective": _state(objective, sharded),
        "optimizer": opt_tensors,
        **{name: _state(group, sharded) for name, group in (extra or {}).items()},
    }
    if sharded:
        return _save_sharded(run_dir, step, groups, rng_tensors, state, keep_last)
    tmp = _fresh_folder(root / f".tmp_step_{step:08d}_{os.getpid()}")
    hashes = {}
    for name, tensors in {**groups, "rng": rng_tensors}.items():
        path = tmp / f"{name}.safetensors"
        save_file(tensors, str(path))
        _fsync(path)
        hashes[name] = _sha256(path)
    return _publish(tmp, run_dir, step, {**state, "sha256": hashes}, keep_last)


def _state(tensors, sharded: bool) -> dict[str, torch.Tensor]:
    """A module's state dict (or a dict of tensors): CPU copies, or as they are for a sharded save."""
    items = (tensors.state_dict() if isinstance(tensors, torch.nn.Module) else tensors).items()
    return {k: v.detach() if sharded else v.detach().cpu().contiguous() for k, v in items}


def _fresh_folder(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir()
    return path


def _publish(tmp: Path, run_dir: Path, step: int, state: dict, keep_last: int) -> Path:
    """Write state.json into ``tmp``, rename it into place atomically, prune to ``keep_last``."""
    state_path = tmp / STATE_FILE
    state_path.write_text(json.dumps(state))
    _fsync(state_path)
    final = step_dir(run_dir, step)
    if final.exists():  # re-saving a step after a resume: replace the old folder
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(checkpoint_dir(run_dir))
    for old in step_dirs(run_dir)[keep_last:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _save_sharded(run_dir: Path, step: int, groups: dict, rng: dict, state: dict, keep_last: int) -> Path:
    import torch.distributed.checkpoint as dcp

    # one folder for every rank, named by rank 0: a stale writer of the same step never shares it
    tmp = checkpoint_dir(run_dir) / broadcast_object(f".tmp_step_{step:08d}_{os.getpid()}_{time.time_ns()}")
    if is_main():
        _fresh_folder(tmp)
    barrier()
    dcp.save(groups, checkpoint_id=str(tmp / "dcp"))
    barrier()
    if is_main():
        save_file(rng, str(tmp / "rng.safetensors"))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        for path in files:
            _fsync(path)
        hashes = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        _publish(tmp, run_dir, step, {**state, "layout": "dcp", "groups": list(groups), "sha256": hashes}, keep_last)
    barrier()
    return step_dir(run_dir, step)


def _verify_sharded(path: Path, meta: dict) -> None:
    for name, digest in meta["sha256"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{file} is truncated or corrupt (SHA-256 mismatch)")


def _read_sharded(path: Path, meta: dict) -> dict[str, dict[str, torch.Tensor]]:
    """A sharded checkpoint as whole tensors, in any process (torch.distributed.checkpoint reshards)."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(path / "dcp"))
    tensors: dict[str, dict[str, torch.Tensor]] = {group: {} for group in meta["groups"]}  # some may be empty
    try:
        for key, entry in reader.read_metadata().state_dict_metadata.items():
            group, _, name = key.partition(".")
            tensors[group][name] = torch.empty(entry.size, dtype=entry.properties.dtype)
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(tensors, storage_reader=reader, no_dist=True)
    except Exception as err:  # a shard another node wrote and this one cannot see, or a damaged one
        raise CheckpointError(f"{path / 'dcp'} does not read back whole: {str(err).splitlines()[0][:200]}") from None
    tensors["rng"] = load_file(str(path / "rng.safetensors"))
    return tensors


def _load_shards(ckpt: Checkpoint, groups: dict[str, dict[str, torch.Tensor]], params: list) -> dict:
    """Every rank reads only its own shards of a sharded checkpoint into ``groups`` (state dicts of the
    sharded network, its EMA and the replicated heads: loaded in place), a collective. The optimizer's
    state is built on ``params`` (its parameters, in order) and returned as its ``state_dict``."""
    import torch.distributed.checkpoint as dcp

    path = ckpt.path / "dcp"
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        moments = {}  # each optimizer tensor shaped as saved: laid out like its parameter where it is one
        for key, entry in saved.items():
            group, _, name = key.partition(".")
            if group == "optimizer":
                param = params[int(name.split(".", 1)[0])]
                like = tuple(entry.size) == tuple(param.shape)
                moments[name] = (
                    torch.zeros_like(param) if like else torch.empty(entry.size, dtype=entry.properties.dtype)
                )
        missing = sorted({f"{g}.{n}" for g, tensors in groups.items() for n in tensors} - set(saved))
        if missing:
            raise CheckpointError(f"{path} lacks {len(missing)} tensors this run needs, e.g. {missing[0]}")
        dcp.load({**groups, "optimizer": moments}, checkpoint_id=str(path))
    except CheckpointError:
        raise
    except Exception as err:  # a shard another node wrote and this one cannot see, or a damaged one
        raise CheckpointError(f"{path} does not read back: {str(err).splitlines()[0][:200]}") from None
    return unflatten_optimizer(moments, ckpt.meta["optimizer"])


def restore_state(ckpt: Checkpoint, modules: dict, ema_heads: dict | None, optimizer, shards: bool) -> None:
    """Load ``ckpt``'s ``modules`` (model, ema, objective), the EMA of the heads and the optimizer state in
    place: from whole tensors, or with ``shards`` (an FSDP2 run) each rank's own shards alone (a collective)."""
    groups = {name: module.state_dict() for name, module in modules.items()}
    if ema_heads is not None:
        groups["ema_heads"] = ema_heads
    if shards:  # a head EMA the checkpoint lacks is among the tensors it names as missing
        state = _load_shards(ckpt, groups, [p for group in optimizer.param_groups for p in group["params"]])
    else:
        groups, state = ckpt.tensors, unflatten_optimizer(ckpt.tensors["optimizer"], ckpt.meta["optimizer"])
        if ema_heads is not None and groups.get("ema_heads", {}).keys() != ema_heads.keys():
            raise CheckpointError(f"{ckpt.path} holds no EMA of this objective's heads (train.ema_heads=true)")
    for name, module in modules.items():
        module.load_state_dict(groups[name])
    for name, value in groups.get("ema_heads", {}).items() if ema_heads is not None else ():
        ema_heads[name].copy_(value)
    optimizer.load_state_dict(state)


def read_checkpoint(path: Path, verify: bool = True) -> Checkpoint:
    """Read and verify one checkpoint folder; raises CheckpointError naming what is wrong. ``verify=False``
    skips the hashes, for a folder another rank has just verified."""
    state_path = path / STATE_FILE
    try:
        meta = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{state_path} is missing or unreadable ({err.__class__.__name__})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, expected {FORMAT_VERSION}")
    if meta.get("layout") == "dcp":
        if verify:
            _verify_sharded(path, meta)
        return Checkpoint(int(meta["step"]), path, meta)
    tensors = {}
    for name in (*TENSOR_FILES, *(n for n in OPTIONAL_TENSOR_FILES if n in meta.get("sha256", {}))):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if verify and _sha256(file) != meta["sha256"].get(name):
            raise CheckpointError(f"{file} is truncated or corrupt (SHA-256 mismatch)")
        tensors[name] = load_file(str(file))
    return Checkpoint(int(meta["step"]), path, meta, tensors)


def latest_checkpoint(run_dir: Path, log=print, quarantine: bool = False) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged ones are reported and skipped.

    ``quarantine`` renames a damaged folder to ``damaged_step_*`` (kept for inspection) so
    that later saves and pruning never count it as a good checkpoint.
    """
    candidates = step_dirs(run_dir)
    problems = []
    for path in candidates:
        try:
            ckpt = read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            log(f"warning: skipping damaged checkpoint {path.name}: {err}")
            if quarantine:
                os.rename(path, path.with_name(f"damaged_{path.name}"))
            continue
        return ckpt
    if candidates:
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir(run_dir)}: " + "; ".join(problems))
    return None


def agreed_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest good checkpoint, chosen and verified by rank 0 alone (damaged ones moved aside); the
    other ranks read the folder it names without hashing it again (an XL checkpoint is about 11 GB)."""
    found = latest_checkpoint(run_dir, quarantine=True) if is_main() else None
    path = broadcast_object(None if found is None else str(found.path))
    return found if is_main() or path is None else read_checkpoint(Path(path), verify=False)


def load_weights(run_dir: Path, which: str = "ema", step: int | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Only the weights (``ema`` or ``model``) of the newest good checkpoint (or of ``step``), for sampling."""
    if step is not None:
        path = step_dir(run_dir, step)
        if not path.is_dir():
            kept = sorted(int(p.name[5:]) for p in step_dirs(run_dir))
            raise CheckpointError(f"{run_dir} has no checkpoint of step {step} (kept: {kept})")
        return read_checkpoint(path).tensors[which], step
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"{run_dir} has no checkpoint yet (looked in {checkpoint_dir(run_dir)})")
    return ckpt.tensors[which], ckpt.step


def clean_temporaries(run_dir: Path) -> None:
    """Remove folders left by a save that was killed before its rename."""
    root = checkpoint_dir(run_dir)
    if root.is_dir():
        for p in root.glob(".tmp_step_*"):
            shutil.rmtree(p, ignore_errors=True)


def imported_from(run_dir: Path) -> dict | None:
    """Where the newest checkpoint came from if `vrpo import-checkpoint` wrote it, else None."""
    for newest in step_dirs(Path(run_dir))[:1]:
        try:
            return json.loads((newest / STATE_FILE).read_text()).get("imported_from")
        except (OSError, json.JSONDecodeError):
            return None
    return None
