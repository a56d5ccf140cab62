r"""Benchmarks muse_jax against its peers in one invocation.

  python -m benchmarks.bench --configs=S,demo --peers \
      --out=benchmarks/results/cpu.jsonl --table_out=benchmarks/results/cpu.md

(`make bench` runs this.) Prints one JSON object per line, in order:
`what: meta` (date, commit, versions), our measured peak matmul FLOP/s
(`what: peak`, one per dtype the configs compute in), the peers' lines
when --peers is given (run as a
subprocess in the peers' virtual environment: benchmarks/peers/run_peers.py,
torch's own peak first), our `sample` and `train` records per config, and
one `kind: ratio` line per (config, what, peer) with ours / peer of
images/s (sampling) or tokens/s (training). `peak_flops_per_s` in every
record is the larger of the JAX and torch matmul measurements in the
config's dtype (S-bf16 is measured against the bfloat16 peak).

Timing: warm-up excluded (its time is `first_call_s`; our compile time is
`compile_s`), median of --repeats_* calls. FLOPs: see benchmarks/flops.py.
A failing benchmark prints a record with an `error` field and the run goes
on. --table_out writes the markdown table of benchmarks/table.py.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from benchmarks import configs
from benchmarks import ours
from benchmarks import peak as peak_lib
from benchmarks import table
from benchmarks import timing

_CONFIGS = flags.DEFINE_list("configs", ["S", "demo"],
                             f"benchmark configs ({sorted(configs.CONFIGS)})")
_WHAT = flags.DEFINE_list("what", ["sample", "train"], "sample and/or train")
_REPEATS_SAMPLE = flags.DEFINE_integer("repeats_sample", 3,
                                       "timed sampler calls (median)")
_REPEATS_TRAIN = flags.DEFINE_integer("repeats_train", 5,
                                      "timed training steps (median)")
_REPEATS_FORWARD = flags.DEFINE_integer("repeats_forward", 3,
                                        "timed bare transformer forwards")
_PEAK_N = flags.DEFINE_integer("peak_n", 2048, "matmul size for the peak")
_OURS = flags.DEFINE_bool("ours", True, "run our benchmarks")
_PEERS = flags.DEFINE_bool("peers", False,
                           "also run the peers (needs the peers' venv)")
_PEERS_PYTHON = flags.DEFINE_string(
    "peers_python", ".venv-peers/bin/python", "the peers' interpreter")
_PEER_IMPLS = flags.DEFINE_list("peer_impls", ["amused", "lucidrains"],
                                "which peers")
_LUCID_FLASH = flags.DEFINE_bool(
    "lucid_flash", True, "lucidrains' flash attention (its default)")
_OUT = flags.DEFINE_string("out", "", "also append the JSON lines here")
_TABLE_OUT = flags.DEFINE_string("table_out", "",
                                 "write the markdown results table here")
_FORCE_BF16 = flags.DEFINE_bool(
    "force_bf16", False, "run bfloat16 configs even on a CPU without "
    "native bf16 (slow: hours for the peers)")

IMPL = ours.IMPL
METRIC = {"sample": "images_per_s", "train": "tokens_per_s"}


def _run_peers(peaks: dict[str, float], emit, names: list[str]
               ) -> list[dict[str, Any]]:
  """Runs run_peers.py in the peers' venv, relaying its JSON lines."""
  if not os.path.exists(_PEERS_PYTHON.value):
    raise FileNotFoundError(
        f"{_PEERS_PYTHON.value} not found: create the peers' venv "
        "(`make bench` does) or pass --peers_python")
  cmd = [_PEERS_PYTHON.value, "-m", "benchmarks.peers.run_peers",
         f"--configs={','.join(names)}",
         f"--what={','.join(_WHAT.value)}",
         f"--impls={','.join(_PEER_IMPLS.value)}",
         f"--repeats_sample={_REPEATS_SAMPLE.value}",
         f"--repeats_train={_REPEATS_TRAIN.value}",
         f"--repeats_forward={_REPEATS_FORWARD.value}",
         f"--peak_n={_PEAK_N.value}",
         f"--peak_flops_per_s={peaks.get('float32', 0.0)}",
         f"--peak_bf16_flops_per_s={peaks.get('bfloat16', 0.0)}",
         f"--lucid_flash={int(_LUCID_FLASH.value)}"]
  return timing.run_peer(cmd, emit, "peers")


