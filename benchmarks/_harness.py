"""Run one benchmark case in a fresh subprocess and measure its time and extra peak memory.

Every benchmark in this directory measures each (method, configuration) pair with
:func:`run_isolated`, so that one method's allocator caches, thread pools or a crash (e.g. the
OOM killer taking a materialized baseline) cannot affect another's numbers.

A *case* is named ``"module:function"``, the module importable with this directory on
``sys.path`` (e.g. ``"bench_topk:make_case"``). In the child, ``function(**params)`` prepares
everything the measurement must not include (data, indexes) and returns a zero-argument callable;
that callable is run ``warmup`` times, then ``repeats`` times measured:

- time: wall-clock seconds of each measured call (the median is the headline number), and its
  process CPU seconds (user + system over all threads);
- extra peak memory: the largest, over the measured calls, of peak RSS during the call minus the
  RSS just before it. The kernel's high-water mark is reset before each call
  (``/proc/self/clear_refs`` ← 5, then ``VmHWM``), so it is exact; where that file cannot be
  written, a thread sampling ``/proc/self/statm`` every millisecond stands in.

The callable's return value of the last measured call can be saved with ``torch.save`` so the
parent can check results across methods. Children set their ``oom_score_adj`` to 1000: on a
shared machine, a case that runs out of memory is killed (and reported as "oom") before any
other process.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

_HERE = Path(__file__).resolve().parent
_PAGE = os.sysconf("SC_PAGE_SIZE")
_MiB = 2**20


@dataclasses.dataclass
class Measurement:
    """Outcome of one isolated case.

    ``status`` is "ok", "oom" (killed by SIGKILL or an allocation failure), "timeout",
    "error", or "skipped" (set by callers that decide not to run a case); ``detail`` says more
    when it is not "ok". ``seconds`` holds every measured call's wall-clock time and
    ``cpu_seconds`` its process CPU time (user + system, all threads): when other processes
    share the CPU, wall time grows and CPU time much less, so the two together tell a slow
    method from a busy machine.
    """

    status: str
    seconds: list[float] = dataclasses.field(default_factory=list)
    cpu_seconds: list[float] = dataclasses.field(default_factory=list)
    extra_peak_bytes: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.seconds) if self.seconds else None

    @property
    def median_cpu_s(self) -> float | None:
        return statistics.median(self.cpu_seconds) if self.cpu_seconds else None

    @property
    def extra_peak_mib(self) -> float | None:
        return None if self.extra_peak_bytes is None else self.extra_peak_bytes / _MiB


def run_isolated(case: str, params: dict[str, Any], *, repeats: int = 3, warmup: int = 1,
                 threads: int | None = None, timeout_s: float | None = None,
                 save_result: Path | None = None) -> Measurement:
    """Measure ``case`` (``"module:function"``) called with ``params`` in a fresh interpreter.

    Args:
        case: factory that prepares the work and returns the callable to measure.
        params: JSON-serializable keyword arguments of the factory.
        repeats: measured calls (at least 1).
        warmup: unmeasured calls before them.
        threads: intra-op threads (torch.set_num_threads, OMP/MKL/OpenBLAS env); None keeps
            the default.
        timeout_s: wall-clock limit of the whole child; None for no limit.
        save_result: where the child ``torch.save``s the last measured call's return value.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    with tempfile.TemporaryDirectory(prefix="vse_bench_") as tmp:
        report = Path(tmp) / "report.json"
        request = {"case": case, "params": params, "repeats": repeats, "warmup": warmup,
                   "threads": threads, "report": str(report),
                   "save_result": None if save_result is None else str(save_result)}
        try:
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(request)],
                                  env=env, timeout=timeout_s, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        except subprocess.TimeoutExpired:
            return Measurement("timeout", detail=f"no result within {timeout_s:g} s")
        if report.exists():
            return Measurement(**json.loads(report.read_text()))
        if proc.returncode == -signal.SIGKILL:
            return Measurement("oom", detail="killed by SIGKILL (out of memory)")
        tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout else []
        return Measurement("error", detail=f"exit code {proc.returncode}: {' '.join(tail)}")


