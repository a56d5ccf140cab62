"""Stage `transformer`: trains the base masked transformer.

It reads the tokenize stage's ArrayRecord shards through grain (per-process
slices of each global batch, position checkpointed) and runs
`tasks.masked_transformer.MaskedTransformerTask` through the training loop.

`transformer.text_embeddings` says where the caption embeddings come from:
"stored" (default) reads those the tokenize stage wrote (computed there by
the encoder or read from `text_encoder.cache_dir`); "on_the_fly" tokenizes
each caption in the input pipeline and runs the frozen text encoder inside
every training step (its weights sharded by their logical axes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from muse_jax import config_types
from muse_jax.data import pipeline
from muse_jax.data import records
from muse_jax.stages import artifacts
from muse_jax.stages import graph
from muse_jax.stages import tokenize
from muse_jax.tasks import masked_transformer
from muse_jax.training import loop as loop_lib
from muse_jax.training import optimizer as optimizer_lib

TEXT_EMBEDDINGS = ("stored", "on_the_fly")


def text_embeddings(config) -> str:
  """`transformer.text_embeddings`, checked."""
  mode = config.transformer.get("text_embeddings", "stored")
  if mode not in TEXT_EMBEDDINGS:
    raise ValueError(f"transformer.text_embeddings={mode!r} not in "
                     f"{TEXT_EMBEDDINGS}")
  return mode


def make_task(config, text_encoder=None
              ) -> tuple[masked_transformer.MaskedTransformerTask,
                         loop_lib.LoopConfig]:
  t = config.transformer
  loop = config_types.dataclass_from_config(
      loop_lib.LoopConfig, t.loop, seed=config.seed)
  task = masked_transformer.MaskedTransformerTask(
      artifacts.transformer_config(config),
      config_types.dataclass_from_config(optimizer_lib.OptimizerConfig,
                                         t.optimizer),
      config_types.dataclass_from_config(masked_transformer.ObjectiveConfig,
                                         t.objective),
      num_steps=loop.num_steps, seed=config.seed, text_encoder=text_encoder)
  return task, loop


def caption_example(encoder):
  """A record -> {tokens, text_ids [max_len], text_mask [max_len]}: the
  caption tokenized on the host by `encoder`'s tokenizer."""

  def transform(record: dict[str, Any]) -> dict[str, np.ndarray]:
    caption = record["caption"]
    if isinstance(caption, bytes):
      caption = caption.decode()
    ids, mask, _ = encoder.tokenize([str(caption)])
    return {"tokens": np.asarray(record["tokens"], np.int32),
            "text_ids": ids[0], "text_mask": mask[0]}

  return transform


class Transformer(graph.Stage):
  name = "transformer"
  reads = ("tokenize",)
  config_keys = ("seed", "transformer")

  def check(self, config) -> None:
    text_embeddings(config)
    make_task(config)
    if config.transformer.batch_size < 1:
      raise ValueError("transformer.batch_size must be >= 1")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, t = run.config, run.config.transformer
    source = records.open_source(run.inputs["tokenize"], "train")
    if text_embeddings(config) == "on_the_fly":
      encoder = run.env.text_encoder()
      task, loop = make_task(config, encoder.frozen_module())
      transform = caption_example(encoder)
    else:
      task, loop = make_task(config)
      transform = tokenize.text_example(source.manifest["max_len"])
    data = pipeline.make_iterator(
        source, batch_size=t.batch_size, seed=config.seed + 1,
        transform=transform)
    _, summary = loop_lib.train(
        task, stage=self.name, workdir=run.dir, data=data,
        loop=loop, mesh=run.env.mesh, rules=run.env.rules)
    return summary
