"""Regenerates tests/golden/diffusers_vq_amused.npz with diffusers' VQModel.

The golden file pins our import of diffusers VQ tokenizers
(`muse_jax.interop.diffusers_vq`, `muse_jax.import_tokenizer`) to
diffusers' own `VQModel` in the aMUSEd layout
(`diffusers_vq_layout.AMUSED_CONFIG`: block_out_channels
[128, 256, 256, 512, 768], 64 latent channels, 8192 codes, f = 16) with
random weights (`diffusers_vq_layout.random_state_dict(seed=SEED)`, which
the JAX test rebuilds from the seed). On N_IMAGES 64x64 photo crops it
stores

  images     uint8 [N, 64, 64, 3]   the inputs (mapped to [-1, 1])
  latents    f32 [N, 4, 4, 64]      `encode(x).latents` (after quant_conv),
                                    NHWC
  indices    int32 [N, 4, 4]        the nearest codes (`quantize`)
  decoded    f32 [N, 64, 64, 3]     `decode(indices, force_not_quantize=True)`
                                    (codebook lookup, post_quant_conv,
                                    decoder; raw, not clipped), NHWC
  margin     f32 [N, 4, 4]          squared distance to the second-nearest
                                    code minus the nearest's (float64)
  seed       int                    the weights' seed
  config     str                    the diffusers config (JSON)
  versions   str [2]                torch and diffusers versions

The photos are scikit-image's sample images (from the project venv's
skimage/data; PIL reads them here): each of N_IMAGES / 2 photos gives its
centre square and the centre half of that, both resized to 64x64.

diffusers and torch must not enter the project's venv; the benchmarks'
peers venv has them:

  .venv-peers/bin/python scripts/make_diffusers_vq_golden.py [--out PATH]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from muse_jax.interop import diffusers_vq_layout as layout  # pylint: disable=g-import-not-at-top

SEED = 0
SIZE = 64
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
          "motorcycle_left.png", "hubble_deep_field.jpg", "camera.png",
          "brick.png")
N_IMAGES = 2 * len(PHOTOS)
# Nearest-code margins below this (squared distance) could let float32
# rounding pick a different code (the latents agree to ~1e-6, moving
# distances by ~1e-5); the script refuses such a golden.
MIN_MARGIN = 1e-4


def _skimage_data() -> str:
  found = sorted(glob.glob(os.path.join(
      ROOT, ".venv", "lib", "python*", "site-packages", "skimage", "data")))
  if not found:
    raise FileNotFoundError("scikit-image's sample photos not found under "
                            ".venv; pass --skimage_data")
  return found[0]


def photos(data_dir: str) -> np.ndarray:
  """uint8 [N_IMAGES, SIZE, SIZE, 3]: two views of each photo."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = []
  for name in PHOTOS:
    img = Image.open(os.path.join(data_dir, name)).convert("RGB")
    w, h = img.size
    s = min(w, h)
    square = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2,
                       (h + s) // 2))
    half = square.crop((s // 4, s // 4, s // 4 + s // 2, s // 4 + s // 2))
    for view in (square, half):
      out.append(np.asarray(view.resize((SIZE, SIZE), Image.BICUBIC)))
  return np.stack(out).astype(np.uint8)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(
      ROOT, "tests", "golden", "diffusers_vq_amused.npz"))
  parser.add_argument("--skimage_data", default=None)
  args = parser.parse_args()

  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  config = dict(layout.AMUSED_CONFIG)
  model = diffusers.VQModel(**{k: v for k, v in config.items()
                               if not k.startswith("_")})
  state = {k: torch.from_numpy(v) for k, v in
           layout.random_state_dict(config, seed=SEED).items()}
  model.load_state_dict(state, strict=True)
  model.eval()

  images = photos(args.skimage_data or _skimage_data())
  x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)
  x = x.permute(0, 3, 1, 2).contiguous()
  with torch.no_grad():
    latents = model.encode(x).latents
    _, _, (_, _, ids) = model.quantize(latents)
    b, c, h, w = latents.shape
    ids = ids.reshape(b, h, w)
    decoded = model.decode(ids.reshape(-1), force_not_quantize=True,
                           shape=(b, h, w, c)).sample

  z = latents.permute(0, 2, 3, 1).numpy().astype(np.float64)
  codes = model.quantize.embedding.weight.detach().numpy().astype(np.float64)
  d = (np.sum(z**2, -1, keepdims=True) - 2 * z @ codes.T
       + np.sum(codes**2, -1))
  nearest = np.sort(np.partition(d, 1, axis=-1)[..., :2], axis=-1)
  margin = nearest[..., 1] - nearest[..., 0]
  if not np.array_equal(np.argmin(d, -1), ids.numpy()):
    raise RuntimeError("diffusers' indices differ from the float64 nearest "
                       "codes: a near tie; choose another SEED")
  if margin.min() < MIN_MARGIN:
    raise RuntimeError(f"nearest-code margin {margin.min():.2e} < "
                       f"{MIN_MARGIN}: choose another SEED")
  np.savez_compressed(
      args.out, images=images,
      latents=z.astype(np.float32),
      indices=ids.numpy().astype(np.int32),
      decoded=decoded.permute(0, 2, 3, 1).numpy().astype(np.float32),
      margin=margin.astype(np.float32), seed=np.int64(SEED),
      config=np.array(json.dumps(config, sort_keys=True)),
      versions=np.array([torch.__version__, diffusers.__version__]))
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB): "
        f"{len(images)} images, {len(np.unique(ids.numpy()))} distinct codes "
        f"of {ids.numel()} tokens, min margin {margin.min():.3g}, latents std "
        f"{z.std():.3f}, decoded std {decoded.std().item():.3f}")


if __name__ == "__main__":
  main()
