"""Which machine a process runs on, so that step times are only compared within one machine."""

from __future__ import annotations

import os
import platform
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def machine_id() -> str:
    """The kernel's boot id (a new machine, or a restarted one, gets a new one; hostnames repeat
    across cloud machines) with the processor and core count; the hostname where there is no boot id."""
    boot = BOOT_ID.read_text().strip() if BOOT_ID.is_file() else platform.node()
    return f"{boot} {platform.processor() or platform.machine()} x{os.cpu_count()}"
