"""open_clip, imported beside torch's CPU build, and its CLIP at any size.

open_clip imports torchvision's transforms. PyPI's torchvision does not
fully load beside torch 2.13.0's CPU build: its fake-operator
registrations fail ("operator torchvision::nms does not exist").
`import_open_clip` skips that one module (nothing open_clip's CLIP or its
eval transform calls uses the compiled operators) and imports open_clip.
`model(open_clip, arch, seed)` builds `open_clip.model.CLIP` for a
`clip_layout.CLIPArch` and loads seeded random weights strictly.
`bench_inputs` makes the inputs both sides of benchmarks/clip_score.py
time (numpy only, so either venv builds the same ones).
"""

from __future__ import annotations

import sys
import types

import numpy as np

from muse_jax.evaluation import clip_layout


def bench_inputs(arch: clip_layout.CLIPArch, n: int, seed: int):
  """CLIP-normalised-like pixels float32 [n, S, S, 3] and open_clip-style
  ids int64 [n, 77] (start id, random tokens, <|endoftext|> at varied
  positions, zero padding)."""
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal(
      (n, arch.image_size, arch.image_size, 3)).astype(np.float32)
  ids = np.zeros((n, arch.context_length), np.int64)
  for i in range(n):
    end = 8 + (i * 7) % (arch.context_length - 9)
    ids[i, 0] = arch.vocab_size - 2
    ids[i, 1:end] = rng.integers(1, arch.vocab_size - 2, end - 1)
    ids[i, end] = arch.eos_token_id
  return pixels, ids


def import_open_clip():
  sys.modules.setdefault(
      "torchvision._meta_registrations",
      types.ModuleType("torchvision._meta_registrations"))
  import open_clip  # pylint: disable=g-import-not-at-top
  return open_clip


def model(open_clip, arch: clip_layout.CLIPArch, seed: int):
  """(open_clip CLIP in eval mode, its torch state dict)."""
  import torch  # pylint: disable=g-import-not-at-top
  net = open_clip.model.CLIP(
      embed_dim=arch.embed_dim,
      vision_cfg=open_clip.model.CLIPVisionCfg(
          layers=arch.vision_layers, width=arch.vision_width,
          patch_size=arch.patch_size, image_size=arch.image_size,
          head_width=arch.vision_head_width),
      text_cfg=open_clip.model.CLIPTextCfg(
          context_length=arch.context_length, vocab_size=arch.vocab_size,
          width=arch.text_width, heads=arch.text_heads,
          layers=arch.text_layers),
      quick_gelu=arch.quick_gelu)
  sd = {k: torch.from_numpy(v)
        for k, v in clip_layout.random_state_dict(arch, seed).items()}
  net.load_state_dict(sd, strict=True)
  return net.eval(), sd
