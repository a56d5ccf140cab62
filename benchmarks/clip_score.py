r"""CLIP score's networks, ours vs open_clip's, one run.

  python -m benchmarks.clip_score --peers_python=.venv-peers/bin/python \
      --out=benchmarks/results/clip_cpu.jsonl

(`make bench-clip` runs this.) Images/s through the image tower and
captions/s through the text tower of `--model` (default ViT-L-14-quickgelu,
the CLIP score model), weights random in OpenAI's layout
(`clip_layout.random_state_dict`; the weights do not change the work).
Both sides take the same inputs: `--images` preprocessed 224 px images and
as many 77-token captions, in batches of `--batch`; preprocessing (PIL, the
same on both sides) is not timed. Ours: `clip_score.CLIPModel` loaded from
a torch file and jitted, for each `--settings` compute dtype and layer
impl (float32:plain is the reference path; xla_cpu the CPU speed switch). open_clip: `open_clip.model.CLIP` in eval mode
(benchmarks/peers/clip_score.py, in the peers' venv). Each side: one
excluded warm-up batch (ours: includes compilation), then `--repeats`
timed passes (median).

Prints JSON lines (and writes them to --out): `what: meta`, one record per
implementation, tower and setting, `kind: ratio` lines (ours / open_clip)
and `what: done`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import timing
from benchmarks.peers import open_clip_models
from muse_jax.evaluation import clip_layout
from muse_jax.evaluation import clip_score
from muse_jax.interop import torch_files

IMPL = "muse_jax"
PEER_MODULE = "benchmarks.peers.clip_score"


def _time(fn, x: np.ndarray, batch: int, repeats: int) -> timing.Timing:
  """One excluded warm-up batch (compilation: `first_call_s`), then
  `repeats` passes over all of `x`."""
  def run(n):
    for lo in range(0, n, batch):
      jax.block_until_ready(fn(x[lo:lo + batch]))
  warm = timing.measure(lambda: run(min(batch, len(x))), 1, warmup=0)
  t = timing.measure(lambda: run(len(x)), repeats, warmup=0)
  return dataclasses.replace(t, first_call_s=warm.median_s)


def bench_ours(weights: str, arch, dtype: str, impl: str, *, pixels, ids,
               batch: int, repeats: int, device: str) -> list[dict]:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: clip_score.CLIPModel(
        arch, rngs=nnx.Rngs(0), dtype=dtype, impl=impl))
  clip_score.load_weights(model, weights)
  graphdef, state = nnx.split(model)
  image = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
  text = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_text(x))
  out = []
  for tower, fn, x in (("image", image, pixels), ("text", text, ids)):
    t = _time(lambda b, fn=fn: fn(state, b), x, batch, repeats)
    out.append(dict(impl=IMPL, what=f"clip_{tower}", dtype=dtype,
                    layer_impl=impl, items=len(x), batch=batch,
                    median_s=t.median_s, times_s=list(t.times_s),
                    compile_s=t.first_call_s,
                    items_per_s=len(x) / t.median_s, device=device))
  return out


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  t_start = time.perf_counter()
  emit = timing.Recorder(f.out)
  device = f"cpu: {timing.cpu_name()}"
  load = os.getloadavg()[0]
  if load > 0.5:
    timing.log(f"warning: 1-minute load average is {load:.2f}; other work "
               "on this machine skews the timings")
  emit(dict(what="meta", impl="bench-clip", loadavg_1m=load,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            device=device, python=sys.version.split()[0],
            command=" ".join(sys.argv), model=f.model, images=f.images,
            batch=f.batch, jax_version=jax.__version__))
  arch = clip_layout.arch(f.model)
  pixels, ids = open_clip_models.bench_inputs(arch, f.images, f.seed)
  ids = ids.astype(np.int32)
  ours = []
  with tempfile.TemporaryDirectory() as tmp:
    weights = os.path.join(tmp, "open_clip_pytorch_model.bin")
    torch_files.save(clip_layout.random_state_dict(arch, f.seed), weights)
    for setting in f.settings:
      dtype, impl = setting.split(":")
      for rec in bench_ours(weights, arch, dtype, impl, pixels=pixels,
                            ids=ids, batch=f.batch, repeats=f.repeats,
                            device=device):
        ours.append(rec)
        emit(rec)
  peer = []
  if f.peers:
    if not os.path.exists(f.peers_python):
      raise FileNotFoundError(
          f"{f.peers_python} not found: create the peers' venv (`make "
          "bench-clip` does) or pass --peers_python")
    peer = timing.run_peer(
        [f.peers_python, "-m", PEER_MODULE, f"--model={f.model}",
         f"--images={f.images}", f"--batch={f.batch}",
         f"--repeats={f.repeats}", f"--seed={f.seed}"], emit, "open_clip")
  for p in [r for r in peer if r.get("what", "").startswith("clip_")]:
    for o in [o for o in ours if o["what"] == p["what"]]:
      emit(dict(kind="ratio", what=o["what"], dtype=o["dtype"],
                layer_impl=o["layer_impl"],
                ours_items_per_s=o["items_per_s"],
                peer_items_per_s=p["items_per_s"],
                ours_over_peer=o["items_per_s"] / p["items_per_s"],
                device=device))
  emit(dict(what="done", impl="bench-clip",
            wall_s=time.perf_counter() - t_start,
            loadavg_1m=os.getloadavg()[0]))
  emit.close()


if __name__ == "__main__":
  # Flags only when run as the program (tests import this module).
  flags.DEFINE_string("out", "", "also write the JSON lines here")
  flags.DEFINE_string("model", "ViT-L-14-quickgelu", "CLIP architecture")
  flags.DEFINE_integer("images", 16, "images (and captions) per pass")
  flags.DEFINE_integer("batch", 8, "items per network call")
  flags.DEFINE_integer("repeats", 3, "timed passes (median)")
  flags.DEFINE_integer("seed", 0, "inputs and random weights")
  flags.DEFINE_list("settings", ["float32:plain", "float32:xla_cpu",
                                 "bfloat16:xla_cpu"],
                    "our compute dtype:layer impl pairs")
  flags.DEFINE_bool("peers", True, "also time open_clip")
  flags.DEFINE_string("peers_python", ".venv-peers/bin/python",
                      "the peers' venv python")
  app.run(main)
