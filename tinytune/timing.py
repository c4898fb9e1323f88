"""The one timing harness of tinytune's benchmarks: interleaved rounds, timers, metadata.

Floor 0: this module imports only the standard library and torch, never another tinytune
module, so every layer of the package and every script under ``bench/`` and ``ci/`` can
use it.

Method (what every benchmark here reports):

* every case is warmed up first (compiling, filling caches, picking GEMM algorithms);
* then it is timed in interleaved rounds: each round measures every case once, in a new
  random order (:func:`interleave`), so drift and noise spread over all cases alike;
* a case's figure is the median over rounds, with the 25th-75th percentile as its spread
  (:func:`quantiles`); a ratio between two cases is the median of the per-round ratios
  (:func:`ratio_quantiles`), so noise that hits one round hits both sides of it.

Timers return ``measure(fn, n) -> seconds per call``: :func:`cpu_timer`
(``torch.utils.benchmark.Timer`` with a set number of torch threads), :func:`cuda_timer`
(CUDA events after a synchronisation), :func:`clock_timer` (any clock, e.g.
``time.thread_time``), and :func:`timer_for` picks by device. :class:`GraphTimer` captures
each case in a CUDA graph first and replays it (wall clock off CUDA).

    times = time_cases({"a": f, "b": g}, rounds=9, device="cuda")
    stats = summarize(times, {"x a": "a"})   # medians, spreads, ratios to "a"
"""

from __future__ import annotations

import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch

__all__ = [
    "GraphTimer",
    "clock_timer",
    "cpu_name",
    "cpu_timer",
    "cuda_timer",
    "device_name",
    "environment",
    "git_sha",
    "interleave",
    "quantiles",
    "ratio_quantiles",
    "summarize",
    "time_cases",
    "timer_for",
]

Measure = Callable[[Callable[[], Any], int], float]

# --------------------------------------------------------------------------- timers


def cuda_timer(device: torch.device | str = "cuda") -> Measure:
    """``measure(fn, n)``: CUDA events recorded around ``n`` calls on the current stream,
    after a full synchronisation, read after the end event completes.

    Args:
        device: The CUDA device the calls run on.

    Returns:
        ``measure(fn, n) -> seconds per call``.
    """
    device = torch.device(device)

    def measure(fn: Callable[[], Any], n: int) -> float:
        torch.cuda.synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    return measure


def cpu_timer(threads: int | None = None) -> Measure:
    """``measure(fn, n)``: ``torch.utils.benchmark.Timer`` with ``threads`` torch threads.

    Args:
        threads: Torch threads while timing (default: the current setting).

    Returns:
        ``measure(fn, n) -> seconds per call``.
    """
    from torch.utils.benchmark import Timer

    threads = threads or torch.get_num_threads()

    def measure(fn: Callable[[], Any], n: int) -> float:
        return Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads).timeit(n).mean

    return measure


def clock_timer(clock: Callable[[], float] = time.perf_counter) -> Measure:
    """``measure(fn, n)``: ``clock()`` read before and after ``n`` calls.

    Args:
        clock: Seconds as a float; ``time.thread_time`` leaves out the time the thread
            spends preempted on a shared machine (for cases that never wait on anything).

    Returns:
        ``measure(fn, n) -> seconds per call``.
    """

    def measure(fn: Callable[[], Any], n: int) -> float:
        t0 = clock()
        for _ in range(n):
            fn()
        return (clock() - t0) / n

    return measure


def timer_for(device: torch.device | str, threads: int | None = None) -> Measure:
    """:func:`cuda_timer` on a CUDA device, else :func:`cpu_timer` with ``threads``."""
    device = torch.device(device)
    return cuda_timer(device) if device.type == "cuda" else cpu_timer(threads)


