"""``vrpo submit``: a training run as a SLURM job through submitit (an optional dependency).

One task per GPU on every node; each task exports torchrun's environment (rank, world size,
master address and port from the SLURM allocation) and runs ``vrpo train`` on the same run
folder, so the loop is exactly torchrun's. A job preempted or stopped at its time limit is
requeued and resumes from its newest checkpoint (the loop writes one on SIGTERM). ``--cluster
local`` runs the same tasks as local processes: the launcher's test, and a dry run before a queue.
"""

from __future__ import annotations

from pathlib import Path


class TrainTask:
    """The function every task runs; submitit calls ``checkpoint`` on preemption and timeout."""

    def __init__(self, config: str, out: str, overrides: list[str]):
        self.config, self.out, self.overrides = config, out, list(overrides)

    def __call__(self) -> int:
        import submitit

        from vrpo.cli import main

        # LOCAL_RANK picks the device; CUDA_VISIBLE_DEVICES is left to the allocation
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        args = ["train", "--config", self.config, "--out", self.out]
        for item in self.overrides:
            args += ["--set", item]
        code = main(args)
        if code:
            raise RuntimeError(f"vrpo train exited with {code} (see the job's log)")
        return code

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(TrainTask(self.config, self.out, self.overrides))


def submit(
    config: str,
    out: str,
    overrides: list[str] = (),
    nodes: int = 1,
    gpus_per_node: int = 8,
    partition: str | None = None,
    time_min: int = 4320,
    cluster: str | None = None,
    logs: str | None = None,
    tasks_per_node: int | None = None,
):
    """Submit the run; returns the submitit Job. ``tasks_per_node`` defaults to ``gpus_per_node``."""
    try:
        import submitit
    except ImportError:
        raise SystemExit("vrpo submit needs submitit: pip install submitit") from None
    folder = Path(logs or Path(out).expanduser() / "slurm")
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    tasks = tasks_per_node or max(gpus_per_node, 1)
    params = dict(nodes=nodes, tasks_per_node=tasks, timeout_min=time_min, name=Path(out).name)
    if cluster != "local":
        params["gpus_per_node"] = gpus_per_node
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor.submit(TrainTask(str(Path(config).resolve()), str(Path(out).expanduser().resolve()), overrides))
