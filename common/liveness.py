"""Is a process still the same process?  Used by every tpnb process.

A pid alone is not an identity: pids are reused.  The start time in
/proc/<pid>/stat (clock ticks since boot) tells a live process from a new one
that got the same number, so a recorded (pid, start) pair is checked with both.
"""
from __future__ import annotations

from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (fields 3.. overall), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command may contain spaces and parentheses: split after the last ")"
    return stat[stat.rindex(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    """Process start time (clock ticks since boot): tells a live pid from a reused one."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 overall


def process_alive(pid: int, start: int | None = None) -> bool:
    """The same process still runs: a reused pid (other start time) or a zombie counts as gone."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start
