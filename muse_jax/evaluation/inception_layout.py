"""The FID Inception network's layer layout, shared by the model and its tests.

FID is comparable across papers only when computed with one network: the
TensorFlow Inception graph of 2015-12-05, which pytorch-fid ports as
`pt_inception-2015-12-05-6726825d.pth` (torchvision's InceptionV3 module
names, 1008 classes, and four patched blocks: average pools that ignore
padding, and a max pool in the last block). This module lists that file's
convolutions -- names, channels, kernels, strides, paddings -- in
network order, and makes seeded random state dicts in its layout.

Pure numpy (no JAX, no torch), so the PyTorch reference script and the JAX
tests build the same random weights.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
               "fid_weights/" + WEIGHTS_FILE)
BN_EPS = 1e-3  # torchvision's BasicConv2d.
NUM_CLASSES = 1008  # The TF graph's classifier (unused for FID).
FEATURES = 2048  # pool3.


class Conv(NamedTuple):
  """One BasicConv2d (conv without bias, batch norm, ReLU)."""

  name: str  # State dict prefix, e.g. "Mixed_5b.branch5x5_2".
  cin: int
  cout: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)


# (name, kind, input channels, block argument): the network after the stem.
# Kinds: A (pool_features), B, C (channels_7x7), D, E1 (average pool),
# E2 (max pool: the FID graph's quirk).
BLOCKS: tuple[tuple[str, str, int, int], ...] = (
    ("Mixed_5b", "A", 192, 32), ("Mixed_5c", "A", 256, 64),
    ("Mixed_5d", "A", 288, 64), ("Mixed_6a", "B", 288, 0),
    ("Mixed_6b", "C", 768, 128), ("Mixed_6c", "C", 768, 160),
    ("Mixed_6d", "C", 768, 160), ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, 0), ("Mixed_7b", "E1", 1280, 0),
    ("Mixed_7c", "E2", 2048, 0),
)

STEM: tuple[Conv, ...] = (
    Conv("Conv2d_1a_3x3", 3, 32, (3, 3), 2),
    Conv("Conv2d_2a_3x3", 32, 32, (3, 3)),
    Conv("Conv2d_2b_3x3", 32, 64, (3, 3), 1, (1, 1)),
    # max pool 3x3 / 2
    Conv("Conv2d_3b_1x1", 64, 80, (1, 1)),
    Conv("Conv2d_4a_3x3", 80, 192, (3, 3)),
    # max pool 3x3 / 2
)


def block_convs(kind: str, cin: int, arg: int) -> tuple[Conv, ...]:
  """The convolutions of one mixed block (names relative to the block)."""
  if kind == "A":
    return (Conv("branch1x1", cin, 64, (1, 1)),
            Conv("branch5x5_1", cin, 48, (1, 1)),
            Conv("branch5x5_2", 48, 64, (5, 5), 1, (2, 2)),
            Conv("branch3x3dbl_1", cin, 64, (1, 1)),
            Conv("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
            Conv("branch3x3dbl_3", 96, 96, (3, 3), 1, (1, 1)),
            Conv("branch_pool", cin, arg, (1, 1)))
  if kind == "B":
    return (Conv("branch3x3", cin, 384, (3, 3), 2),
            Conv("branch3x3dbl_1", cin, 64, (1, 1)),
            Conv("branch3x3dbl_2", 64, 96, (3, 3), 1, (1, 1)),
            Conv("branch3x3dbl_3", 96, 96, (3, 3), 2))
  if kind == "C":
    c7 = arg
    return (Conv("branch1x1", cin, 192, (1, 1)),
            Conv("branch7x7_1", cin, c7, (1, 1)),
            Conv("branch7x7_2", c7, c7, (1, 7), 1, (0, 3)),
            Conv("branch7x7_3", c7, 192, (7, 1), 1, (3, 0)),
            Conv("branch7x7dbl_1", cin, c7, (1, 1)),
            Conv("branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)),
            Conv("branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
            Conv("branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)),
            Conv("branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3)),
            Conv("branch_pool", cin, 192, (1, 1)))
  if kind == "D":
    return (Conv("branch3x3_1", cin, 192, (1, 1)),
            Conv("branch3x3_2", 192, 320, (3, 3), 2),
            Conv("branch7x7x3_1", cin, 192, (1, 1)),
            Conv("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
            Conv("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)),
            Conv("branch7x7x3_4", 192, 192, (3, 3), 2))
  if kind in ("E1", "E2"):
    return (Conv("branch1x1", cin, 320, (1, 1)),
            Conv("branch3x3_1", cin, 384, (1, 1)),
            Conv("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)),
            Conv("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0)),
            Conv("branch3x3dbl_1", cin, 448, (1, 1)),
            Conv("branch3x3dbl_2", 448, 384, (3, 3), 1, (1, 1)),
            Conv("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)),
            Conv("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0)),
            Conv("branch_pool", cin, 192, (1, 1)))
  raise ValueError(f"unknown Inception block kind {kind!r}")


def all_convs() -> list[Conv]:
  """Every convolution of the network, full names, in network order."""
  out = list(STEM)
  for name, kind, cin, arg in BLOCKS:
    out += [c._replace(name=f"{name}.{c.name}")
            for c in block_convs(kind, cin, arg)]
  return out


def random_state_dict(seed: int) -> dict[str, np.ndarray]:
  """A state dict in pytorch-fid's file layout with random weights.

  He-initialised kernels and batch-norm statistics near the identity, so
  activations stay O(1) through the network. Deterministic in `seed`
  across machines (numpy PCG64 float64 normals, rounded to float32).
  """
  rng = np.random.default_rng(seed)
  sd: dict[str, np.ndarray] = {}

  def f32(x):
    return np.asarray(x, np.float32)

  for c in all_convs():
    kh, kw = c.kernel
    fan_in = c.cin * kh * kw
    sd[f"{c.name}.conv.weight"] = f32(
        rng.standard_normal((c.cout, c.cin, kh, kw)) * np.sqrt(2.0 / fan_in))
    sd[f"{c.name}.bn.weight"] = f32(1 + 0.1 * rng.standard_normal(c.cout))
    sd[f"{c.name}.bn.bias"] = f32(0.1 * rng.standard_normal(c.cout))
    sd[f"{c.name}.bn.running_mean"] = f32(0.1 * rng.standard_normal(c.cout))
    sd[f"{c.name}.bn.running_var"] = f32(rng.uniform(0.5, 1.5, c.cout))
    sd[f"{c.name}.bn.num_batches_tracked"] = np.asarray(0, np.int64)
  sd["fc.weight"] = f32(0.01 * rng.standard_normal((NUM_CLASSES, FEATURES)))
  sd["fc.bias"] = f32(np.zeros(NUM_CLASSES))
  return sd
