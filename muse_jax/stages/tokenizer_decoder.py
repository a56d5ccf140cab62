"""Stage `tokenizer_decoder`: Muse's decoder fine-tuning (Sec. 2.5).

Loads the trained tokenizer, keeps its encoder and codebook frozen (they
define the tokens every later stage models), and trains a larger decoder
on the same images and losses (`tasks.vq.VQTask` with `train="decoder"`).
Config section `tokenizer_decoder`: `model` holds the keys that change
(e.g. `decoder_base_channels`, `decoder_num_res_blocks`); every other key
it leaves out (loss, adversarial, optimizer, ...) is the tokenizer's
(`artifacts.decoder_section`).
"""

from __future__ import annotations

from typing import Any

from muse_jax.stages import artifacts
from muse_jax.stages import graph
from muse_jax.stages import tokenizer as tokenizer_stage
from muse_jax.training import loop as loop_lib

SECTION = "tokenizer_decoder"


def make_task(config, *, init_from=None, perceptual=None):
  merged = config.copy_and_resolve_references()
  merged[SECTION] = artifacts.decoder_section(config)
  if init_from is None:  # Checking: the abstract trained tokenizer.
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from muse_jax.models import vqgan  # pylint: disable=g-import-not-at-top
    cfg = artifacts.vq_config(config)
    with nnx.use_eager_sharding(False):
      init_from = nnx.eval_shape(lambda: vqgan.VQModel(cfg,
                                                       rngs=nnx.Rngs(0)))
  return tokenizer_stage.make_task(merged, perceptual=perceptual,
                                   init_from=init_from, train="decoder",
                                   section=SECTION)


class TokenizerDecoder(graph.Stage):
  name = "tokenizer_decoder"
  reads = ("data", "tokenizer")
  config_keys = ("seed", "tokenizer", SECTION)

  def check(self, config) -> None:
    make_task(config)
    if artifacts.decoder_section(config).batch_size < 1:
      raise ValueError(f"{SECTION}.batch_size must be >= 1")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config = run.config
    trained = artifacts.load_vq(config, run.inputs["tokenizer"], run.env)
    section = artifacts.decoder_section(config)
    task, loop = make_task(
        config, init_from=trained,
        perceptual=tokenizer_stage.perceptual_network(section,
                                                      say=loop_lib.say))
    return tokenizer_stage.train_tokenizer(self.name, run, task, loop,
                                           section.batch_size)
