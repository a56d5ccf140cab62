r"""FID Inception feature extraction, ours vs pytorch-fid's network, one run.

  python -m benchmarks.fid_inception --peers_python=.venv-peers/bin/python \
      --out=benchmarks/results/fid_cpu.jsonl

(`make bench-fid` runs this.) Issue 17's speed line: images/s through the
FID network, ours >= 1.0x pytorch-fid's on this CPU.

Both sides take the same work: `--images` random uint8 images of
`--size` px, in batches of `--batch`, resized to 299 (bilinear, as
pytorch-fid) and run to the pool3 features, weights random in the standard
file's layout (`inception_layout.random_state_dict`; the weights do not
change the work). Ours: `fid.Extractor` (the host resize, then the jitted
network) at each `--dtypes` compute dtype (float32 is the reference path;
bfloat16 the speed option). pytorch-fid: `InceptionV3([3])` in eval mode
(benchmarks/peers/fid_inception.py, in the peers' venv). Each side: one
excluded warm-up batch (ours: includes compilation, `compile_s`), then
`--repeats` timed passes (median).

Prints JSON lines (and writes them to --out): `what: meta`, one record per
implementation and dtype, `kind: ratio` lines (ours / pytorch-fid images/s)
and `what: done`.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from benchmarks import timing
from muse_jax.evaluation import fid
from muse_jax.evaluation import inception
from muse_jax.evaluation import inception_layout

IMPL = "muse_jax"
PEER_MODULE = "benchmarks.peers.fid_inception"


def bench_ours(dtype: str, *, images: np.ndarray, batch: int, repeats: int,
               seed: int, device: str) -> dict:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    model = inception.InceptionV3(inception.InceptionConfig(dtype=dtype))
  inception.load_weights(model, inception_layout.random_state_dict(seed))
  extractor = fid.Extractor(model, batch_size=batch)
  t0 = time.perf_counter()
  extractor(images[:batch])
  warmup = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    extractor(images)
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  return dict(impl=IMPL, what="inception_features", dtype=dtype,
              images=len(images), batch=batch, size=images.shape[1],
              median_s=median, times_s=times, compile_s=warmup,
              images_per_s=len(images) / median, device=device)


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
  emit(dict(what="meta", impl="bench-fid", loadavg_1m=load,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            device=device, python=sys.version.split()[0],
            command=" ".join(sys.argv), images=f.images, batch=f.batch,
            size=f.size, jax_version=jax.__version__))
  rng = np.random.default_rng(f.seed)
  images = rng.integers(0, 256, (f.images, f.size, f.size, 3),
                        dtype=np.uint8)
  ours = []
  for dtype in f.dtypes:
    rec = bench_ours(dtype, images=images, batch=f.batch, repeats=f.repeats,
                     seed=f.seed, device=device)
    ours.append(rec)
    emit(rec)
  peer = []
  if f.peers:
    if not os.path.exists(f.peers_python):
      raise FileNotFoundError(
          f"{f.peers_python} not found: create the peers' venv (`make "
          "bench-fid` does) or pass --peers_python")
    peer = timing.run_peer(
        [f.peers_python, "-m", PEER_MODULE, f"--images={f.images}",
         f"--batch={f.batch}", f"--size={f.size}",
         f"--repeats={f.repeats}", f"--seed={f.seed}"], emit, "pytorch-fid")
  for p in [r for r in peer if r.get("what") == "inception_features"]:
    for o in ours:
      emit(dict(kind="ratio", what="inception_features", dtype=o["dtype"],
                ours_images_per_s=o["images_per_s"],
                peer_images_per_s=p["images_per_s"],
                ours_over_peer=o["images_per_s"] / p["images_per_s"],
                device=device))
  emit(dict(what="done", impl="bench-fid",
            wall_s=time.perf_counter() - t_start,
            loadavg_1m=os.getloadavg()[0]))
  emit.close()


if __name__ == "__main__":
  # Flags only when run as the program (tests import this module).
  flags.DEFINE_string("out", "", "also write the JSON lines here")
  flags.DEFINE_integer("images", 64, "images per timed pass")
  flags.DEFINE_integer("batch", 32, "images per network call")
  flags.DEFINE_integer("size", 256, "image side before the resize to 299")
  flags.DEFINE_integer("repeats", 3, "timed passes (median)")
  flags.DEFINE_integer("seed", 0, "images and random weights")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                    "our compute dtypes")
  flags.DEFINE_bool("peers", True, "also time pytorch-fid")
  flags.DEFINE_string("peers_python", ".venv-peers/bin/python",
                      "the peers' venv python")
  app.run(main)
