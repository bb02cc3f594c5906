"""The training log writer: JSON lines (the record of truth), TensorBoard scalars, and a loss-curve PNG."""

from __future__ import annotations

import time
from pathlib import Path

from vrpo.utils.jsonl import append_record, read_log


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                print("warning: tensorboard is not installed; logging to log.jsonl only (pip install tensorboard)")

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        append_record(self.path, {"step": step, "time": time.time(), **{k: float(v) for k, v in record.items()}})
        if self.writer is not None:
            for k, v in record.items():
                self.writer.add_scalar(f"train/{k}", float(v), step)

    @property
    def warnings_path(self) -> Path:
        return self.path.with_name("warnings.jsonl")

    def warned(self) -> set[str]:
        """Keys of the warnings this run has logged (before a resume too)."""
        return {r["key"] for r in read_log(self.warnings_path) if "key" in r}

    def warn(self, step: int, key: str, message: str) -> None:
        """A known failure mode: a line in warnings.jsonl (apart from the numeric log) and a TensorBoard text."""
        if not self.enabled:
            return
        append_record(self.warnings_path, {"step": step, "time": time.time(), "key": key, "message": message})
        if self.writer is not None:
            self.writer.add_text(f"warnings/{key}", message, step)

    def plot_loss(self, out: Path) -> Path | None:
        records = read_log(self.path)
        if not records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in records]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, [r["loss"] for r in records], label="loss")
        if "loss_denoise" in records[0]:
            ax.plot(steps, [r["loss_denoise"] for r in records], label="denoising", alpha=0.7)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
