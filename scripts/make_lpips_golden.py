"""Regenerates tests/golden/lpips_vgg_golden.npz with the PyTorch `lpips` package.

The golden file pins our JAX LPIPS (`muse_jax.losses.lpips`) to the
reference `lpips.LPIPS(net="vgg", version="0.1")` in eval mode, with the
package's real linear heads (`lpips/weights/v0.1/vgg.pth`) and a VGG16
backbone of random weights (`muse_jax.losses.vgg16.random_state_dict(seed)`:
no package ships VGG16's trained weights, and the JAX test rebuilds the same
random weights from the seed). It stores

  x, y       uint8 [N, 64, 64, 3]  the image pairs (x: smooth random images,
                                   y: x blurred, noised, shifted or recoloured)
  distance   f32 [N]               lpips(x, y) on the images mapped to [-1, 1]
  per_layer  f32 [N, 5]            each stage's term (retPerLayer=True)
  seed       int                   the VGG16 seed
  versions   str [2]               torch and lpips versions

and, for `muse_jax.interop.torch_files`, one small state dict saved by
`torch.save` in both of its formats (tests/golden/torch_state_zip.pth and
torch_state_legacy.pth: float32, a transposed view, an int64 slice, float16
and a Parameter) with its values in tests/golden/torch_state_expected.npz.

The reference needs torch, lpips and scipy (lpips imports it), which must not
enter the project's venv; the benchmarks' peers venv serves:

  .venv-peers/bin/pip install --no-deps lpips==0.1.4 scipy
  .venv-peers/bin/python scripts/make_lpips_golden.py [--out PATH] [--seed N]

lpips builds its VGG with `torchvision.models.vgg16(pretrained=...)`, and
PyPI's torchvision does not load beside torch 2.13.0's CPU build; a stand-in
`torchvision` with a `models.vgg16` of torchvision's exact layer layout is
installed in `sys.modules` before lpips is imported.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from muse_jax.losses import vgg16  # pylint: disable=g-import-not-at-top

N_PAIRS = 8
SIZE = 64


def _install_torchvision_standin():
  import torch  # pylint: disable=g-import-not-at-top

  class _VGG16(torch.nn.Module):
    """torchvision's vgg16().features layout (conv, ReLU, max-pool)."""

    def __init__(self, pretrained=False, **unused):
      del unused
      if pretrained:
        raise RuntimeError("no trained VGG16 weights here")
      super().__init__()
      layers, ch = [], 3
      for s, stage in enumerate(vgg16.STAGES):
        if s:
          layers.append(torch.nn.MaxPool2d(2, 2))
        for out in stage:
          layers += [torch.nn.Conv2d(ch, out, 3, padding=1),
                     torch.nn.ReLU(inplace=True)]
          ch = out
      layers.append(torch.nn.MaxPool2d(2, 2))
      self.features = torch.nn.Sequential(*layers)

  tv = types.ModuleType("torchvision")
  tv.models = types.ModuleType("torchvision.models")
  tv.models.vgg16 = _VGG16
  sys.modules["torchvision"] = tv
  sys.modules["torchvision.models"] = tv.models


def make_pairs(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Smooth random images and distorted copies (uint8, NHWC)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  xs, ys = [], []
  for i in range(N_PAIRS):
    base = ndimage.gaussian_filter(rng.uniform(0, 255, (SIZE, SIZE, 3)),
                                   sigma=(3 + i % 3, 3 + i % 3, 0))
    base = (base - base.min()) / (np.ptp(base) + 1e-6) * 255
    kind = i % 4
    if kind == 0:
      other = ndimage.gaussian_filter(base, sigma=(1.5, 1.5, 0))
    elif kind == 1:
      other = base + rng.normal(0, 20, base.shape)
    elif kind == 2:
      other = np.roll(base, shift=(2, -3), axis=(0, 1))
    else:
      other = base[..., ::-1]
    xs.append(np.clip(base, 0, 255).round().astype(np.uint8))
    ys.append(np.clip(other, 0, 255).round().astype(np.uint8))
  return np.stack(xs), np.stack(ys)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(
      ROOT, "tests", "golden", "lpips_vgg_golden.npz"))
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  _install_torchvision_standin()
  import torch  # pylint: disable=g-import-not-at-top
  import lpips  # pylint: disable=g-import-not-at-top
  torch.set_grad_enabled(False)
  model = lpips.LPIPS(net="vgg", version="0.1", pnet_rand=True,
                      verbose=False)
  sd = {k: torch.from_numpy(v)
        for k, v in vgg16.random_state_dict(args.seed).items()}
  # lpips keeps torchvision's features split into slice1..slice5, with the
  # original `features.<i>` index as each layer's name inside its slice.
  own = model.net.state_dict()
  mapped = {}
  for key in own:
    _, idx, param = key.split(".")
    mapped[key] = sd[f"features.{idx}.{param}"]
  model.net.load_state_dict(mapped, strict=True)
  x, y = make_pairs(args.seed + 1)

  def to_torch(a):
    return torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(
        0, 3, 1, 2).contiguous()

  d, layers = model(to_torch(x), to_torch(y), retPerLayer=True)
  per_layer = torch.stack([l.reshape(-1) for l in layers], 1)
  np.savez_compressed(
      args.out, x=x, y=y, distance=d.reshape(-1).numpy(),
      per_layer=per_layer.numpy(), seed=np.int64(args.seed),
      versions=np.asarray([torch.__version__, "lpips 0.1.4"]))
  print(f"wrote {args.out}: distances {d.reshape(-1).numpy()}")
  golden = os.path.dirname(args.out)
  g = torch.Generator().manual_seed(args.seed)
  state = {"dense.weight": torch.randn(3, 4, generator=g),
           "transposed": torch.randn(5, 6, generator=g).t(),
           "slice": torch.arange(10)[2:7],
           "half": torch.randn(2, generator=g).half(),
           "param": torch.nn.Parameter(torch.randn(2, 2, generator=g))}
  torch.save(state, os.path.join(golden, "torch_state_zip.pth"))
  torch.save(state, os.path.join(golden, "torch_state_legacy.pth"),
             _use_new_zipfile_serialization=False)
  np.savez(os.path.join(golden, "torch_state_expected.npz"),
           **{k: v.detach().numpy() for k, v in state.items()})
  print(f"wrote the torch_state_* files in {golden}")


if __name__ == "__main__":
  main()
