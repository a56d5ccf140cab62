r"""A large T5 encoder without its weights: parameter count, and XLA's
per-device memory for its forward compiled ahead of time on a mesh.

  python -m benchmarks.text_encoder_aot --preset=t5_v1_1_xxl --devices=8 \
      --mesh=data:1,fsdp:8,tensor:1 --out=benchmarks/results/t5_xxl_aot.jsonl

Simulates `--devices` host devices (`--xla_force_host_platform_device_count`),
builds the encoder abstractly (`nnx.eval_shape`: no weights are allocated),
places every parameter by its logical axis names through the default rules
table (`muse_jax.sharding.DEFAULT_RULES`: embed -> fsdp, heads/mlp/vocab ->
tensor; with the preset's `scan_layers`, the layers' stacked weights have
an unsharded leading "layers" axis), and lowers + compiles the forward
pass for a [--batch, --max_len] batch sharded over the data axes
(`--noscan_layers`: the unrolled layer loop instead). Prints JSON lines:
the parameter count, the per-device parameter bytes, and
`compiled.memory_analysis()` (arguments, outputs, temporaries, generated
code) per device. Nothing runs: the figures are XLA's plan, what a TPU or
GPU slice of that shape would need to hold.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

from absl import app
from absl import flags

_PRESET = flags.DEFINE_string("preset", "t5_v1_1_xxl", "T5 preset name")
_DEVICES = flags.DEFINE_integer("devices", 8, "simulated host devices")
_MESH = flags.DEFINE_string("mesh", "data:1,fsdp:8,tensor:1",
                            "mesh axes name:size, product = --devices")
_BATCH = flags.DEFINE_integer("batch", 64, "captions per call")
_MAX_LEN = flags.DEFINE_integer("max_len", 128, "tokens per caption")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "bfloat16",
                                   "parameter storage dtype")
_SCAN_LAYERS = flags.DEFINE_boolean(
    "scan_layers", None, "stack the layers and scan over them (unset: the "
    "preset's default; --noscan_layers unrolls them)")
_OUT = flags.DEFINE_string("out", "", "also write the JSON lines here")


def main(argv) -> None:
  del argv
  # Before jax is imported: one CPU platform with --devices devices.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count="
                             f"{_DEVICES.value}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import dataclasses  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flax.core import spmd as flax_spmd  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from benchmarks import timing  # pylint: disable=g-import-not-at-top
  from muse_jax import config_types  # pylint: disable=g-import-not-at-top
  from muse_jax import sharding  # pylint: disable=g-import-not-at-top
  from muse_jax.text_encoders import t5  # pylint: disable=g-import-not-at-top

  emit = timing.Recorder(_OUT.value)

  axes = [(name, int(size)) for name, size in
          (item.split(":") for item in _MESH.value.split(","))]
  if np.prod([s for _, s in axes]) != _DEVICES.value:
    raise app.UsageError(f"--mesh={_MESH.value} does not use "
                         f"--devices={_DEVICES.value}")
  mesh = sharding.make_mesh(axes)
  rules = sharding.DEFAULT_RULES
  if _PRESET.value not in t5.PRESETS:
    raise app.UsageError(f"--preset={_PRESET.value!r} not in "
                         f"{sorted(t5.PRESETS)}")
  cfg = dataclasses.replace(
      t5.PRESETS[_PRESET.value],
      dtype=config_types.dtype_from_name(_DTYPE.value),
      param_dtype=config_types.dtype_from_name(_PARAM_DTYPE.value))
  if _SCAN_LAYERS.value is not None:
    cfg = dataclasses.replace(cfg, scan_layers=_SCAN_LAYERS.value)
  emit(dict(what="meta", impl="text-encoder-aot",
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            host=f"cpu: {timing.cpu_name()}", jax_version=jax.__version__,
            preset=_PRESET.value, mesh=dict(axes), batch=_BATCH.value,
            max_len=_MAX_LEN.value, dtype=_DTYPE.value,
            param_dtype=_PARAM_DTYPE.value, scan_layers=cfg.scan_layers,
            command=" ".join(sys.argv)))

  t0 = time.perf_counter()
  graphdef, state, shardings = sharding.abstract_state(
      lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)), mesh, rules)
  leaves = jax.tree.leaves(state)
  total = sum(int(np.prod(x.shape)) for x in leaves)
  per_device = sum(
      int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
      for x in leaves)
  emit(dict(what="params", preset=_PRESET.value, params=total,
            params_billion=round(total / 1e9, 3),
            param_bytes_total=sum(int(np.prod(x.shape)) * x.dtype.itemsize
                                  for x in leaves),
            param_bytes_per_device=per_device,
            eval_shape_s=round(time.perf_counter() - t0, 2)))

  data = sharding.data_sharding(mesh, rules)
  ids = jax.ShapeDtypeStruct((_BATCH.value, _MAX_LEN.value), np.int32,
                             sharding=data)
  mask = jax.ShapeDtypeStruct((_BATCH.value, _MAX_LEN.value), np.bool_,
                              sharding=data)

  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  t0 = time.perf_counter()
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    lowered = jax.jit(forward, in_shardings=(shardings, data, data),
                      out_shardings=data).lower(state, ids, mask)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0 - lower_s
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes",
            "alias_size_in_bytes")
  per_dev = {f: int(getattr(mem, f)) for f in fields if hasattr(mem, f)}
  peak = (per_dev.get("argument_size_in_bytes", 0)
          + per_dev.get("output_size_in_bytes", 0)
          + per_dev.get("temp_size_in_bytes", 0)
          - per_dev.get("alias_size_in_bytes", 0))
  emit(dict(what="memory_per_device", preset=_PRESET.value,
            lower_s=round(lower_s, 2), compile_s=round(compile_s, 2),
            **per_dev, total_bytes=peak, total_gib=round(peak / 2**30, 3)))
  emit.close()


if __name__ == "__main__":
  app.run(main)
