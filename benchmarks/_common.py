"""Shared helpers for the benchmarks: timing, peak memory, result records."""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn: Callable[[], Any], repeats: int = 9, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs (seconds)."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_rounds(fns: dict[str, Callable[[], Any]], repeats: int = 9,
                       warmup: int = 1) -> dict[str, list[float]]:
    """Times of several functions measured in alternation: ``repeats`` rounds, each running
    every function once; ``result[name][i]`` is its time in round ``i``.

    Each round runs them in a fresh random order (seeded, so a rerun measures the same
    schedule): nobody always runs first, and nobody always follows the same contender — what
    one run leaves behind (allocator state, caches, idle worker threads) would otherwise tilt
    the figures of the run after it by a few per cent."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    shuffle = random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name, fn in order:
            start = time.perf_counter()
            fn()
            synchronize()
            times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(rounds: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """``name``'s time over ``reference``'s, round by round (both ran in the same round, so a
    slow spell of a shared machine slows both): the median ratio and its quartiles."""
    ratios = sorted(a / b for a, b in zip(rounds[name], rounds[reference], strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": median, "q1": q1, "q3": q3}


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def extra_peak_mib(work: Callable[[], Any]) -> float:
    """The extra peak memory of running ``work()`` once, in MiB: peak allocated memory on CUDA,
    or resident memory sampled every 2 ms on the CPU, minus what was in use before."""
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        work()
        synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    import threading

    base = rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss_mib()) - base


def run_isolated(module: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m module args`` in a fresh process and parse the JSON it prints last."""
    output = subprocess.run([sys.executable, "-m", module, *args], check=True,
                            capture_output=True, text=True, env={**os.environ, **(env or {})},
                            cwd=Path(__file__).resolve().parent.parent)
    return dict(json.loads(output.stdout.strip().splitlines()[-1]))


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__,
            "device": str(device()), "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}


def write(name: str, record: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **record}, indent=2))
    return path
