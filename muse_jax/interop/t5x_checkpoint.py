"""T5X checkpoints: one tensorstore zarr array per parameter, read lazily.

Google's T5 v1.1, Flan-T5 and T5-XXL weights are published as T5X
checkpoints. `t5x.checkpoints.Checkpointer` saves a train state as a
directory `checkpoint_<step>/` holding

* one zarr array (gzip-compressed chunks plus a `.zarray` header) per
  parameter, in a sub-directory named by the parameter's path joined with
  dots: `target.encoder.layers_0.attention.query.kernel/`; the model's
  parameters live under `target.`, the optimizer's under `state.`;
* `checkpoint`: a msgpack of the state tree `{"version", "optimizer":
  {"target": ..., "state": ...}}` in which every array written to
  tensorstore is replaced by its tensorstore spec (zarr driver, the
  directory as a path relative to the checkpoint), and arrays that were
  not partitioned are stored inline.

This module reads the model parameters (`target.*`) of such a directory as
a mapping name -> numpy array, one tensor at a time (T5-XXL's encoder is
~19 GB in float32), and writes the same layout for tests and conversions.
Values keep T5X's layouts: dense kernels are [in, out], with multi-axis
features flattened (the attention query kernel is [embed, heads * head_dim]
and the output kernel [heads * head_dim, embed]); bfloat16 arrays come back
as `ml_dtypes.bfloat16`. Orbax-format T5X checkpoints (a `state/`
sub-directory) are not read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import math
import os
import pathlib
import re
from typing import Any

import numpy as np
import tensorstore as ts

PathLike = str | os.PathLike[str]

MSGPACK_FILE = "checkpoint"
ZARR_HEADER = ".zarray"
# The model's parameters; the optimizer's (`state.`) are never read.
PARAM_PREFIX = "target."
_STEP_DIR = re.compile(r"checkpoint_(\d+)$")
# T5X aims for chunks of about this many bytes.
_CHUNK_BYTES = 64 * 1024 * 1024


def _has_param_arrays(directory: pathlib.Path) -> bool:
  return any((d / ZARR_HEADER).is_file()
             for d in directory.glob(PARAM_PREFIX + "*"))


def find_checkpoint_dir(path: PathLike) -> pathlib.Path | None:
  """The T5X checkpoint directory at `path`, or None if it is not one.

  `path` is a `checkpoint_<step>` directory (recognised by its
  `target.*` zarr arrays) or a training directory holding several, of
  which the latest step is taken.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    return None
  if _has_param_arrays(path):
    return path
  steps = sorted(
      (int(m.group(1)), d) for d in path.iterdir()
      if (m := _STEP_DIR.match(d.name)) and d.is_dir()
      and _has_param_arrays(d))
  return steps[-1][1] if steps else None


def is_t5x_checkpoint(path: PathLike) -> bool:
  return find_checkpoint_dir(path) is not None


def _zarr_spec(directory: pathlib.Path) -> dict[str, Any]:
  return {"driver": "zarr",
          "kvstore": {"driver": "file", "path": str(directory)}}


