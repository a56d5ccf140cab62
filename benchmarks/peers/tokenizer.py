"""diffusers' `VQModel` encode and decode throughput, at our tokenizer's
config and weights; prints one JSON object per line.

Run in the peers' virtual environment from the repository root
(benchmarks/tokenizer.py does this as a subprocess):

  .venv-peers/bin/python -m benchmarks.peers.tokenizer [--batch=8] \
      [--size=256] [--repeats=3] [--threads=N] [--config_json='{...}']

The model is diffusers' `VQModel` built from the config (default: aMUSEd's,
`diffusers_vq_layout.AMUSED_CONFIG`) with the seeded random weights of
`diffusers_vq_layout.random_state_dict` (the ones ours imports), float32,
eval mode, under `torch.inference_mode()`, NCHW as diffusers runs it:

- encode: `quantize(encode(x).latents)`'s indices, as aMUSEd's pipelines
  tokenize images;
- decode: `decode(indices, force_not_quantize=True, shape=...)`, as
  `AmusedPipeline` decodes (codebook lookup, post_quant_conv, decoder).

torch uses --threads intra-op threads (default: every core, as XLA does).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from benchmarks import timing
from muse_jax.interop import diffusers_vq_layout as layout

IMPL = "diffusers-vqmodel"
WHATS = ("encode", "decode")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config_json", default=json.dumps(layout.AMUSED_CONFIG))
  p.add_argument("--name", default="amused-f16")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--size", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--whats", default=",".join(WHATS))
  return p.parse_args(argv)


def make_model(config: dict, seed: int):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  diffusers.utils.logging.set_verbosity_error()
  model = diffusers.VQModel(**{k: v for k, v in config.items()
                               if not k.startswith("_")})
  state = {k: torch.from_numpy(v) for k, v in
           layout.random_state_dict(config, seed=seed).items()}
  model.load_state_dict(state, strict=True)
  return model.eval()


def run(args: argparse.Namespace) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks.peers import measure  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  config = json.loads(args.config_json)
  model = make_model(config, args.seed)
  f = 2 ** (len(config["block_out_channels"]) - 1)
  g = args.size // f
  rng = np.random.default_rng(args.seed)
  x = torch.from_numpy(rng.uniform(
      -1.0, 1.0, (args.batch, 3, args.size, args.size)).astype(np.float32))
  ids = torch.from_numpy(rng.integers(
      0, config["num_vq_embeddings"], (args.batch * g * g,)))
  shape = (args.batch, g, g, config["latent_channels"])

  def encode():
    return model.quantize(model.encode(x).latents)[2][2]

  def decode():
    return model.decode(ids, force_not_quantize=True, shape=shape).sample

  fns = dict(encode=encode, decode=decode)
  for what in [w for w in args.whats.split(",") if w]:
    with torch.inference_mode():
      t = timing.measure(fns[what], repeats=args.repeats)
    timing.emit(dict(
        impl=IMPL, what=what, config=args.name, batch=args.batch,
        image_size=args.size, dtype="float32", **t.fields(),
        images_per_s=args.batch / t.median_s, threads=args.threads,
        torch_version=torch.__version__, device=measure.device_name(),
        tokens_per_image=g * g, loadavg_1m=os.getloadavg()[0]))


def main() -> None:
  run(parse_args())


if __name__ == "__main__":
  main()
