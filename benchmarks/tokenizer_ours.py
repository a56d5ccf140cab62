"""Our VQ tokenizer's encode and decode throughput (muse_jax, JAX).

The model is a diffusers `VQModel` config (default: aMUSEd's, f = 16) with
the seeded random weights of `diffusers_vq_layout.random_state_dict`,
imported as `muse_jax.import_tokenizer` does (`diffusers_vq.convert`,
`vq_checkpoint.to_model`), so the peers' side
(benchmarks/peers/tokenizer.py) runs the very same network and weights.

- encode: float32 images [B, S, S, 3] in [-1, 1] -> int32 tokens
  (`VQModel.encode_to_indices`: encoder, quant_conv, nearest code);
- decode: tokens -> float32 images (`decode_from_indices(clip=False)`:
  codebook lookup, post_quant_conv, decoder; raw, as diffusers returns).

Each is one jitted program, compiled ahead of time (`compile_s`), its
parameters passed as arguments; timing as every benchmark here
(`benchmarks.timing`: warm-up excluded, median of repeats). `flops` is
XLA's cost analysis of the compiled program.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import flops as flops_lib
from benchmarks import timing
from muse_jax.interop import diffusers_vq
from muse_jax.interop import diffusers_vq_layout as layout
from muse_jax.interop import vq_checkpoint

IMPL = "muse_jax"
WHATS = ("encode", "decode")
METRIC = "images_per_s"


def images(batch: int, size: int, seed: int = 0) -> np.ndarray:
  """Float32 NHWC benchmark images in [-1, 1] (content does not change the
  work)."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype(np.float32)


def make_model(config: dict[str, Any], seed: int):
  """(VQConfig, VQModel) of a diffusers config with the seeded weights."""
  normalized = layout.normalize_config(config)
  cfg = diffusers_vq.vq_config(normalized)
  flat = diffusers_vq.convert(normalized,
                              layout.random_state_dict(config, seed=seed))
  return cfg, vq_checkpoint.to_model(cfg, flat)


def bench_one(cfg, model, what: str, *, name: str, batch: int, size: int,
              repeats: int, seed: int = 0, device: str = "") -> dict[str, Any]:
  """images/s of our `what` ("encode" or "decode") for `model`."""
  if what not in WHATS:
    raise ValueError(f"unknown tokenizer benchmark {what!r}; expected one "
                     f"of {WHATS}")
  graphdef, state = nnx.split(model)
  g = size // cfg.downsample_factor
  if what == "encode":
    arg = jnp.asarray(images(batch, size, seed))
    fn = lambda state, x: nnx.merge(graphdef, state).encode_to_indices(x)
  else:
    arg = jnp.asarray(np.random.default_rng(seed).integers(
        0, cfg.codebook_size, (batch, g, g), dtype=np.int32))
    fn = lambda state, ids: nnx.merge(graphdef, state).decode_from_indices(
        ids, clip=False)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(state, arg).compile()
  compile_s = time.perf_counter() - t0
  t = timing.measure(lambda: jax.block_until_ready(compiled(state, arg)),
                     repeats=repeats)
  flops = flops_lib.xla_flops(compiled)
  return dict(
      impl=IMPL, what=what, config=name, batch=batch, image_size=size,
      dtype="float32", **t.fields(), images_per_s=batch / t.median_s,
      compile_s=compile_s, flops=flops, flops_per_s=flops / t.median_s,
      params=vq_checkpoint.num_params(model), tokens_per_image=g * g,
      device=device, loadavg_1m=os.getloadavg()[0])


def bench(config: dict[str, Any], *, name: str, batch: int, size: int,
          repeats: int, seed: int = 0, device: str = "",
          whats: tuple[str, ...] = WHATS) -> list[dict[str, Any]]:
  """One record per `whats` entry: images/s of our encode and decode."""
  cfg, model = make_model(config, seed)
  return [bench_one(cfg, model, what, name=name, batch=batch, size=size,
                    repeats=repeats, seed=seed, device=device)
          for what in whats]


def ratio_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One line per (what, peer): ours / peer of images/s."""
  mine = {r["what"]: r for r in records
          if r.get("impl") == IMPL and METRIC in r}
  out = []
  for r in records:
    if r.get("impl") in (IMPL, None) or METRIC not in r:
      continue
    m = mine.get(r["what"])
    if m is None:
      continue
    out.append(dict(kind="ratio", impl=IMPL, peer=r["impl"],
                    what=r["what"], config=r["config"], batch=r["batch"],
                    image_size=r["image_size"], metric=METRIC,
                    ours_value=m[METRIC], peer_value=r[METRIC],
                    ratio=m[METRIC] / r[METRIC], device=m["device"]))
  return out
