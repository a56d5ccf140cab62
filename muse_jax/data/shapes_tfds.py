"""TFDS builder for the compositional shapes dataset (array_record, no TF).

The dataset is written once with `build_shapes` and then read by random
access (`shapes_source`) through grain, so training never regenerates images
and resumes exactly. Images are stored as raw uint8 tensors and captions as
text, which keeps TensorFlow out of both writing and reading.

Each config fixes the image sizes and the number of examples per split; its
name encodes them (e.g. "s64_256-tr16000-va1000-ho1000-seed0"), so different
sizes never collide in one `data_dir`. Examples are stored in index order
(shuffling is the input pipeline's job), so record `i` of a split is
`shapes.example(split, i, seed, sizes)`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from muse_jax.data import shapes

_DESCRIPTION = """Procedural compositional shapes: 1-4 coloured circles,
squares and triangles on a plain background, with captions naming colours,
shapes, sizes, counts and spatial relations. The heldout split uses
colour-shape pairs never seen in train or validation."""

DEFAULT_NUM_EXAMPLES = {"train": 16000, "validation": 1000, "heldout": 1000}
# Named size presets: base model only, and base + super-resolution.
SIZE_PRESETS: dict[str, tuple[int, ...]] = {
    "s32": (32,),
    "s64": (64,),
    "s32_64": (32, 64),
    "s64_128": (64, 128),
    "s64_256": (64, 256),
}


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """A shapes config: image sizes, examples per split and the seed."""
  sizes: tuple[int, ...] = (64,)
  num_train: int = DEFAULT_NUM_EXAMPLES["train"]
  num_validation: int = DEFAULT_NUM_EXAMPLES["validation"]
  num_heldout: int = DEFAULT_NUM_EXAMPLES["heldout"]
  seed: int = 0

  def num_examples(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_validation,
            "heldout": self.num_heldout}[split]


def make_config(sizes: Sequence[int] = (64,), num_train: int = 16000,
                num_validation: int = 1000, num_heldout: int = 1000,
                seed: int = 0) -> ShapesConfig:
  """A config whose name encodes all of its parameters."""
  sizes = tuple(int(s) for s in sizes)
  for s in sizes:
    if s not in shapes.SUPPORTED_SIZES:
      raise ValueError(
          f"Unsupported size {s}; expected {shapes.SUPPORTED_SIZES}.")
  name = ("s" + "_".join(map(str, sizes)) +
          f"-tr{num_train}-va{num_validation}-ho{num_heldout}-seed{seed}")
  return ShapesConfig(
      name=name,
      description=f"Sizes {sizes}, {num_train}/{num_validation}/{num_heldout} "
                  f"train/validation/heldout examples, seed {seed}.",
      sizes=sizes, num_train=num_train, num_validation=num_validation,
      num_heldout=num_heldout, seed=seed)


class ShapesCompositional(tfds.core.GeneratorBasedBuilder):
  """The compositional shapes dataset (see `muse_jax.data.shapes`)."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Object centres on a 1/8 grid (token corners at 64 px).",
  }
  BUILDER_CONFIGS = [make_config(sizes) for sizes in SIZE_PRESETS.values()]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's own lookup imports the optional `importlib_resources`.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # `dataset_info_from_configs` needs a registered package directory; a
    # DatasetInfo built directly works anywhere.
    k = shapes.MAX_OBJECTS
    int_scalar = lambda: tfds.features.Tensor(shape=(), dtype=np.int32)
    features = {
        # Raw bytes: the default int64 list triples the build time, and
        # array_record compresses the (flat-coloured) images on disk anyway.
        shapes.image_key(s): tfds.features.Tensor(
            shape=(s, s, 3), dtype=np.uint8,
            encoding=tfds.features.Encoding.BYTES)
        for s in self.builder_config.sizes}
    features.update({
        "caption": tfds.features.Text(),
        "index": tfds.features.Tensor(shape=(), dtype=np.int64),
        "scene_type": int_scalar(),
        "background": int_scalar(),
        "relation": int_scalar(),
        "num_objects": int_scalar(),
        "shape_ids": tfds.features.Tensor(shape=(k,), dtype=np.int32),
        "color_ids": tfds.features.Tensor(shape=(k,), dtype=np.int32),
        "size_ids": tfds.features.Tensor(shape=(k,), dtype=np.int32),
        "centers": tfds.features.Tensor(shape=(k, 2), dtype=np.float32),
    })
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in shapes.SPLITS
            if self.builder_config.num_examples(split) > 0}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    for i in range(cfg.num_examples(split)):
      ex = shapes.example(split, i, cfg.seed, cfg.sizes)
      ex["index"] = np.int64(i)
      yield i, ex


def build_shapes(data_dir: str, config_name: str = "s64",
                 num_train: int = 16000, num_validation: int = 1000,
                 num_heldout: int = 1000, seed: int = 0,
                 prepare: bool = True) -> ShapesCompositional:
  """Prepares (once) and returns the shapes builder in `data_dir`.

  Args:
    data_dir: where TFDS writes the dataset.
    config_name: the image sizes as "s<S>[_<S2>...]", e.g. "s64" (base
      model) or "s64_256" (base + super-resolution); anything after a "-"
      (as in full config names) is ignored, the counts come from the
      arguments below.
    num_train: examples in the train split.
    num_validation: examples in the validation split.
    num_heldout: examples in the heldout split.
    seed: dataset seed; train/validation/heldout streams derive from it.
    prepare: build the dataset if it is not there; with False a missing
      dataset is an error (processes other than the builder only open it).

  Returns:
    The prepared builder; a second call with the same arguments only opens it.
  """
  if config_name in SIZE_PRESETS:
    sizes = SIZE_PRESETS[config_name]
  else:
    sizes = tuple(int(s) for s in config_name.split("-")[0][1:].split("_"))
  config = make_config(sizes, num_train, num_validation, num_heldout, seed)
  # TFDS only accepts the predefined object under a predefined name.
  config = ShapesCompositional.builder_configs.get(config.name, config)
  builder = ShapesCompositional(data_dir=data_dir, config=config,
                                file_format="array_record")
  if not builder.is_prepared():
    if not prepare:
      raise FileNotFoundError(
          f"the shapes dataset {config.name} is not built in {data_dir}")
    builder.download_and_prepare()
  return builder


def shapes_source(builder: tfds.core.DatasetBuilder, split: str):
  """A random-access (grain-compatible) source over one split."""
  return builder.as_data_source(split)
