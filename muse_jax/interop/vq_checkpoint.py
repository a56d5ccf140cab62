"""Imported VQ tokenizers: flat weights -> our VQModel -> an Orbax directory.

Both importers (`muse_jax.interop.diffusers_vq` for diffusers' `VQModel`,
`muse_jax.interop.maskgit_vq` for MaskGIT's Flax VQGAN) read a foreign
checkpoint into a `VQConfig` and a flat dict of numpy arrays keyed by our
parameter paths ("encoder/conv_in/kernel", "encoder/blocks/3/skip/bias",
"quantizer/codebook"; conv kernels HWIO). This module owns the rest:

- `to_model`: the arrays into a `VQModel`, after checking that every
  parameter is given exactly once with the right shape (errors name the
  path and both shapes);
- `save`: a directory the project's own loaders read: the model under the
  tokenizer part (`muse_jax.tasks.vq.PART`) at step 0 of
  `<dir>/checkpoints` (`muse_jax.checkpointing`, as the tokenizer stage
  writes it, so `stages.artifacts.load_vq` reads it when the experiment's
  `tokenizer.model` holds the same fields), and the config's fields as JSON
  in `<dir>/vq_config.json`;
- `load`: such a directory back into a `VQModel`, config included;
- `import_checkpoint`: one format's reader, then `to_model` and `save`
  (the `muse_jax.import_tokenizer` CLI).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from muse_jax import checkpointing
from muse_jax import config_types
from muse_jax.models import vqgan
from muse_jax.tasks import vq as vq_task

PathLike = str | os.PathLike[str]

CONFIG_FILE = "vq_config.json"
CHECKPOINT_DIR = "checkpoints"
# The tokenizer task's part: its checkpoints' model item.
PART = vq_task.PART
# Importer modules by format; each has `read(path) -> (VQConfig, flat)`.
READERS = {"diffusers": "muse_jax.interop.diffusers_vq",
           "maskgit": "muse_jax.interop.maskgit_vq"}


def path_str(path: tuple[Any, ...]) -> str:
  """An nnx state path as our flat key: ("encoder", "blocks", 3) ->
  "encoder/blocks/3"."""
  return "/".join(str(p) for p in path)


def _check(params: dict[str, tuple[int, ...]], flat: dict[str, Any],
           source: str) -> None:
  """Raises ValueError unless `flat` has exactly `params`' paths and
  shapes."""
  missing = sorted(set(params) - set(flat))
  extra = sorted(set(flat) - set(params))
  wrong = [(p, tuple(np.shape(flat[p])), params[p]) for p in sorted(params)
           if p in flat and tuple(np.shape(flat[p])) != params[p]]
  problems = []
  if missing:
    problems.append(f"{len(missing)} parameter(s) missing: "
                    + ", ".join(missing[:8]) + (" ..." if len(missing) > 8
                                                else ""))
  if extra:
    problems.append(f"{len(extra)} unexpected: " + ", ".join(extra[:8])
                    + (" ..." if len(extra) > 8 else ""))
  problems += [f"{p} has shape {got}, the config needs {want}"
               for p, got, want in wrong[:8]]
  if problems:
    raise ValueError(f"{source + ': ' if source else ''}weights do not "
                     "match the VQConfig: " + "; ".join(problems))


def param_shapes(model: vqgan.VQModel) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a (possibly abstract) model's parameters."""
  return {path_str(p): tuple(v.shape)
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _make(cfg: vqgan.VQConfig) -> vqgan.VQModel:
  with nnx.use_eager_sharding(False):
    return vqgan.VQModel(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def to_model(cfg: vqgan.VQConfig, flat: dict[str, Any],
             source: str = "") -> vqgan.VQModel:
  """A VQModel with `flat`'s arrays as its parameters.

  Other state (the quantizer's code-usage average) keeps its initial value.
  The model is built in one jitted program whose random initialisation XLA
  drops, as every parameter is overwritten.

  Args:
    cfg: The model's config.
    flat: {our parameter path: array}, every parameter exactly once.
    source: Names the weights in errors.

  Raises:
    ValueError: a parameter is missing, unexpected or mis-shaped (naming
      the path and both shapes).
  """
  flat = {k: np.asarray(v) for k, v in flat.items()}

  @nnx.jit
  def build(arrays):
    model = _make(cfg)
    _check(param_shapes(model), arrays, source)  # Shapes are static here.
    for path, node in nnx.iter_graph(model):
      if isinstance(node, nnx.Param):
        node[...] = arrays[path_str(path)].astype(node[...].dtype)
    return model

  return build({k: jnp.asarray(v) for k, v in flat.items()})


def config_to_json(cfg: vqgan.VQConfig) -> dict[str, Any]:
  """The config's fields as JSON values (dtypes by name, tuples as lists)."""
  out = {}
  for field in dataclasses.fields(cfg):
    value = getattr(cfg, field.name)
    if field.name in ("dtype", "param_dtype"):
      value = jnp.dtype(value).name
    elif isinstance(value, tuple):
      value = list(value)
    out[field.name] = value
  return out


def config_from_json(fields: dict[str, Any], source: str = "") -> vqgan.VQConfig:
  """The inverse of `config_to_json`; unknown fields are an error."""
  try:
    return config_types.dataclass_from_config(vqgan.VQConfig, fields)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{source or 'VQ config'}: {e}") from e


def _check_unused(directory: epath.Path) -> None:
  ckpt_dir = directory / CHECKPOINT_DIR
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise FileExistsError(f"{ckpt_dir} already holds a checkpoint; choose an "
                          "empty output directory")


def save(directory: PathLike, cfg: vqgan.VQConfig, model: vqgan.VQModel,
         meta: dict[str, Any] | None = None) -> epath.Path:
  """Writes `model` and `cfg` as an imported-tokenizer directory.

  `<directory>/checkpoints` gets step 0 with the model under part `PART`
  (no optimizer state: nothing to resume), `meta` in its metadata;
  `<directory>/vq_config.json` the config. Refuses a directory that
  already holds a checkpoint.
  """
  directory = epath.Path(directory)
  _check_unused(directory)
  ckpt_dir = directory / CHECKPOINT_DIR
  directory.mkdir(parents=True, exist_ok=True)
  ckpt = checkpointing.Checkpointer(ckpt_dir, parts=(PART,), keep=1,
                                    async_save=False, handle_sigterm=False)
  try:
    ckpt.save(0, {PART: (model, None)},
              meta=dict(meta or {}, imported=True))
  finally:
    ckpt.close()
  (directory / CONFIG_FILE).write_text(
      json.dumps(config_to_json(cfg), indent=2, sort_keys=True) + "\n")
  return directory


def load_config(directory: PathLike) -> vqgan.VQConfig:
  """The VQConfig of an imported-tokenizer directory."""
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {directory} is not a "
                            "directory written by muse_jax.import_tokenizer")
  try:
    fields = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  return config_from_json(fields, str(path))


def load(directory: PathLike) -> vqgan.VQModel:
  """An imported-tokenizer directory (`save`) as a VQModel on the default
  device."""
  cfg = load_config(directory)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: vqgan.VQModel(cfg, rngs=nnx.Rngs(0)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, state = nnx.split(model)
  state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
  nnx.update(model, state)
  return checkpointing.restore_model(
      epath.Path(directory) / CHECKPOINT_DIR, model, PART)


def reader(fmt: str):
  """The importer module of format `fmt` (imported on first use)."""
  if fmt not in READERS:
    raise ValueError(f"unknown tokenizer format {fmt!r}; expected one of "
                     f"{sorted(READERS)}")
  return importlib.import_module(READERS[fmt])


def import_checkpoint(fmt: str, src: PathLike, out: PathLike
                      ) -> tuple[vqgan.VQConfig, vqgan.VQModel]:
  """Reads `src` in format `fmt` and writes it to `out` (see `save`)."""
  read = reader(fmt).read
  _check_unused(epath.Path(out))  # Before the (slow) conversion.
  cfg, flat = read(src)
  model = to_model(cfg, flat, source=os.fspath(src))
  save(out, cfg, model, meta={"format": fmt, "source": os.fspath(src)})
  return cfg, model


def num_params(model: vqgan.VQModel) -> int:
  return int(sum(np.prod(v.shape) for _, v in
                 nnx.to_flat_state(nnx.state(model, nnx.Param))))
