"""torchvision's VGG16 `features` layout, shared by LPIPS and its tests.

Pure numpy (no JAX, no torch), so the PyTorch reference script imports the
same layout and the same random state dicts as the JAX tests.
"""

from __future__ import annotations

import numpy as np

# Output channels of each 3x3 conv, per stage; a 2x2 max-pool starts every
# stage after the first. The stage outputs are relu1_2 ... relu5_3.
STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
          (512, 512, 512))
# torchvision's `features.<i>` index of each conv, in order.
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)


def conv_shapes() -> list[tuple[int, int]]:
  """(in, out) channels of each conv, in order."""
  shapes, ch = [], 3
  for stage in STAGES:
    for out in stage:
      shapes.append((ch, out))
      ch = out
  return shapes


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """A He-initialised VGG16 `features` state dict (torch OIHW layout).

  Deterministic in `seed` across machines: float64 normals from numpy's
  PCG64, rounded to float32.
  """
  rng = np.random.default_rng(seed)
  sd = {}
  for idx, (cin, cout) in zip(CONV_INDICES, conv_shapes(), strict=True):
    w = rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2.0 / (9 * cin))
    sd[f"features.{idx}.weight"] = w.astype(np.float32)
    sd[f"features.{idx}.bias"] = (0.01 * rng.standard_normal(cout)).astype(
        np.float32)
  return sd
