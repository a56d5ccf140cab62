"""Hugging Face safetensors checkpoints, single-file or sharded, read lazily.

A model directory from the Hub holds either one `model.safetensors` or
several shards listed by `model.safetensors.index.json` (its `weight_map`
names, for every tensor, the shard that stores it). T5-XXL's encoder is
~19 GB in float32, so tensors are read one at a time (`SafetensorsFiles.get`)
and never all held at once; loaders convert and place each tensor, then
drop the host copy.

Errors name the file: a missing index or shard, an unreadable header, a
tensor the index promises but its shard lacks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import json
import os
import pathlib

import numpy as np
from safetensors import safe_open

PathLike = str | os.PathLike[str]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFiles(Mapping[str, np.ndarray]):
  """Read-only mapping tensor name -> numpy array over one or more files.

  `path` is a `.safetensors` file, an `*.index.json` file, or a directory
  holding `model.safetensors` or `model.safetensors.index.json`. Arrays are
  read on access (bfloat16 comes back as `ml_dtypes.bfloat16`).
  """

  def __init__(self, path: PathLike):
    path = pathlib.Path(path)
    if path.is_dir():
      if (path / INDEX_FILE).is_file():
        path = path / INDEX_FILE
      elif (path / SINGLE_FILE).is_file():
        path = path / SINGLE_FILE
      else:
        raise FileNotFoundError(
            f"{path} holds neither {SINGLE_FILE} nor {INDEX_FILE}")
    if not path.is_file():
      raise FileNotFoundError(f"safetensors checkpoint not found: {path}")
    self.path = path
    self._where: dict[str, pathlib.Path] = {}
    if path.name.endswith(".json"):
      try:
        weight_map = json.loads(path.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path}: not a safetensors index (no 'weight_map'): {e}") from e
      for name, shard in weight_map.items():
        self._where[name] = path.parent / shard
      for shard in sorted(set(self._where.values())):
        if not shard.is_file():
          raise FileNotFoundError(
              f"{path} lists shard {shard.name}, which is missing from "
              f"{shard.parent}")
        names = set(self._keys_of(shard))
        promised = {n for n, s in self._where.items() if s == shard}
        if promised - names:
          raise ValueError(
              f"{path}: shard {shard.name} lacks tensors the index assigns "
              f"to it: {sorted(promised - names)[:5]}")
    else:
      for name in self._keys_of(path):
        self._where[name] = path

  @staticmethod
  def _keys_of(file: pathlib.Path) -> list[str]:
    try:
      with safe_open(str(file), framework="numpy") as f:
        return list(f.keys())
    except Exception as e:  # SafetensorError is not a stable public type.
      raise ValueError(f"cannot read the safetensors file {file}: {e}") from e

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._where[name]
    try:
      with safe_open(str(file), framework="numpy") as f:
        return f.get_tensor(name)
    except Exception as e:
      raise ValueError(f"cannot read tensor {name!r} from {file}: {e}") from e

  def shape(self, name: str) -> tuple[int, ...]:
    """The tensor's shape, from the header alone."""
    with safe_open(str(self._where[name]), framework="numpy") as f:
      return tuple(f.get_slice(name).get_shape())

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, name: object) -> bool:
    return name in self._where


def save_sharded(tensors: Mapping[str, np.ndarray], directory: PathLike,
                 max_shard_bytes: int) -> list[pathlib.Path]:
  """Writes `tensors` as Hub-style shards plus `model.safetensors.index.json`.

  For tests and conversions: shards are filled in name order up to
  `max_shard_bytes` each (a larger tensor gets a shard of its own).
  """
  from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  groups: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if groups[-1] and size + nbytes > max_shard_bytes:
      groups.append({})
      size = 0
    groups[-1][name] = np.ascontiguousarray(tensors[name])
    size += nbytes
  weight_map, files = {}, []
  for i, group in enumerate(groups):
    fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    st_numpy.save_file(group, str(directory / fname))
    files.append(directory / fname)
    weight_map.update({name: fname for name in group})
  total = sum(t.nbytes for t in tensors.values())
  (directory / INDEX_FILE).write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map},
      indent=1))
  return files
