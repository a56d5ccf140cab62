"""Stage `transformer`: trains the base masked transformer.

It reads the tokenize stage's ArrayRecord shards through grain (per-process
slices of each global batch, position checkpointed) and runs
`tasks.masked_transformer.MaskedTransformerTask` through the training loop.
"""

from __future__ import annotations

from typing import Any

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
  t = config.transformer
  loop = config_types.dataclass_from_config(
      loop_lib.LoopConfig, t.loop, seed=config.seed)
  task = masked_transformer.MaskedTransformerTask(
      artifacts.transformer_config(config),
      config_types.dataclass_from_config(optimizer_lib.OptimizerConfig,
                                         t.optimizer),
      config_types.dataclass_from_config(masked_transformer.ObjectiveConfig,
                                         t.objective),
      num_steps=loop.num_steps, seed=config.seed)
  return task, loop


class Transformer(graph.Stage):
  name = "transformer"
  reads = ("tokenize",)
  config_keys = ("seed", "transformer")

  def check(self, config) -> None:
    make_task(config)
    if config.transformer.batch_size < 1:
      raise ValueError("transformer.batch_size must be >= 1")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, t = run.config, run.config.transformer
    task, loop = make_task(config)
    source = records.open_source(run.inputs["tokenize"], "train")
    data = pipeline.make_iterator(
        source, batch_size=t.batch_size, seed=config.seed + 1,
        transform=tokenize.text_example(source.manifest["max_len"]))
    _, summary = loop_lib.train(
        task, stage=self.name, workdir=run.dir, data=data,
        loop=loop, mesh=run.env.mesh, rules=run.env.rules)
    return summary
