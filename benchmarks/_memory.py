"""Peak-memory probes shared by the benchmark scripts (Linux /proc; None/False elsewhere)."""

from __future__ import annotations


def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (e.g. VmHWM, VmRSS), or None where unavailable."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs "5")."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
