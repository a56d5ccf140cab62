r"""Where our training step or sampler spends its time, op by op.

  python -m benchmarks.breakdown --config=S --what=train [--steps=3] [--top=25]

Compiles the same program as `benchmarks.bench` (benchmarks/ours.py), runs
it under `jax.profiler.trace`, and maps every timed XLA operation in the
trace back to the compiled HLO: what it is (`matmul`: a dot or a fusion
around one, including the YNNPACK/oneDNN library fusions; `copy`: a layout
change, i.e. a transposition XLA materialised, with whatever element-wise
work XLA fused into it; `elementwise`: every other fusion, reductions
included) and which pass it belongs to (`forward`,
`backward`, `recompute` — the rematerialised forward inside the backward —
or `other`: the optimizer update, the loss and anything outside the
model's differentiation). It prints JSON lines: one `summary`, one line per
(pass, kind) with milliseconds per step and share, then the `top` ops.

Read the numbers as a profile, not a budget: XLA:CPU runs independent
operations concurrently, so the ops' durations can add up to more than the
wall time (`overlap_ms`; negative when gaps between ops, such as dispatch
on a tiny program, outweigh it), and an op sharing the two cores with
another runs slower than alone. Loops (`while`, `conditional`, `call`) are left out:
their time is their body's ops, which are counted.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax

from benchmarks import configs
from benchmarks import ours
from benchmarks import timing

KINDS = ("matmul", "copy", "elementwise")
PASSES = ("forward", "recompute", "backward", "other")
_CONTROL = ("while", "conditional", "call")

_INSTR = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\([^=]*?\)|\S+) "
    r"(?P<opcode>[\w\-]+)\((?P<rest>.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%(?P<name>[\w.\-]+) .*\{$")


@dataclasses.dataclass(frozen=True)
class Op:
  """One HLO instruction of the compiled module, classified."""

  name: str
  shape: str
  opcode: str
  kind: str  # One of KINDS, or "control".
  phase: str  # One of PASSES.
  source: str  # The jaxpr op it came from (metadata op_name).


def _phase(op_name: str) -> str:
  if "rematted_computation" in op_name:
    return "recompute"
  if "transpose(jvp" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return "other"


def parse_hlo(text: str) -> dict[str, Op]:
  """Every instruction of an HLO module's text, by name, classified.

  A fusion is a matmul when its fused computation contains a dot or a
  convolution, a copy when it contains a copy or transpose (it writes or
  reads a transposed layout, whatever else it computes on the way), else
  element-wise. The pass comes from the instruction's `op_name`, which JAX
  prefixes with jvp(...) for the forward and transpose(jvp(...)) for the
  backward of a differentiated function; a fusion XLA created without one
  takes the last `op_name` inside it.
  """
  bodies: dict[str, list[str]] = {}  # computation -> opcodes
  sources: dict[str, str] = {}  # computation -> its last op_name
  # (name, shape, opcode, op_name, called computation)
  instrs: list[tuple[str, str, str, str, str | None]] = []
  current = None
  for line in text.splitlines():
    head = _COMP.match(line)
    if head:
      current = head.group("name")
      bodies[current] = []
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    opcode = m.group("opcode")
    src = re.search(r'op_name="([^"]*)"', m.group("rest"))
    calls = re.search(r"calls=%([\w.\-]+)", m.group("rest"))
    if current is not None:
      bodies[current].append(opcode)
      if src:
        sources[current] = src.group(1)
    instrs.append((m.group("name"), m.group("shape"), opcode,
                   src.group(1) if src else "",
                   calls.group(1) if calls else None))

  def fused_kind(comp: str | None) -> str:
    ops = bodies.get(comp, []) if comp else []
    if any(o in ("dot", "convolution") for o in ops):
      return "matmul"
    if any(o in ("copy", "transpose") for o in ops):
      return "copy"
    return "elementwise"

  out = {}
  for name, shape, opcode, source, calls in instrs:
    if not source and calls:  # XLA made the fusion; its ops know their pass.
      source = sources.get(calls, "")
    if opcode in ("dot", "convolution"):
      kind = "matmul"
    elif opcode in ("copy", "transpose"):
      kind = "copy"
    elif opcode in _CONTROL:
      kind = "control"
    elif opcode == "fusion":
      kind = fused_kind(calls)
    else:
      kind = "elementwise"
    out[name] = Op(name, shape, opcode, kind, _phase(source), source)
  return out


def trace_durations(run: Callable[[], Any], calls: int,
                    trace_dir: str) -> dict[str, tuple[float, int]]:
  """{event name: (total microseconds, count)} over `calls` runs."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      run()
  paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                    recursive=True)
  if not paths:
    raise RuntimeError(f"jax.profiler wrote no perfetto trace under "
                       f"{trace_dir}")
  with gzip.open(paths[0]) as f:
    events = json.load(f)["traceEvents"]
  totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      totals[e["name"]][0] += float(e["dur"])
      totals[e["name"]][1] += 1
  return {k: (v[0], int(v[1])) for k, v in totals.items()}


