"""Runs the peers' benchmarks and prints one JSON object per line.

Run in the peers' virtual environment from the repository root (bench.py
does this as a subprocess when given --peers):

  .venv-peers/bin/python -m benchmarks.peers.run_peers --configs=S,demo \
      [--peak_flops_per_s=X] [--impls=amused,lucidrains] [--what=sample,train]

The first lines are torch's measured peak matmul FLOP/s (`what: peak`, one
per dtype the configs compute in); every record's `peak_flops_per_s` is the
larger of that and our JAX measurement on the same machine for its dtype
(`--peak_flops_per_s`, `--peak_bf16_flops_per_s`). A `bfloat16` config runs
the peer under `torch.autocast("cpu", torch.bfloat16)`; lucidrains' chunked
"flash" attention then overflows (its -finfo.max fill does not fit
bfloat16), so it runs with its plain attention there. A benchmark
that fails prints a record with an `error` field instead of stopping the
others.
"""

from __future__ import annotations

import argparse
import os
import traceback

# Before anything imports tqdm: lucidrains' generate() wraps its loop in it.
os.environ.setdefault("TQDM_DISABLE", "1")

from benchmarks import configs  # pylint: disable=g-import-not-at-top
from benchmarks import timing  # pylint: disable=g-import-not-at-top
from benchmarks.peers import measure  # pylint: disable=g-import-not-at-top

IMPLS = ("amused", "lucidrains")
WHATS = ("sample", "train")


def _csv(choices):
  def parse(value: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = sorted(set(items) - set(choices))
    if bad:
      raise argparse.ArgumentTypeError(f"{bad} not in {list(choices)}")
    return items
  return parse


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", type=_csv(configs.CONFIGS), default=["S"])
  p.add_argument("--impls", type=_csv(IMPLS), default=list(IMPLS))
  p.add_argument("--what", type=_csv(WHATS), default=list(WHATS))
  p.add_argument("--repeats_sample", type=int, default=3)
  p.add_argument("--repeats_train", type=int, default=5)
  p.add_argument("--repeats_forward", type=int, default=3)
  p.add_argument("--peak_flops_per_s", type=float, default=0.0,
                 help="peak measured by JAX on this machine, if known")
  p.add_argument("--peak_bf16_flops_per_s", type=float, default=0.0,
                 help="the same for bfloat16 operands")
  p.add_argument("--peak_n", type=int, default=2048)
  p.add_argument("--lucid_flash", type=int, default=1,
                 help="lucidrains' flash=True (its default) or 0")
  return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
  measure.setup()
  # Imported here so --help works without torch's import time.
  from benchmarks.peers import amused  # pylint: disable=g-import-not-at-top
  from benchmarks.peers import lucidrains  # pylint: disable=g-import-not-at-top

  ours = dict(float32=args.peak_flops_per_s,
              bfloat16=args.peak_bf16_flops_per_s)
  peaks = {}
  for dtype in sorted({configs.get(name).dtype for name in args.configs}):
    peak_rec = dict(impl="torch", what="peak", device=measure.device_name(),
                    **measure.peak_matmul_flops(args.peak_n, dtype=dtype))
    timing.emit(peak_rec)
    peaks[dtype] = max(peak_rec["peak_flops_per_s"], ours.get(dtype, 0.0))
  modules = dict(amused=amused, lucidrains=lucidrains)
  for name in args.configs:
    cfg = configs.get(name)
    peak = peaks[cfg.dtype]
    for impl in args.impls:
      mod = modules[impl]
      flash = bool(args.lucid_flash) and cfg.dtype == "float32"
      extra = {"flash": flash} if impl == "lucidrains" else {}
      for what in args.what:
        try:
          with measure.precision(cfg):
            rec = _bench(mod, what, cfg, peak, args, extra)
        except Exception as e:  # pylint: disable=broad-except
          traceback.print_exc()
          rec = dict(impl=mod.IMPL, what=what, config=name,
                     batch=cfg.batch, error=f"{type(e).__name__}: {e}",
                     device=measure.device_name())
        rec["config_detail"] = cfg.describe()
        timing.emit(rec)


def _bench(mod, what, cfg, peak, args, extra):
  if what == "sample":
    return mod.bench_sample(cfg, peak=peak, repeats=args.repeats_sample,
                            forward_repeats=args.repeats_forward, **extra)
  return mod.bench_train(cfg, peak=peak, repeats=args.repeats_train,
                         **extra)


def main() -> None:
  run(parse_args())


if __name__ == "__main__":
  main()
