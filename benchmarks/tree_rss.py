"""Run a command and sample the RSS of it and its descendants: the peak of the whole process tree."""
from __future__ import annotations

import time

import psutil


def run_sampled(cmd: list[str], interval: float = 0.05, **popen) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes summed over the process tree, sampled every `interval`)."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, **popen)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:  # a child ended between listing and reading
            pass
        time.sleep(interval)
    return proc.returncode, time.perf_counter() - start, peak
