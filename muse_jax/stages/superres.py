"""Stage `superres`: trains the super-resolution transformer (P§2.4).

It reads the cascade's token records, `tokenize`'s and `sr_tokenize`'s
joined (`tokenize.paired_source`): per example the base tokenizer's
tokens of the low-res scene, the super-res tokenizer's `hr_tokens` of the
same scene at `data.sr_image_size`, and the caption's embeddings. The objective is the base model's, on the high-res
tokens, with the low-res tokens as a condition that the 10% text dropout
leaves in place (`tasks.masked_transformer`, `lowres=`).

Config section `superres`: `model` (`TransformerConfig` without the grid,
codebook and text width, which follow the super-res tokenizer, the image
size and the text encoder; `self_attention="multi_axis"` for large grids),
`lowres_depth` (the low-res encoder's layers; 16 in the paper),
`objective` (`loss_chunk` bounds the logits alive at once), `optimizer`,
`loop`, `batch_size`, and `sampling` (the cascade's super-res decoding,
read by evaluation and the sample CLI; not part of this stage's
fingerprint).
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


def make_task(config) -> tuple[masked_transformer.MaskedTransformerTask,
                               loop_lib.LoopConfig]:
  s = config.superres
  loop = config_types.dataclass_from_config(
      loop_lib.LoopConfig, s.loop, seed=config.seed)
  model, lowres = artifacts.superres_configs(config)
  task = masked_transformer.MaskedTransformerTask(
      model,
      config_types.dataclass_from_config(optimizer_lib.OptimizerConfig,
                                         s.optimizer),
      config_types.dataclass_from_config(masked_transformer.ObjectiveConfig,
                                         s.objective),
      num_steps=loop.num_steps, seed=config.seed, lowres=lowres)
  return task, loop


def pair_example(max_len: int):
  """A joined cascade record (`tokenize.paired_source`) -> {tokens
  (high-res), lowres_tokens, text_emb, text_mask}."""
  text = tokenize.text_example(max_len)

  def transform(record: dict[str, Any]) -> dict[str, np.ndarray]:
    if "hr_tokens" not in record:
      raise records.RecordsError(
          f"record {record.get('index')} has no hr_tokens: not a record "
          "of tokenize.paired_source")
    out = text(record)
    out["lowres_tokens"] = out["tokens"]
    out["tokens"] = np.asarray(record["hr_tokens"], np.int32)
    return out

  return transform


class SuperRes(graph.Stage):
  name = "superres"
  reads = ("tokenize", "sr_tokenize")
  config_keys = ("seed", "superres")
  # Decoding settings: read by evaluation, not by training.
  fingerprint_ignores = ("superres.sampling",)

  def check(self, config) -> None:
    make_task(config)
    if config.superres.batch_size < 1:
      raise ValueError("superres.batch_size must be >= 1")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, s = run.config, run.config.superres
    task, loop = make_task(config)
    source = tokenize.paired_source(run.inputs, "train")
    data = pipeline.make_iterator(
        source, batch_size=s.batch_size, seed=config.seed + 2,
        transform=pair_example(source.manifest["max_len"]))
    _, summary = loop_lib.train(
        task, stage=self.name, workdir=run.dir, data=data,
        loop=loop, mesh=run.env.mesh, rules=run.env.rules)
    return summary
