"""Stage `tokenizer`: trains the VQ tokenizer on the dataset's train split.

The task is `tasks.vq.VQTask`, run through the one training loop; at the
end a hook reports codebook usage and perplexity on validation images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from muse_jax import config_types
from muse_jax.data import pipeline
from muse_jax.data import shapes
from muse_jax.models import vqgan
from muse_jax.stages import artifacts
from muse_jax.stages import data as data_stage
from muse_jax.stages import graph
from muse_jax.tasks import vq as vq_task
from muse_jax.training import loop as loop_lib
from muse_jax.training import optimizer as optimizer_lib

HELDOUT_IMAGES = 256


def make_task(config) -> tuple[vq_task.VQTask, loop_lib.LoopConfig]:
  t = config.tokenizer
  loop = config_types.dataclass_from_config(
      loop_lib.LoopConfig, t.loop, seed=config.seed)
  task = vq_task.VQTask(
      artifacts.vq_config(config),
      config_types.dataclass_from_config(optimizer_lib.OptimizerConfig,
                                         t.optimizer),
      num_steps=loop.num_steps, seed=config.seed)
  return task, loop


class Tokenizer(graph.Stage):
  name = "tokenizer"
  reads = ("data",)
  config_keys = ("seed", "tokenizer")

  def check(self, config) -> None:
    make_task(config)
    artifacts.grid_size(config)
    if config.tokenizer.batch_size < 1:
      raise ValueError("tokenizer.batch_size must be >= 1")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, t = run.config, run.config.tokenizer
    task, loop = make_task(config)
    key = shapes.image_key(config.data.image_size)
    source = data_stage.split_source(config, run.inputs["data"], "train")
    data = pipeline.make_iterator(
        source, batch_size=t.batch_size, seed=config.seed,
        transform=lambda r: {"images": vqgan.to_unit_range(r[key])})
    heldout = data_stage.split_source(config, run.inputs["data"],
                                      "validation")
    n = min(HELDOUT_IMAGES, len(heldout))
    images = vqgan.to_unit_range(np.stack([heldout[i][key]
                                               for i in range(n)]))
    _, summary = loop_lib.train(
        task, stage=self.name, workdir=run.dir, data=data, loop=loop,
        mesh=run.env.mesh, rules=run.env.rules,
        eval_hooks=[vq_task.codebook_usage_hook(np.array_split(images, 4))])
    return summary
