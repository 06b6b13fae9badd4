"""Run a command and measure it from the outside: wall time, CPU time and memory of its whole
process tree, and a timestamp on every output line (how step times are read off tools that
don't write them to a file).

    result = run_measured(["cpt", "tokenize", ...], cwd=work, log_path=work / "tokenize.log")
    result.wall_s, result.cpu_s, result.peak_rss_mb, result.lines[0].t

The machine is shared and noisy, so every run also records how much CPU *other* processes used
meanwhile (`foreign_cpu_share`, in cores): a run with a high value was contended and its wall
time is suspect; CPU seconds of our own tree are much less affected.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MB = 1 << 20


@dataclass
class Line:
    t: float  # seconds since the command started
    text: str


@dataclass
class Sample:
    t: float  # seconds since the command started
    rss_mb: float  # sum over the live process tree
    cpu_s: float  # user + system seconds of the tree so far (exited, waited-for children included)


@dataclass
class RunResult:
    command: list[str]
    returncode: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float  # peak of the summed RSS of the process tree (shared pages counted per process)
    peak_pss_mb: float  # peak of the summed PSS (shared pages split): the tree's real footprint
    peak_rss_single_mb: float  # largest single process
    foreign_cpu_share: float  # cores busy with processes outside the tree, averaged over the run
    lines: list[Line] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds the tree used between two moments (linear between samples)."""
        return _interpolate(self.samples, t1) - _interpolate(self.samples, t0)

    def summary(self) -> dict:
        keep = asdict(self)
        keep.pop("lines")
        keep.pop("samples")
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in keep.items()}


def _interpolate(samples: list[Sample], t: float) -> float:
    if not samples:
        return 0.0
    if t <= samples[0].t:
        return samples[0].cpu_s
    for before, after in zip(samples, samples[1:], strict=False):
        if before.t <= t <= after.t:
            span = max(after.t - before.t, 1e-9)
            return before.cpu_s + (after.cpu_s - before.cpu_s) * (t - before.t) / span
    return samples[-1].cpu_s


def _system_busy_s() -> float:
    """CPU seconds all processes on the machine have been busy (user + nice + system + irq)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + getattr(times, "irq", 0.0) + getattr(times, "softirq", 0.0)


class TreeSampler(threading.Thread):
    """Samples RSS and CPU time of a process and its descendants every `interval` seconds."""

    def __init__(self, pid: int, started: float, interval: float = 0.1, pss_every: int = 5):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.started = started
        self.interval = interval
        self.pss_every = pss_every
        self.samples: list[Sample] = []
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_single = 0
        self._dead_cpu: dict[int, float] = {}  # last CPU seen of each descendant
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def run(self) -> None:
        count = 0
        while not self._halt.is_set():
            self._sample(with_pss=count % self.pss_every == 0)
            count += 1
            self._halt.wait(self.interval)

    def _sample(self, with_pss: bool) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        rss = pss = 0
        cpu = 0.0
        for proc in procs:
            try:
                with proc.oneshot():
                    memory = proc.memory_info()
                    times = proc.cpu_times()
                rss += memory.rss
                self.peak_single = max(self.peak_single, memory.rss)
                own = times.user + times.system
                if proc.pid != self.root.pid:
                    self._dead_cpu[proc.pid] = own  # kept after it exits: its CPU still counts
                else:
                    cpu += own
                if with_pss:
                    pss += proc.memory_full_info().pss
            except psutil.Error:
                continue
        cpu += sum(self._dead_cpu.values())
        self.peak_rss = max(self.peak_rss, rss)
        if with_pss:
            self.peak_pss = max(self.peak_pss, pss)
        self.samples.append(Sample(time.perf_counter() - self.started, rss / MB, cpu))


def run_measured(
    command: list[str],
    *,
    cwd: Path,
    log_path: Path,
    env: dict | None = None,
    timeout_s: float | None = None,
    interval: float = 0.1,
) -> RunResult:
    """Run `command` to completion; its merged stdout/stderr goes to log_path, each line timestamped."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines: list[Line] = []
    busy_before = _system_busy_s()
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(part) for part in command], cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, encoding="utf-8", errors="replace", bufsize=1,
    )
    sampler = TreeSampler(process.pid, started, interval=interval)
    sampler.start()
    with open(log_path, "w", encoding="utf-8") as log:

        def pump() -> None:
            for text in process.stdout:
                now = time.perf_counter() - started
                lines.append(Line(now, text.rstrip("\n")))
                log.write(f"[{now:9.3f}] {text}")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = process.wait()
        reader.join()
    wall_s = time.perf_counter() - started
    sampler.stop()
    # Exact: a reaped process adds its own CPU and that of its reaped descendants to ours.
    cpu_s = _children_cpu_s() - cpu_before
    foreign = max(_system_busy_s() - busy_before - cpu_s, 0.0) / max(wall_s, 1e-9)
    return RunResult(
        command=[str(part) for part in command], returncode=returncode, wall_s=wall_s, cpu_s=cpu_s,
        peak_rss_mb=sampler.peak_rss / MB, peak_pss_mb=sampler.peak_pss / MB, peak_rss_single_mb=sampler.peak_single / MB,
        foreign_cpu_share=foreign, lines=lines, samples=sampler.samples,
    )


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_info() -> dict:
    """What the numbers were measured on."""
    import importlib.metadata as metadata

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    notable = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flag in flags]
    versions = {}
    for name in ("torch", "transformers", "tokenizers", "accelerate", "numpy", "rjieba", "jieba"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                  check=False).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "cpt"], cwd=REPO, capture_output=True, text=True,
                                    check=False).stdout.strip())
    except OSError:
        revision, dirty = None, None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "cpu_flags": " ".join(notable),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "cpt_revision": revision,
        "cpt_dirty": dirty,
    }


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def venv_bin(name: str) -> str:
    """An executable of the interpreter's own venv (the one `make bench` runs), else the name on PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
