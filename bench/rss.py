"""Peak resident memory of a stretch of work in this process (Linux /proc)."""

from __future__ import annotations

from pathlib import Path


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM...) in MiB."""
    line = next(
        x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":")
    )
    return int(line.split()[1]) / 1024


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark; return the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_mib("VmRSS")
