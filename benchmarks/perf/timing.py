"""Interleaved timing and peak memory: the two tools every measurement of the suite is built on."""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable


def interleave(sides: dict[str, Callable[[], float | None]], repeats: int) -> dict[str, float]:
    """Median seconds of each side, run in turn `repeats` times (A, B, A, B, ...).

    A side may return its own measured seconds (to leave out its setup); None means "time the call".
    On a shared machine a burst of load then slows one round of every side, not all rounds of one.
    """
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, run in sides.items():
            start = time.perf_counter()
            measured = run()
            times[name].append(measured if measured is not None else time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _status_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident memory since exec) and RssAnon (private resident memory: what
    memory-mapped files do not add to) of a live process, in KiB."""
    found = {"VmHWM": 0, "RssAnon": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(":")[0]
                if key in found:
                    found[key] = int(line.split()[1])
    except OSError:
        pass
    return found


def run_with_peak_memory(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`: its peak resident and peak anonymous memory (MiB, polled from /proc every 20 ms),
    its CPU seconds (user + system, which a busy machine does not inflate) and its stdout.

    Not ru_maxrss for the peak: on Linux that keeps the high-water mark of the forked parent's copy
    from before exec, so a child of a big process looks as big as its parent.
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for key, value in _status_kib(proc.pid).items():
                peak[key] = max(peak[key], value)
            time.sleep(0.02)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # both end when the child exits
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-2000:]}")
    return {
        "peak_rss_mib": peak["VmHWM"] / 1024,
        "peak_anon_mib": peak["RssAnon"] / 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "stdout": stdout,
    }
