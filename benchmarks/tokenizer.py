r"""Benchmarks our VQ tokenizer against diffusers' VQModel in one run.

  python -m benchmarks.tokenizer --out=benchmarks/results/tokenizer_cpu.jsonl

(`make bench-tokenizer` runs this.) The f = 16 tokenizer of aMUSEd
(`diffusers_vq_layout.AMUSED_CONFIG`: block_out_channels [128, 256, 256,
512, 768], 64 latent channels, 8192 codes) at --size pixels, float32 on
both sides, the same seeded random weights on both sides: ours
(benchmarks/tokenizer_ours.py) and diffusers' `VQModel` (run as a
subprocess in the peers' venv, benchmarks/peers/tokenizer.py, with torch
using as many threads as this machine has cores, as XLA does).

Prints one JSON object per line: `what: meta` (date, commit, CPU model,
versions, load), then our and diffusers' `encode` (images -> tokens)
records, then both `decode` (tokens -> images) records, each with
`images_per_s` (batch / median call time; warm-up excluded) and the
1-minute load average when it finished, then one `kind: ratio` line per
what with ours / diffusers of images/s, and `what: done`. The sides of a
ratio run back to back, so that other work on a shared machine skews both
alike as far as possible.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback

from absl import app
from absl import flags
import jax

from benchmarks import timing
from benchmarks import tokenizer_ours
from muse_jax.interop import diffusers_vq_layout as layout

_OUT = flags.DEFINE_string("out", "", "also write the JSON lines here")
_BATCH = flags.DEFINE_integer("batch", 8, "images per call")
_SIZE = flags.DEFINE_integer("size", 256, "image size (pixels per side)")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls (median)")
_SEED = flags.DEFINE_integer("seed", 0, "weights and inputs seed")
_WHAT = flags.DEFINE_list("what", ["encode", "decode"],
                          "encode (images -> tokens) and/or decode")
_OURS = flags.DEFINE_bool("ours", True, "run ours")
_PEERS = flags.DEFINE_bool("peers", True, "run diffusers (peers' venv)")
_PEERS_PYTHON = flags.DEFINE_string(
    "peers_python", ".venv-peers/bin/python", "the peers' interpreter")
_THREADS = flags.DEFINE_integer(
    "threads", os.cpu_count() or 1, "torch intra-op threads (XLA uses "
    "every core)")

NAME = "amused-f16"


def _versions() -> dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  return dict(jax_version=jax.__version__, jaxlib_version=jaxlib.__version__,
              flax_version=flax.__version__)


def _run_peers(emit, what: str) -> None:
  if not os.path.exists(_PEERS_PYTHON.value):
    raise FileNotFoundError(
        f"{_PEERS_PYTHON.value} not found: create the peers' venv "
        "(`make bench-tokenizer` does) or pass --peers_python")
  cmd = [_PEERS_PYTHON.value, "-m", "benchmarks.peers.tokenizer",
         f"--config_json={json.dumps(layout.AMUSED_CONFIG)}",
         f"--name={NAME}", f"--batch={_BATCH.value}", f"--size={_SIZE.value}",
         f"--repeats={_REPEATS.value}", f"--seed={_SEED.value}",
         f"--threads={_THREADS.value}", f"--whats={what}"]
  timing.run_peer(cmd, emit, "diffusers")


def main(argv) -> None:
  del argv
  t_start = time.perf_counter()
  bad = sorted(set(_WHAT.value) - set(tokenizer_ours.WHATS))
  if bad:
    raise app.UsageError(f"--what: {bad} not in {tokenizer_ours.WHATS}")
  emit = timing.Recorder(_OUT.value)
  records = emit.records

  device = f"cpu: {timing.cpu_name()}"
  load = os.getloadavg()[0]
  if load > 0.5:
    timing.log(f"warning: 1-minute load average is {load:.2f}; other work "
               "on this machine skews the timings")
  emit(dict(what="meta", impl="bench-tokenizer", loadavg_1m=load,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            git_commit=timing.git_commit(),
            device=device, jax_device=str(jax.devices()[0]),
            python=sys.version.split()[0], command=" ".join(sys.argv),
            config=NAME, diffusers_config=layout.AMUSED_CONFIG,
            batch=_BATCH.value, image_size=_SIZE.value,
            torch_threads=_THREADS.value, **_versions()))
  model = None
  if _OURS.value:
    try:
      model = tokenizer_ours.make_model(layout.AMUSED_CONFIG, _SEED.value)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      emit(dict(impl=tokenizer_ours.IMPL, what="error",
                error=f"{type(e).__name__}: {e}"))
  # Each side's encode, then each side's decode: the two sides of a ratio
  # run minutes apart at most, whatever else the machine does meanwhile.
  for what in _WHAT.value:
    if model is not None:
      try:
        emit(tokenizer_ours.bench_one(
            *model, what, name=NAME, batch=_BATCH.value, size=_SIZE.value,
            repeats=_REPEATS.value, seed=_SEED.value, device=device))
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        emit(dict(impl=tokenizer_ours.IMPL, what=what,
                  error=f"{type(e).__name__}: {e}"))
    if _PEERS.value:
      try:
        _run_peers(emit, what)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        emit(dict(impl="peers", what=what,
                  error=f"{type(e).__name__}: {e}"))
  for rec in tokenizer_ours.ratio_records(records):
    emit(rec)
  emit(dict(what="done", impl="bench-tokenizer",
            wall_s=time.perf_counter() - t_start,
            loadavg_1m=os.getloadavg()[0]))
  emit.close()


if __name__ == "__main__":
  app.run(main)
