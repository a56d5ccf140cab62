"""Stage `data`: the procedural shapes dataset (TFDS builder, array_record).

Process 0 builds it (once, into this stage's directory or
`config.data.data_dir`); the others wait, then open it. Opening never
writes, so processes do not race on TFDS's files.
"""

from __future__ import annotations

from typing import Any

from etils import epath
import ml_collections

from muse_jax import distributed
from muse_jax.data import shapes
from muse_jax.stages import graph


def data_dir(config: ml_collections.ConfigDict, stage_dir: epath.Path
             ) -> epath.Path:
  return epath.Path(config.data.data_dir) if config.data.data_dir else (
      stage_dir)


def open_builder(config: ml_collections.ConfigDict, stage_dir: epath.Path,
                 *, build: bool = False):
  """The shapes TFDS builder of a (finished) data stage directory."""
  from muse_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  d = config.data
  return shapes_tfds.build_shapes(
      str(data_dir(config, stage_dir)), config_name=f"s{d.image_size}",
      num_train=d.num_train, num_validation=d.num_validation,
      num_heldout=d.num_heldout, seed=d.seed, prepare=build)


def split_source(config, stage_dir: epath.Path, split: str):
  """A random-access source over one split of the built dataset."""
  from muse_jax.data import shapes_tfds  # pylint: disable=g-import-not-at-top
  return shapes_tfds.shapes_source(open_builder(config, stage_dir), split)


class Data(graph.Stage):
  name = "data"
  config_keys = ("data",)

  def check(self, config) -> None:
    d = config.data
    if d.image_size not in shapes.SUPPORTED_SIZES:
      raise ValueError(f"data.image_size={d.image_size} not in "
                       f"{shapes.SUPPORTED_SIZES}")
    for key in ("num_train", "num_validation", "num_heldout"):
      if d[key] < 0:
        raise ValueError(f"data.{key} must be >= 0, got {d[key]}")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    if distributed.is_leader():
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      tfds.disable_progress_bar()  # The console shows the stage's lines.
      open_builder(run.config, run.dir, build=True)
    distributed.barrier("data-built")
    return {"splits": {s: len(split_source(run.config, run.dir, s))
                       for s in shapes.SPLITS},
            "data_dir": str(data_dir(run.config, run.dir))}