def ratio_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One line per (config, what, peer): ours / peer of the what's metric."""
  mine = {(r["config"], r["what"]): r for r in records
          if r.get("impl") == IMPL and r.get("what") in METRIC
          and "error" not in r}
  out = []
  for r in records:
    if (r.get("impl") in (IMPL, None) or r.get("what") not in METRIC
        or "error" in r or "ratio" in r):
      continue
    m = mine.get((r["config"], r["what"]))
    if m is None:
      continue
    metric = METRIC[r["what"]]
    out.append(dict(
        kind="ratio", impl=IMPL, peer=r["impl"], what=r["what"],
        config=r["config"], batch=r["batch"], metric=metric,
        ours_value=m[metric], peer_value=r[metric],
        ratio=m[metric] / r[metric], device=m["device"]))
  return out


def main(argv) -> None:
  del argv
  t_start = time.perf_counter()
  for name in _CONFIGS.value:
    configs.get(name)  # Fail early on a typo.
  bad = sorted(set(_WHAT.value) - set(METRIC))
  if bad:
    raise app.UsageError(f"--what: {bad} not in {sorted(METRIC)}")
  emit = timing.Recorder(_OUT.value)
  records = emit.records

  device = peak_lib.device_name()
  has_bf16, evidence = peak_lib.native_bf16()
  names, skipped = configs.runnable(_CONFIGS.value, has_bf16 or
                                    _FORCE_BF16.value, evidence)
  for rec in skipped:
    timing.log(f"skipping config {rec['config']}: {rec['reason']}; "
               "--force_bf16 runs it anyway")
    emit(rec)
  load = os.getloadavg()[0]
  if load > 0.5:
    timing.log(f"warning: 1-minute load average is {load:.2f}; other work "
               "on this machine skews the timings (torch's OpenMP threads "
               "most of all)")
  emit(dict(what="meta", impl="bench", loadavg_1m=load,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            git_commit=timing.git_commit(), device=device,
            jax_version=jax.__version__, python=sys.version.split()[0],
            command=" ".join(sys.argv), configs=names,
            native_bf16=has_bf16, native_bf16_evidence=evidence))
  peaks = {}
  for dtype in sorted({configs.get(n).dtype for n in names}):
    jax_peak = dict(impl=IMPL, what="peak", device=device,
                    **peak_lib.peak_matmul_flops(_PEAK_N.value,
                                                 dtype=jnp.dtype(dtype)))
    emit(jax_peak)
    peaks[dtype] = jax_peak["peak_flops_per_s"]
  if _PEERS.value:
    try:
      for rec in _run_peers(peaks, emit, names):
        if rec.get("what") == "peak":
          peaks[rec["dtype"]] = max(peaks[rec["dtype"]],
                                    rec["peak_flops_per_s"])
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      emit(dict(impl="peers", what="error",
                error=f"{type(e).__name__}: {e}"))
  if _OURS.value:
    for name in names:
      cfg = configs.get(name)
      peak = peaks[cfg.dtype]
      for what in _WHAT.value:
        try:
          if what == "sample":
            rec = ours.bench_sample(
                cfg, peak=peak, device=device,
                repeats=_REPEATS_SAMPLE.value,
                forward_repeats=_REPEATS_FORWARD.value)
          else:
            rec = ours.bench_train(cfg, peak=peak, device=device,
                                   repeats=_REPEATS_TRAIN.value)
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()
          rec = dict(impl=IMPL, what=what, config=name, batch=cfg.batch,
                     error=f"{type(e).__name__}: {e}", device=device)
        rec["config_detail"] = cfg.describe()
        emit(rec)
  for rec in ratio_records(records):
    emit(rec)
  emit(dict(what="done", impl="bench", wall_s=time.perf_counter() - t_start,
            loadavg_1m=os.getloadavg()[0]))
  emit.close()
  if _TABLE_OUT.value:
    os.makedirs(os.path.dirname(_TABLE_OUT.value) or ".", exist_ok=True)
    with open(_TABLE_OUT.value, "w") as f:
      f.write(table.render(records))
    timing.log(f"wrote {_TABLE_OUT.value}")


if __name__ == "__main__":
  app.run(main)