def breakdown(ops: dict[str, Op], durations: dict[str, tuple[float, int]],
              *, calls: int, devices: int, wall_s: float, top: int
              ) -> list[dict[str, Any]]:
  """JSON records: summary, per (pass, kind) totals, the `top` ops.

  Times are milliseconds per call of the program on one device (the trace
  holds every device's copy of each op).
  """
  per_call = 1e-3 / (calls * devices)
  cells: dict[tuple[str, str], float] = collections.defaultdict(float)
  rows = []
  for name, (us, _) in durations.items():
    op = ops.get(name)
    if op is None or op.kind == "control":
      continue
    ms = us * per_call
    cells[(op.phase, op.kind)] += ms
    rows.append((ms, op))
  total = sum(cells.values())
  wall_ms = wall_s * 1e3
  records = [dict(kind="summary", wall_ms=wall_ms, op_ms=total,
                  overlap_ms=total - wall_ms, ops_timed=len(rows),
                  calls=calls, devices=devices)]
  for phase in PASSES:
    for kind in KINDS:
      if (phase, kind) in cells:
        ms = cells[(phase, kind)]
        records.append(dict(kind="category", phase=phase, op_kind=kind,
                            ms=ms, share=ms / total if total else 0.0))
  for ms, op in sorted(rows, key=lambda r: -r[0])[:top]:
    records.append(dict(kind="top", op=op.name, ms=ms, op_kind=op.kind,
                        phase=op.phase, shape=op.shape,
                        source=op.source[-90:]))
  return records


def run(config: str, what: str, steps: int, top: int,
        trace_dir: str | None = None) -> list[dict[str, Any]]:
  """Compiles and profiles our `what` (train|sample) at benchmark `config`."""
  cfg = configs.get(config)
  if what not in ("train", "sample"):
    raise ValueError(f"--what={what!r}: expected train or sample")
  if steps < 1:
    raise ValueError(f"--steps={steps}: need at least 1")

  def measure(prog: ours.Program) -> list[dict[str, Any]]:
    prog.run()  # Warm-up: first-call allocations stay out of the trace.
    t0 = time.perf_counter()
    for _ in range(steps):
      prog.run()
    wall_s = (time.perf_counter() - t0) / steps
    ops = parse_hlo(prog.compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
      durations = trace_durations(prog.run, steps, trace_dir or tmp)
    devices = len(jax.devices())
    records = breakdown(ops, durations, calls=steps, devices=devices,
                        wall_s=wall_s, top=top)
    for r in records:
      r.update(config=cfg.name, what=what)
    return records

  if what == "train":
    with ours.train_program(cfg) as prog:
      return measure(prog)
  return measure(ours.sample_program(cfg))


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  for record in run(f.config, f.what, f.steps, f.top, f.trace_dir):
    timing.emit(record)


if __name__ == "__main__":
  # Flags are defined only when this file is the program, so the library
  # above imports alongside the other CLIs (tests import it) without two
  # modules claiming the same flag name.
  flags.DEFINE_string("config", "S", "Benchmark config name.")
  flags.DEFINE_enum("what", "train", ["train", "sample"],
                    "Which program to profile.")
  flags.DEFINE_integer("steps", 3, "Profiled calls (after warm-up).")
  flags.DEFINE_integer("top", 25, "How many of the slowest ops to list.")
  flags.DEFINE_string(
      "trace_dir", None, "Keep the profiler trace here (for Perfetto / "
      "TensorBoard); by default it goes to a temporary directory.")
  app.run(main)
