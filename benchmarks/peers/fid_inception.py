"""pytorch-fid's Inception feature extraction, timed; JSON lines.

Run in the peers' virtual environment from the repository root
(benchmarks/fid_inception.py does this as a subprocess):

  .venv-peers/bin/python -m benchmarks.peers.fid_inception --images=64 \
      --batch=32 --size=256 [--repeats=3] [--seed=0]

`pytorch_fid.inception.InceptionV3([3])` in eval mode with random weights
in its file's layout (`inception_layout.random_state_dict`, handed to its
loader in place of the download; the weights do not change the work), on
uint8 images converted as its `ImagePathDataset` + `ToTensor` do (float in
[0, 1], NCHW); the network resizes to 299 itself. One excluded warm-up
batch, then `--repeats` passes over `--images` images (median).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.peers import torchvision_inception  # pylint: disable=g-import-not-at-top,wrong-import-position
from muse_jax.evaluation import inception_layout  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  pf = torchvision_inception.import_pytorch_fid()
  torch.set_grad_enabled(False)
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in
        inception_layout.random_state_dict(args.seed).items()}
  pf.load_state_dict_from_url = lambda *a, **k: sd
  model = pf.InceptionV3([3]).eval()
  rng = np.random.default_rng(args.seed)
  images = rng.integers(0, 256, (args.images, args.size, args.size, 3),
                        dtype=np.uint8)

  def run(n):
    out = []
    for lo in range(0, n, args.batch):
      x = torch.from_numpy(images[lo:lo + args.batch].astype(np.float32)
                           / 255.0).permute(0, 3, 1, 2).contiguous()
      out.append(model(x)[0].squeeze(-1).squeeze(-1).numpy())
    return np.concatenate(out)

  t0 = time.perf_counter()
  run(min(args.batch, args.images))
  warmup = time.perf_counter() - t0
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    run(args.images)
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  print(json.dumps(dict(
      impl="pytorch-fid", what="inception_features", images=args.images,
      batch=args.batch, size=args.size, median_s=median, times_s=times,
      warmup_s=warmup, images_per_s=args.images / median,
      torch_threads=torch.get_num_threads(), torch=torch.__version__)),
        flush=True)


if __name__ == "__main__":
  main()