def available_memory_bytes() -> int | None:
    """``MemAvailable`` from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def machine_info(threads: int, packages: tuple[str, ...] = ()) -> dict[str, str]:
    """CPU model, cores, memory, threads used, torch (and its BLAS), Python, the installed
    version of each named distribution in ``packages`` and the UTC date, for a results table."""
    import datetime
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "threads": str(threads),
            "memory": f"{os.sysconf('SC_PHYS_PAGES') * _PAGE / 2**30:.1f} GiB",
            "torch": f"{torch.__version__} ({'MKL' if torch.backends.mkl.is_available() else 'non-MKL BLAS'})",
            "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    for name in packages:
        try:
            info[name] = version(name)
        except PackageNotFoundError:  # the cases that need it report their own error
            info[name] = "not installed"
    return info


def shared_machine_note(loads: list[float | None], threads: int) -> list[str]:
    """Markdown lines warning that other processes shared the CPU, when the 1-minute load
    average before some case exceeded what this benchmark's own threads explain."""
    busiest = max((load for load in loads if load is not None), default=0.0)
    if busiest <= threads + 1:
        return []
    return ["", f"**Shared machine:** the load average reached {busiest:.1f} before a case "
            f"(this benchmark alone accounts for about {threads}), so other processes competed for "
            "the cores: wall-clock seconds and their ratios are inflated unevenly; CPU s is less affected."]


class _PeakRSS:
    """Peak resident memory of this process during a ``with`` block, minus RSS at its start."""

    def __init__(self, interval_s: float = 1e-3):
        self._interval_s = interval_s
        self._use_hwm = False
        self._baseline = 0
        self._stop = threading.Event()
        self._sampled_peak = 0
        self._thread: threading.Thread | None = None
        self.extra_bytes = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE

    @staticmethod
    def _hwm() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM missing from /proc/self/status")

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sampled_peak = max(self._sampled_peak, self._rss())

    def __enter__(self) -> "_PeakRSS":
        self._use_hwm = self._reset_hwm()
        self._baseline = self._rss()
        self._sampled_peak = self._baseline
        if not self._use_hwm:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        peak = max(self._sampled_peak, self._rss(), self._hwm() if self._use_hwm else 0)
        self.extra_bytes = max(0, peak - self._baseline)


@dataclasses.dataclass
class Calls:
    """What :func:`measure_calls` saw: per call wall and CPU seconds and extra peak RSS, and the
    last call's return value."""

    seconds: list[float]
    cpu_seconds: list[float]
    extra_bytes: list[int]
    result: Any


def measure_calls(fn: Callable[[], Any], repeats: int, before_each: Callable[[], None] | None = None) -> Calls:
    """Call ``fn`` ``repeats`` times in this process, each timed and with its own peak RSS.

    Before each call the previous result is dropped and garbage collected, then
    ``before_each`` runs (unmeasured: e.g. a barrier that lines up the ranks of a distributed
    step), so neither counts in the call's time or memory.
    """
    seconds, cpu_seconds, extra, result = [], [], [], None
    for _ in range(repeats):
        result = None
        gc.collect()
        if before_each is not None:
            before_each()
        with _PeakRSS() as peak:
            start, cpu_start = time.perf_counter(), time.process_time()
            result = fn()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        extra.append(peak.extra_bytes)
    return Calls(seconds, cpu_seconds, extra, result)


def malloc_trim() -> None:
    """Give the memory glibc's heaps hold free back to the kernel (no-op without glibc), so that
    the next call's peak RSS counts what it allocates instead of reusing pages freed earlier."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def offer_to_oom_killer() -> None:
    """Make this process the OOM killer's first choice, so that a benchmark that overruns the
    machine's memory (a materialized baseline) dies instead of someone else's job."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


def _resolve(case: str) -> Callable[..., Callable[[], Any]]:
    module, _, function = case.partition(":")
    if not function:
        raise ValueError(f"case must be 'module:function', got {case!r}")
    return getattr(importlib.import_module(module), function)


def _is_oom(error: BaseException) -> bool:
    text = str(error).lower()
    return isinstance(error, MemoryError) or "can't allocate memory" in text or "out of memory" in text


def _child(request: dict[str, Any]) -> None:
    """Entry point of the subprocess: prepare, warm up, measure, write the report."""
    offer_to_oom_killer()
    sys.path.insert(0, str(_HERE))
    import torch

    if request["threads"] is not None:
        torch.set_num_threads(request["threads"])
    report = Path(request["report"])
    try:
        fn = _resolve(request["case"])(**request["params"])
        for _ in range(request["warmup"]):
            fn()
        calls = measure_calls(fn, request["repeats"])
        if request["save_result"] is not None:
            torch.save(calls.result, request["save_result"])
        outcome = Measurement("ok", calls.seconds, calls.cpu_seconds, max(calls.extra_bytes))
    except Exception as error:  # reported to the parent, which records it instead of dying
        first_line = str(error).strip().splitlines()[:1]
        outcome = Measurement("oom" if _is_oom(error) else "error",
                              detail=f"{type(error).__name__}: {' '.join(first_line)}")
    report.write_text(json.dumps(dataclasses.asdict(outcome)))


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