def _flatten(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
  """(dotted name, leaf) of a msgpack state tree; a tensorstore spec (a
  dict with a `driver`) is a leaf."""
  if isinstance(tree, Mapping) and "driver" not in tree:
    for key, sub in tree.items():
      yield from _flatten(sub, f"{prefix}.{key}" if prefix else str(key))
  else:
    yield prefix, tree


class T5XCheckpoint(Mapping[str, np.ndarray]):
  """Read-only mapping parameter name -> numpy array of a T5X checkpoint.

  Names are T5X's dotted paths under `target.` (e.g.
  `target.encoder.layers_0.mlp.wi_0.kernel`). The zarr directories are
  the source of truth; the msgpack `checkpoint` file, when present,
  contributes the parameters stored inline and must point at existing
  arrays.
  """

  def __init__(self, path: PathLike):
    path = pathlib.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"T5X checkpoint not found: {path}")
    directory = find_checkpoint_dir(path)
    if directory is None:
      raise ValueError(
          f"{path} is not a T5X checkpoint: no {PARAM_PREFIX}* zarr arrays "
          "in it or in a checkpoint_<step> directory under it")
    self.path = directory
    self._arrays: dict[str, pathlib.Path] = {
        d.name: d for d in sorted(directory.glob(PARAM_PREFIX + "*"))
        if (d / ZARR_HEADER).is_file()}
    self._inline: dict[str, np.ndarray] = {}
    msgpack = directory / MSGPACK_FILE
    if msgpack.is_file():
      self._read_msgpack(msgpack)

  def _read_msgpack(self, file: pathlib.Path) -> None:
    from flax import serialization  # pylint: disable=g-import-not-at-top
    try:
      contents = serialization.msgpack_restore(file.read_bytes())
    except Exception as e:  # msgpack's errors have no common base.
      raise ValueError(f"cannot read the T5X msgpack file {file}: {e}") from e
    target = None
    if isinstance(contents, Mapping):
      # Checkpoints with optimizer state nest the parameters one level down.
      state = contents.get("optimizer", contents)
      target = state.get("target") if isinstance(state, Mapping) else None
    if not isinstance(target, Mapping):
      raise ValueError(f"{file}: no 'target' parameter tree")
    for name, leaf in _flatten(target, PARAM_PREFIX.rstrip(".")):
      if isinstance(leaf, Mapping):  # A tensorstore spec.
        kvstore = leaf.get("kvstore", {})
        rel = kvstore.get("path", leaf.get("path")) if isinstance(
            kvstore, Mapping) else None
        if rel is None:
          raise ValueError(f"{file}: the spec of {name!r} names no path")
        # Written relative to the checkpoint; keep only the last component
        # so a copied (or gs:// written) checkpoint still resolves.
        array_dir = self.path / pathlib.PurePosixPath(str(rel)).name
        if not (array_dir / ZARR_HEADER).is_file():
          raise FileNotFoundError(
              f"{file} stores {name!r} in {array_dir}, which is missing")
        self._arrays.setdefault(name, array_dir)
      elif leaf is not None:
        self._inline[name] = np.asarray(leaf)

  def _open(self, name: str) -> ts.TensorStore:
    directory = self._arrays[name]
    try:
      return ts.open(_zarr_spec(directory), open=True, read=True).result()
    except Exception as e:  # tensorstore raises ValueError and others.
      raise ValueError(
          f"cannot open the zarr array {directory} ({name!r}): {e}") from e

  def __getitem__(self, name: str) -> np.ndarray:
    if name in self._inline:
      return self._inline[name]
    store = self._open(name)
    try:
      return np.asarray(store.read().result())
    except Exception as e:
      raise ValueError(
          f"cannot read {name!r} from {self._arrays[name]}: {e}") from e

  def shape(self, name: str) -> tuple[int, ...]:
    """The array's shape, from its zarr header alone."""
    if name in self._inline:
      return tuple(self._inline[name].shape)
    return tuple(int(n) for n in self._open(name).shape)

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(set(self._arrays) | set(self._inline)))

  def __len__(self) -> int:
    return len(set(self._arrays) | set(self._inline))

  def __contains__(self, name: object) -> bool:
    return name in self._arrays or name in self._inline


def chunk_shape(shape: tuple[int, ...], itemsize: int,
                max_bytes: int = _CHUNK_BYTES) -> list[int]:
  """A chunk shape dividing `shape` of at most `max_bytes` (one chunk if
  the array fits): the largest dimension is cut to its next smaller
  divisor until the chunk fits."""
  chunk = [max(int(n), 1) for n in shape]
  while chunk and math.prod(chunk) * itemsize > max_bytes and max(chunk) > 1:
    i = int(np.argmax(chunk))
    full = max(int(shape[i]), 1)
    chunk[i] = max(d for d in range(1, chunk[i]) if full % d == 0)
  return chunk


def save_t5x_checkpoint(tensors: Mapping[str, np.ndarray], directory: PathLike,
                        *, inline: tuple[str, ...] = (),
                        chunk_bytes: int = _CHUNK_BYTES) -> pathlib.Path:
  """Writes `tensors` as a T5X checkpoint directory (for tests, conversions).

  Every name must start with `target.`. Each tensor becomes a
  gzip-compressed zarr array in `directory/<name>/`, and the msgpack
  `checkpoint` file records its spec (path relative to `directory`), as
  T5X's Checkpointer writes them; names in `inline` are stored in the
  msgpack file itself instead, as T5X does for unpartitioned arrays.

  Returns:
    `directory`.
  """
  from flax import serialization  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tree: dict[str, Any] = {}
  for name in sorted(tensors):
    if not name.startswith(PARAM_PREFIX):
      raise ValueError(f"T5X parameter names start with {PARAM_PREFIX!r}: "
                       f"{name!r}")
    array = np.ascontiguousarray(tensors[name])
    if name in inline:
      leaf: Any = array
    else:
      spec = {
          "driver": "zarr",
          "dtype": array.dtype.name,
          "kvstore": {"driver": "file", "path": name},
          "metadata": {
              "compressor": {"id": "gzip"},
              "shape": list(array.shape),
              "chunks": chunk_shape(array.shape, array.dtype.itemsize,
                                    chunk_bytes),
          },
      }
      absolute = dict(spec, kvstore={"driver": "file",
                                     "path": str(directory / name)})
      store = ts.open(absolute, create=True, delete_existing=True).result()
      store.write(array).result()
      leaf = spec
    node = tree
    keys = name.split(".")[1:]
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  contents = {"version": 3,
              "optimizer": {"target": tree, "state": {"step": np.int32(0)}}}
  (directory / MSGPACK_FILE).write_bytes(
      serialization.msgpack_serialize(contents))
  return directory
