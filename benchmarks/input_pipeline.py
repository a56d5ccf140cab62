r"""Input pipeline from img2dataset tar shards, and pre-tokenisation, on CPU.

  python -m benchmarks.input_pipeline --out=benchmarks/results/input_cpu.jsonl

(`make bench-input` runs this.) Issue 16's benchmark line:

- Shards: `--shards` img2dataset-style tar shards of `--per_shard` JPEGs
  (quality 90) cut from scikit-image's photographs (`data.photos`, train
  split) at random sizes from 256 to 512 px on the long side with random
  aspect ratios 3:4 to 4:3 (web images are rarely square), each with a
  `.txt` and a `.json` caption, written once to a temporary folder.
- Streaming (`data.captioned.stream`: decode, EXIF, RGB, shorter side to
  `--size` (256), centre crop, batch): one epoch per worker count in
  `--workers` (0 = in this process; n = grain worker processes,
  `mp_prefetch`); images/s over the epoch after its first batch (worker
  start-up and the first decodes are `first_batch_s`), and the steps/s
  that rate feeds at the demo config's batches (tokenizer 8, transformer
  16).
- Pre-tokenisation (`data.captioned.convert` with the pipeline's
  transform: decode, crop, VQ-encode): the shapes demo's base tokenizer
  architecture (f = 8, random weights; the rate is the decode + crop +
  encode cost, not a quality) at `--size`, batches of `--encode_batch`,
  images/s over the shards after a warm-up shard (compilation).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from benchmarks import timing

_OUT = flags.DEFINE_string("out", None, "JSON-lines output file.")
_SHARDS = flags.DEFINE_integer("shards", 8, "Tar shards.")
_PER_SHARD = flags.DEFINE_integer("per_shard", 64, "Images per shard.")
_SIZE = flags.DEFINE_integer("size", 256, "Square side out.")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"],
                             "grain worker processes to time.")
_ENCODE_BATCH = flags.DEFINE_integer("encode_batch", 32,
                                     "Images per VQ-encode call.")
DEMO_BATCHES = {"tokenizer": 8, "transformer": 16}


def write_shards(root: str, shards: int, per_shard: int, seed: int = 0
                 ) -> int:
  """img2dataset-layout tar shards of photograph crops; returns bytes."""
  import tarfile  # pylint: disable=g-import-not-at-top
  from muse_jax.data import photos  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  images = photos.load_split("train")
  total = 0
  for s in range(shards):
    with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
      for i in range(per_shard):
        src = images[rng.integers(len(images))]
        long = int(rng.integers(256, 513))
        aspect = float(rng.uniform(0.75, 4 / 3))
        h, w = (long, int(long * aspect)) if aspect < 1 else (
            int(long / aspect), long)
        h, w = min(h, src.shape[0]), min(w, src.shape[1])
        top = int(rng.integers(src.shape[0] - h + 1))
        left = int(rng.integers(src.shape[1] - w + 1))
        buf = io.BytesIO()
        Image.fromarray(src[top:top + h, left:left + w]).save(
            buf, "JPEG", quality=90)
        key = f"{s:05d}{i:04d}"
        caption = f"a photograph, crop {key}"
        for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()),
                          ("json", json.dumps({"caption": caption,
                                               "key": key}).encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
          total += len(data)
  return total


def main(argv):
  del argv
  # pylint: disable=g-import-not-at-top
  from muse_jax.data.captioned import convert
  from muse_jax.data.captioned import dataset
  from muse_jax.data.captioned import preprocess
  from muse_jax.data.captioned import stream
  # pylint: enable=g-import-not-at-top
  record = timing.Recorder(_OUT.value)
  base = dict(cpu=timing.cpu_name(), commit=timing.git_commit(),
              size=_SIZE.value, shards=_SHARDS.value,
              per_shard=_PER_SHARD.value)
  with tempfile.TemporaryDirectory() as root:
    raw = os.path.join(root, "raw")
    os.makedirs(raw)
    nbytes = write_shards(raw, _SHARDS.value, _PER_SHARD.value)
    timing.log(f"wrote {_SHARDS.value} shards, {nbytes / 2**20:.1f} MiB")
    shards = dataset.list_shards(dataset.SourceConfig(format="webdataset",
                                                      path=raw))
    cfg = preprocess.PreprocessConfig(image_size=_SIZE.value)
    for workers in map(int, _WORKERS.value):
      ds = stream.stream(shards, cfg, batch_size=8, seed=0, num_epochs=1,
                         num_workers=workers)
      t0 = time.perf_counter()
      it = iter(ds)
      next(it)
      first = time.perf_counter() - t0
      n, t1 = 8, time.perf_counter()
      for batch in it:
        n += len(batch["key"])
      dt = time.perf_counter() - t1
      rate = (n - 8) / dt
      record(dict(base, impl="ours", what="stream", workers=workers,
                  images=n, first_batch_s=first, epoch_s=first + dt,
                  images_per_s=rate,
                  feeds_steps_per_s={k: rate / b
                                     for k, b in DEMO_BATCHES.items()}))
    transform = _vq_transform(_SIZE.value)
    convert.convert(shards[:1], os.path.join(root, "warm"), "train",
                    transform, batch_size=_ENCODE_BATCH.value)
    t0 = time.perf_counter()
    counts = convert.convert(shards, os.path.join(root, "tok"), "train",
                             transform, batch_size=_ENCODE_BATCH.value)
    dt = time.perf_counter() - t0
    record(dict(base, impl="ours", what="pretokenize",
                tokenizer="shapes demo base tokenizer (f=8), random init",
                encode_batch=_ENCODE_BATCH.value, images=counts["records"],
                wall_s=dt, images_per_s=counts["records"] / dt,
                max_rss_bytes=timing.max_rss_bytes()))
  record.close()


def _vq_transform(size: int):
  """decode + crop (+ nothing else) -> the demo tokenizer's ids, jitted."""
  # pylint: disable=g-import-not-at-top
  from flax import nnx
  import jax
  from configs import shapes_demo
  from muse_jax.data.captioned import preprocess
  from muse_jax.models import vqgan
  from muse_jax.stages import artifacts
  # pylint: enable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    vq = vqgan.VQModel(artifacts.vq_config(shapes_demo.get_config()),
                       rngs=nnx.Rngs(0))
  encode = nnx.jit(lambda m, x: m.encode_to_indices(x))
  cfg = preprocess.PreprocessConfig(image_size=size)

  def transform(batch):
    squares = [preprocess.preprocess(ex, cfg) for ex in batch]
    x = np.stack([s["image"] for s in squares])
    pad = _ENCODE_BATCH.value - len(x)
    if pad:
      x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
    ids = np.asarray(jax.block_until_ready(
        encode(vq, vqgan.to_unit_range(x))))
    return [{"key": s["key"], "caption": s["caption"],
             "tokens": ids[j].reshape(-1).astype(np.int32)}
            for j, s in enumerate(squares)]

  return transform


if __name__ == "__main__":
  app.run(main)
