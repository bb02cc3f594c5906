"""Run folders: checkpoints (written and read), JSON-lines logs, and loading a run's config and model."""

from vrpo.runs.checkpoint import CheckpointError, latest_checkpoint, load_weights, step_dir, step_dirs
from vrpo.runs.folder import load_run_config, load_run_model, newest_checkpoint_step, read_metrics, run_summary
from vrpo.utils.jsonl import append_record, read_log

__all__ = [
    "CheckpointError",
    "append_record",
    "latest_checkpoint",
    "load_run_config",
    "load_run_model",
    "load_weights",
    "newest_checkpoint_step",
    "read_log",
    "read_metrics",
    "run_summary",
    "step_dir",
    "step_dirs",
]