class GraphTimer:
    """Seconds per call of a zero-argument function: CUDA graph + events, or wall clock.

    On CUDA, :meth:`prepare` warms each function up on a side stream, captures it in a
    CUDA graph and returns the graphs' replays, so the launch overhead of the host is out
    of the measurement; off CUDA it returns the functions as they are.

    Args:
        cuda: Capture and time on the current CUDA device (else wall clock).
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def prepare(self, fns: list[Callable[[], Any]]) -> list[Callable[[], Any]]:
        """Returns a replayable callable per entry of ``fns``."""
        if not self.cuda:
            return fns
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for fn in fns:  # warm up outside the capture: Triton compiles, cuBLAS picks
                fn()
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs = []
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            graphs.append(g)
        torch.cuda.synchronize()
        return [g.replay for g in graphs]

    def time(self, replay: Callable[[], Any], iters: int) -> float:
        """Seconds per call of ``iters`` calls of ``replay``."""
        if not self.cuda:
            return clock_timer()(replay, iters)
        # Events time the stream itself: work queued before start.record() is not counted.
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters


# --------------------------------------------------------------------------- rounds


def interleave(
    names: Iterable[Hashable],
    rounds: int,
    measure: Callable[[Any], float],
    *,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[Any, list[float]]:
    """Measure every case once per round, in a new random order each round.

    Args:
        names: The cases.
        rounds: Number of rounds.
        measure: ``measure(name) -> seconds`` (one measurement of that case).
        seed: Seed of the shuffles.
        progress: Called with ``"round i/rounds"`` after each round.

    Returns:
        name -> list of ``rounds`` measurements, round ``i`` at index ``i``.
    """
    rng = random.Random(seed)
    order = list(names)
    times: dict[Any, list[float]] = {n: [] for n in order}
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(measure(name))
        if progress:
            progress(f"round {r + 1}/{rounds}")
    return times


def time_cases(
    cases: dict[str, Callable[[], Any]],
    rounds: int,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    warmup: int = 2,
    min_time: float = 0.01,
    repeats: int = 1,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    measure: Measure | None = None,
) -> dict[str, list[float]]:
    """Time ``cases`` in interleaved rounds; return each case's seconds per call per round.

    Every case is called ``warmup`` times first (compiling, filling caches), and its
    number of calls per measurement is chosen so that one measurement lasts at least
    ``min_time`` seconds. Then each round measures every case once, in a new random order.

    Args:
        cases: name -> zero-argument callable (one forward pass, say).
        rounds: Number of timed rounds (>= 1).
        device: Where the cases run; CUDA is timed with events, CPU with
            ``torch.utils.benchmark.Timer``.
        threads: Torch threads for CPU timing (default: the current setting).
        warmup: Untimed calls per case before calibration.
        min_time: Seconds one measurement should last at least (0: one call).
        repeats: Measurements per case per round; the round keeps the fastest (1: no
            choice; more filters out interruptions by other processes).
        seed: Seed of the shuffles.
        progress: Called with a short label after each warm-up and each round (and with
            ``(label, False)`` before each warm-up starts).
        measure: ``measure(fn, n) -> seconds per call`` to use instead of
            ``timer_for(device, threads)`` (:func:`clock_timer`, say).

    Returns:
        name -> list of ``rounds`` per-call times in seconds, round ``i`` at index ``i``.
    """
    measure = measure or timer_for(device, threads)
    calls: dict[str, int] = {}
    for name, fn in cases.items():
        if progress:
            progress(f"warm-up {name}", False)
        for _ in range(warmup):
            fn()
        t = measure(fn, 1)
        calls[name] = max(1, math.ceil(min_time / max(t, 1e-9)))
        if progress:
            progress(f"warm-up {name}")

    def one(name: str) -> float:
        return min(measure(cases[name], calls[name]) for _ in range(repeats))

    return interleave(cases, rounds, one, seed=seed, progress=progress)


# --------------------------------------------------------------------------- statistics


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(p25, median, p75), inclusive method; a single value gives itself three times."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def ratio_quantiles(num: Sequence[float], den: Sequence[float]) -> dict[str, Any]:
    """The per-round ratios ``num[i] / den[i]`` and their median and spread.

    Args:
        num: Per-round measurements of one case.
        den: Per-round measurements of the reference, the same rounds in the same order.

    Returns:
        ``{"median", "p25", "p75", "samples"}`` (samples: the per-round ratios).
    """
    if len(num) != len(den):
        raise ValueError(f"{len(num)} rounds against {len(den)}: ratios need the same rounds on both sides")
    per_round = [a / b for a, b in zip(num, den)]
    p25, med, p75 = quantiles(per_round)
    return {"median": med, "p25": p25, "p75": p75, "samples": per_round}


def summarize(times: dict[str, list[float]], references: dict[str, str]) -> dict[str, dict]:
    """Medians with spread, and ratios as medians of per-round ratios.

    Args:
        times: name -> per-round seconds per call, as :func:`time_cases` returns.
        references: label -> case name to take ratios against (``{"bare": "bare eager"}``).

    Returns:
        name -> ``{"median_ms", "p25_ms", "p75_ms", "samples_ms", "ratio": {label:
        {"median", "p25", "p75", "samples"}}}``.
    """
    out: dict[str, dict] = {}
    for name, ts in times.items():
        p25, med, p75 = quantiles(ts)
        entry: dict[str, Any] = {
            "median_ms": med * 1e3, "p25_ms": p25 * 1e3, "p75_ms": p75 * 1e3,
            "samples_ms": [t * 1e3 for t in ts], "ratio": {},
        }
        for label, ref in references.items():
            if ref in times:
                entry["ratio"][label] = ratio_quantiles(ts, times[ref])
        out[name] = entry
    return out


# --------------------------------------------------------------------------- environment


def git_sha(path: str | os.PathLike | None = None) -> str | None:
    """The commit checked out at ``path``, ``+dirty`` with local changes, or ``None``.

    Args:
        path: A folder inside the checkout (default: the one holding this file, i.e. the
            tinytune source being run).
    """
    here = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    """A human name for ``device`` (the GPU's or the CPU's model name)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def _version(package: str) -> str | None:
    # The parent package is in sys.modules already (this module is inside it), so its
    # version is read without importing it: this module stays on floor 0.
    try:
        module = sys.modules.get(package) or __import__(package)
        return module.__version__
    except Exception:  # noqa: BLE001 - optional packages, absent or broken
        return None


def environment(
    device: torch.device | str = "cpu",
    packages: Sequence[str] = ("tinytune", "triton", "peft", "transformers"),
) -> dict[str, Any]:
    """Machine, versions and git SHA, for result files.

    Args:
        device: The device the benchmark runs on.
        packages: Packages whose versions to record besides Python's and torch's
            (``None`` for one that is absent).

    Returns:
        A JSON-friendly dict.
    """
    device = torch.device(device)
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in packages:
        versions[pkg] = _version(pkg)
    info: dict[str, Any] = {
        "device": str(device), "device_name": device_name(device),
        "platform": platform.platform(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "versions": versions, "git_sha": git_sha(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["capability"] = list(torch.cuda.get_device_capability(device))
    return info
