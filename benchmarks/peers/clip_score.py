"""open_clip's CLIP towers, timed; JSON lines.

Run in the peers' virtual environment from the repository root
(benchmarks/clip_score.py does this as a subprocess):

  .venv-peers/bin/python -m benchmarks.peers.clip_score \
      --model=ViT-L-14-quickgelu --images=16 --batch=8 [--repeats=3]

`open_clip.model.CLIP` of the architecture, in eval mode, with random
weights in OpenAI's layout (`clip_layout.random_state_dict`, loaded
strictly), on the inputs benchmarks/clip_score.py builds (same seed):
`encode_image` on NCHW pixels and `encode_text` on the ids. One excluded
warm-up batch, then `--repeats` passes (median).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from muse_jax.evaluation import clip_layout  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import timing  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.peers import open_clip_models  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="ViT-L-14-quickgelu")
  p.add_argument("--images", type=int, default=16)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  open_clip = open_clip_models.import_open_clip()
  arch = clip_layout.arch(args.model)
  model, _ = open_clip_models.model(open_clip, arch, args.seed)
  pixels, ids = open_clip_models.bench_inputs(arch, args.images, args.seed)
  x_image = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
  x_text = torch.from_numpy(ids)
  for tower, fn, x in (("image", model.encode_image, x_image),
                       ("text", model.encode_text, x_text)):
    def run(n, fn=fn, x=x):
      for lo in range(0, n, args.batch):
        fn(x[lo:lo + args.batch])
    warm = timing.measure(lambda: run(min(args.batch, args.images)), 1,
                          warmup=0)
    t = timing.measure(lambda: run(args.images), args.repeats, warmup=0)
    print(json.dumps(dict(
        impl="open_clip", what=f"clip_{tower}", items=args.images,
        batch=args.batch, median_s=t.median_s, times_s=list(t.times_s),
        warmup_s=warm.median_s, items_per_s=args.images / t.median_s,
        torch_threads=torch.get_num_threads(), torch=torch.__version__,
        open_clip=open_clip.__version__)), flush=True)


if __name__ == "__main__":
  main()
