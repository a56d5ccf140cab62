"""Timing and JSON-line records shared by our runner and the peers' runner.

Pure Python (no JAX, no torch). Every measurement calls the function once
as a warm-up (its time, which includes JIT compilation or first-call
allocation, is reported separately as `first_call_s`) and then `repeats`
times; `median_s` is the median of those repeats. The caller's function must
block until its result is ready (`jax.block_until_ready`; torch on the CPU
is synchronous).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, TextIO


@dataclasses.dataclass(frozen=True)
class Timing:
  first_call_s: float | None
  times_s: tuple[float, ...]

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  def fields(self) -> dict[str, Any]:
    return dict(median_s=self.median_s, min_s=min(self.times_s),
                max_s=max(self.times_s), repeats=len(self.times_s),
                first_call_s=self.first_call_s)


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
  """Times `warmup` excluded calls (the first reported) and `repeats` calls.

  With warmup=0 (the caller warmed up already) first_call_s is None.
  """
  if repeats < 1 or warmup < 0:
    raise ValueError("measure needs repeats >= 1 and warmup >= 0")
  first = None
  for _ in range(warmup):
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    first = dt if first is None else first
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return Timing(first, tuple(times))


def throughput_record(impl: str, what: str, cfg, t: Timing
                      ) -> dict[str, Any]:
  """The fields every implementation's record starts with.

  `cfg` is a `benchmarks.configs.BenchConfig`; `what` is "sample" (one call
  generates `cfg.batch` images) or "train" (one call is one step).
  """
  rec: dict[str, Any] = dict(impl=impl, what=what, config=cfg.name,
                             batch=cfg.batch)
  if what == "sample":
    rec.update(steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale)
  rec.update(t.fields(), images_per_s=cfg.batch / t.median_s,
             tokens_per_s=cfg.batch * cfg.seq_len / t.median_s)
  if what == "train":
    rec["steps_per_s"] = 1.0 / t.median_s
  return rec


def rates(record: dict[str, Any], peak: float) -> dict[str, Any]:
  """FLOP/s (XLA or counted, and matmul-only) and their share of `peak`."""
  med = record["median_s"]
  out = dict(flops_per_s=record["flops"] / med,
             matmul_flops_per_s=record["flops_matmul"] / med,
             peak_flops_per_s=peak)
  out["utilisation"] = out["flops_per_s"] / peak
  out["matmul_utilisation"] = out["matmul_flops_per_s"] / peak
  return out


def cpu_name() -> str:
  """'<model name> (<n> cores)' from /proc/cpuinfo, or platform's guess."""
  name = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name} ({os.cpu_count()} cores)"


def git_commit() -> str | None:
  """The short commit, "+dirty" when tracked files differ from it (our
  own results files do not count)."""
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True,
                            check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
         ":(exclude)benchmarks/results"],
        capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return commit + ("+dirty" if dirty else "")


def max_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def emit(record: dict[str, Any], out: TextIO | None = None) -> None:
  """Prints one JSON line (to stdout, and to `out` when given)."""
  line = json.dumps(record, sort_keys=False)
  print(line, flush=True)
  if out is not None:
    out.write(line + "\n")
    out.flush()


def log(msg: str) -> None:
  """Progress messages go to stderr, so stdout stays JSON lines."""
  print(msg, file=sys.stderr, flush=True)


class Recorder:
  """Collects a run's records; each is also printed as one JSON line and
  written to the file `path` (when given; its folder is created)."""

  def __init__(self, path: str | None = None):
    self.records: list[dict[str, Any]] = []
    self._out = None
    if path:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      self._out = open(path, "w")

  def __call__(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    emit(record, self._out)

  def close(self) -> None:
    if self._out is not None:
      self._out.close()
      self._out = None


def run_peer(cmd: list[str], record: Callable[[dict[str, Any]], None],
             name: str) -> list[dict[str, Any]]:
  """Runs a peer's benchmark process (`name` in messages): every JSON line
  it prints is recorded, other lines are logged; a failure becomes an
  error record. The peer's stderr goes straight to ours."""
  log(f"running {name}: " + " ".join(cmd[:3]) + " ...")
  records = []
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
    for line in proc.stdout:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        log(f"[{name}] {line}")
        continue
      records.append(rec)
      record(rec)
  if proc.returncode:
    record(dict(impl="peers", what="error",
                error=f"{name} ({' '.join(cmd[1:3])}) exited with "
                f"{proc.returncode}"))
  return records
