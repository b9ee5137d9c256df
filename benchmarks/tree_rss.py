"""Run a command and sample the RSS of it and its descendants: the peak of the whole process tree."""
from __future__ import annotations

import re
import subprocess
import threading
import time

import psutil

# Log lines of diffprism's own packages as the CLI prints them with -v ("INFO exporters.export: ...").
STAGE_LINE = re.compile(r"^(?:INFO|DEBUG|WARNING) (?:exporters|diffprism|runtimes|targets|validation)[.\w]*: (.*)$")


def _tree_rss(proc: psutil.Process) -> int | None:
    try:
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running())
    except psutil.Error:  # a child ended between listing and reading
        return None


def run_sampled(cmd: list[str], interval: float = 0.05, **popen) -> tuple[int, float, int]:
    """(exit code, wall seconds, peak RSS bytes summed over the process tree, sampled every `interval`)."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, **popen)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc) or 0)
        time.sleep(interval)
    return proc.returncode, time.perf_counter() - start, peak


def run_profiled(cmd: list[str], interval: float = 0.05, log_path=None, **popen) -> tuple[int, float, int, list[dict]]:
    """run_sampled, plus a per-stage profile: each sample is charged to the last diffprism log line the
    command printed on stderr (run it with -v), so the profile names the stage that reached each peak.
    Stages are returned in order as {"stage", "start_s", "seconds", "peak_rss"}; stderr goes to `log_path`."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1, **popen)
    stages: list[dict] = [{"stage": "(start)", "start_s": 0.0, "peak_rss": 0}]
    lock = threading.Lock()

    def read() -> None:
        sink = open(log_path, "a") if log_path else None
        for line in proc.stderr:
            if sink:
                sink.write(line)
            m = STAGE_LINE.match(line.rstrip("\n"))
            if m:
                with lock:
                    stages.append({"stage": m.group(1)[:160], "start_s": round(time.perf_counter() - start, 2),
                                   "peak_rss": 0})
        if sink:
            sink.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        rss = _tree_rss(proc)
        if rss is not None:
            peak = max(peak, rss)
            with lock:
                stages[-1]["peak_rss"] = max(stages[-1]["peak_rss"], rss)
        time.sleep(interval)
    reader.join(timeout=5)
    seconds = time.perf_counter() - start
    for here, after in zip(stages, stages[1:] + [{"start_s": seconds}]):
        here["seconds"] = round(after["start_s"] - here["start_s"], 2)
    return proc.returncode, seconds, peak, stages
