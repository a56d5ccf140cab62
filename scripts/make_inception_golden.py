"""Regenerates tests/golden/inception_fid_golden.npz with pytorch-fid.

Pins our FID (`muse_jax.evaluation.inception`, `.fid`) to the reference
`pytorch_fid` package: its `InceptionV3([3])` (resize to 299 bilinear,
[0, 1] -> [-1, 1], the FID Inception blocks, pool3) with random weights
in the layout of `pt_inception-2015-12-05-6726825d.pth`
(`inception_layout.random_state_dict(seed)`: no package ships the trained
file, and the JAX tests rebuild the same weights from the seed), handed to
pytorch-fid's own loader in place of its download. It stores

  small, large  uint8 [16, 64, 64, 3], [2, 331, 347, 3]  images (upsampled
                and downsampled to 299)
  small_features, large_features  f32 [N, 2048]  pytorch-fid's pool3
  mu1, sigma1, mu2, sigma2  f64  two 64-d Gaussians' statistics
  fid        f64  pytorch_fid.fid_score.calculate_frechet_distance of them
  fid_small_large  f64  the same on the features' statistics (2048-d,
             singular covariances from few images)
  seed, versions

It also checks that `torch.load(weights_only=True)` reads the state dict
written by `muse_jax.interop.torch_files.save` exactly.

Run in the peers venv (torch CPU build) with pytorch-fid, scipy and
torchvision:

  .venv-peers/bin/pip install --no-deps pytorch-fid==0.3.0 scipy \
      torchvision==0.28.0
  .venv-peers/bin/python scripts/make_inception_golden.py [--out PATH]

pytorch-fid builds its network from torchvision's Inception blocks; when
torchvision does not import beside torch's CPU build, the installed
package's `models/inception.py` runs alone
(benchmarks/peers/torchvision_inception.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from muse_jax.evaluation import inception_layout  # pylint: disable=g-import-not-at-top,wrong-import-position
from muse_jax.interop import torch_files  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks.peers import torchvision_inception  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_images(seed: int, n: int, h: int, w: int) -> np.ndarray:
  """Smooth random images (blurred noise, stretched to 0..255)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    base = ndimage.gaussian_filter(rng.uniform(0, 255, (h, w, 3)),
                                   sigma=(2 + i % 4, 2 + i % 4, 0))
    base = (base - base.min()) / (np.ptp(base) + 1e-6) * 255
    out.append(np.clip(base, 0, 255).round().astype(np.uint8))
  return np.stack(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(
      ROOT, "tests", "golden", "inception_fid_golden.npz"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  pf = torchvision_inception.import_pytorch_fid()
  import pytorch_fid  # pylint: disable=g-import-not-at-top
  from pytorch_fid import fid_score  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)

  sd_np = inception_layout.random_state_dict(args.seed)
  sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd_np.items()}
  # pytorch-fid's loader, fed our weights instead of its download.
  pf.load_state_dict_from_url = lambda *a, **k: sd
  model = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

  def features(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(
        0, 3, 1, 2).contiguous()
    return model(x)[0].squeeze(-1).squeeze(-1).numpy()

  small = make_images(args.seed + 1, 16, 64, 64)
  large = make_images(args.seed + 2, 2, 331, 347)
  small_f, large_f = features(small), features(large)

  rng = np.random.default_rng(args.seed + 3)
  a = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64))
  b = rng.standard_normal((500, 64)) @ rng.standard_normal((64, 64)) + 0.3
  mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, sigma2 = b.mean(0), np.cov(b, rowvar=False)
  fid = fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)
  fs = small_f.astype(np.float64)
  fl = np.concatenate([large_f, small_f[:6]]).astype(np.float64)
  fid_sl = fid_score.calculate_frechet_distance(
      fs.mean(0), np.cov(fs, rowvar=False), fl.mean(0),
      np.cov(fl, rowvar=False))

  # Our torch-file writer, read back by torch itself.
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, inception_layout.WEIGHTS_FILE)
    torch_files.save(sd_np, path)
    back = torch.load(path, weights_only=True)
    assert list(back) == list(sd_np), "key order"
    for k, v in sd_np.items():
      assert np.array_equal(back[k].numpy(), v), k
  print("torch.load reads torch_files.save's file exactly")

  np.savez_compressed(
      args.out, small=small, large=large, small_features=small_f,
      large_features=large_f, mu1=mu1, sigma1=sigma1, mu2=mu2,
      sigma2=sigma2, fid=np.float64(fid), fid_small_large=np.float64(fid_sl),
      seed=np.int64(args.seed),
      versions=np.asarray([torch.__version__,
                           f"pytorch-fid {pytorch_fid.__version__}"]))
  print(f"wrote {args.out}: fid {fid:.6f}, small/large {fid_sl:.4f}, "
        f"features mean {small_f.mean():.4f}")


if __name__ == "__main__":
  main()
