"""Stage `tokenizer`: trains the VQGAN tokenizer on the dataset's train split.

The task is `tasks.vq.VQTask` (tokenizer + discriminator, two optimizers;
LPIPS frozen and passed to the step when the perceptual loss is on), run
through the one training loop; at the end a hook reports PSNR, codebook
usage and perplexity on held-out images and writes a reconstruction grid
to TensorBoard.

Config section `tokenizer`: `model` (`VQConfig`), `loss` (`LossConfig`),
`perceptual.vgg16_path` (a torchvision VGG16 state dict; without it the
perceptual loss is off, with a message), `adversarial`
(`AdversarialConfig`), `discriminator` (`DiscriminatorConfig`),
`disc_optimizer`, `ema_decay`, `optimizer`, `loop`, `batch_size`, and
optionally `train_crop` (train on random windows of that side; 0 = whole
images).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np

from muse_jax import config_types
from muse_jax.losses import adversarial
from muse_jax.models import discriminator as disc_lib
from muse_jax.models import vqgan
from muse_jax.stages import artifacts
from muse_jax.stages import data as data_stage
from muse_jax.stages import graph
from muse_jax.tasks import vq as vq_task
from muse_jax.training import loop as loop_lib
from muse_jax.training import optimizer as optimizer_lib

HELDOUT_IMAGES = 256
GRID_IMAGES = 8


def _section(t: ml_collections.ConfigDict, key: str) -> Any:
  return t.get(key) if key in t else None


def loss_config(t: ml_collections.ConfigDict) -> vq_task.LossConfig:
  return config_types.dataclass_from_config(vq_task.LossConfig,
                                            _section(t, "loss"))


def perceptual_network(t: ml_collections.ConfigDict, *, say=None):
  """LPIPS from `t.perceptual.vgg16_path`, or None (with a message) when
  the perceptual loss is on but no VGG16 weights are there."""
  if not loss_config(t).perceptual_weight:
    return None
  path = (_section(t, "perceptual") or {}).get("vgg16_path", "")
  if not path or not os.path.exists(path):
    if say is not None:
      say("[tokenizer] perceptual loss OFF: no VGG16 weights at "
          f"tokenizer.perceptual.vgg16_path={path!r} (a torchvision "
          "vgg16-397923af.pth state dict)")
    return None
  from muse_jax.losses import lpips  # pylint: disable=g-import-not-at-top
  return lpips.from_files(path)


def make_task(config, *, perceptual=None, init_from=None, train="all",
              section: str = "tokenizer"
              ) -> tuple[vq_task.VQTask, loop_lib.LoopConfig]:
  """The tokenizer task and loop of config section `section`."""
  t = config[section]
  loop = config_types.dataclass_from_config(
      loop_lib.LoopConfig, t.loop, seed=config.seed)
  optimizer = config_types.dataclass_from_config(
      optimizer_lib.OptimizerConfig, t.optimizer)
  adv = _section(t, "adversarial")
  disc_opt = _section(t, "disc_optimizer")
  loss = loss_config(t)
  if perceptual is None and loss.perceptual_weight:
    # Checked and built without the network: the perceptual term is off.
    import dataclasses  # pylint: disable=g-import-not-at-top
    loss = dataclasses.replace(loss, perceptual_weight=0.0)
  task = vq_task.VQTask(
      config_types.dataclass_from_config(vqgan.VQConfig, t.model),
      optimizer, num_steps=loop.num_steps, seed=config.seed, loss=loss,
      adversarial_cfg=(config_types.dataclass_from_config(
          adversarial.AdversarialConfig, adv) if adv is not None else None),
      discriminator=config_types.dataclass_from_config(
          disc_lib.DiscriminatorConfig, _section(t, "discriminator")),
      disc_optimizer=(config_types.dataclass_from_config(
          optimizer_lib.OptimizerConfig, disc_opt)
                      if disc_opt is not None else None),
      ema_decay=float(t.get("ema_decay", 0.0)), perceptual=perceptual,
      train=train, init_from=init_from)
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
    check_crop(config, "tokenizer", config.data.image_size)

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, t = run.config, run.config.tokenizer
    task, loop = make_task(
        config, perceptual=perceptual_network(t, say=loop_lib.say))
    return train_tokenizer(self.name, run, task, loop, t.batch_size,
                           crop=t.get("train_crop", 0))


class SrTokenizer(graph.Stage):
  """The super-res stage's tokenizer (section `sr_tokenizer`), trained on
  the scenes rendered at `data.sr_image_size` (P§2.4: f=8 at 512 px in
  the paper; here the cascade recipe's high-res side)."""

  name = "sr_tokenizer"
  reads = ("data",)
  config_keys = ("seed", "sr_tokenizer")

  def check(self, config) -> None:
    make_task(config, section="sr_tokenizer")
    artifacts.sr_grid_size(config)
    if config.sr_tokenizer.batch_size < 1:
      raise ValueError("sr_tokenizer.batch_size must be >= 1")
    check_crop(config, "sr_tokenizer", data_stage.sr_image_size(config))

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, t = run.config, run.config.sr_tokenizer
    task, loop = make_task(
        config, perceptual=perceptual_network(t, say=loop_lib.say),
        section="sr_tokenizer")
    return train_tokenizer(self.name, run, task, loop, t.batch_size,
                           size=data_stage.sr_image_size(config),
                           crop=t.get("train_crop", 0))


def check_crop(config, section: str, size: int) -> None:
  """`<section>.train_crop` (0 = whole images) is a window of the images
  that the tokenizer's downsampling factor divides."""
  crop = config[section].get("train_crop", 0)
  f = config_types.dataclass_from_config(
      vqgan.VQConfig, config[section].model).downsample_factor
  if crop and (not 0 < crop <= size or crop % f):
    raise ValueError(f"{section}.train_crop={crop} must be 0 (whole "
                     f"images) or a multiple of the tokenizer's factor {f} "
                     f"no larger than the {size} px images")


def train_tokenizer(name: str, run: graph.StageRun, task: vq_task.VQTask,
                    loop: loop_lib.LoopConfig, batch_size: int,
                    size: int | None = None, crop: int = 0
                    ) -> dict[str, Any]:
  """Trains `task` on the data stage's train images (rendered at `size`,
  default `data.image_size`; random `crop`-pixel windows of them when
  `crop` > 0: the tokenizer is fully convolutional, so it trains on small
  windows at a fraction of the cost and encodes whole images); held-out
  metrics on whole images."""
  config = run.config
  data = data_stage.image_iterator(config, run.inputs["data"], "train",
                                   batch_size=batch_size, seed=config.seed,
                                   size=size, crop=crop)
  images = vqgan.to_unit_range(data_stage.heldout_images(
      config, run.inputs["data"], HELDOUT_IMAGES, size=size))
  hook = vq_task.codebook_usage_hook(np.array_split(images, 4),
                                     grid=GRID_IMAGES)
  _, summary = loop_lib.train(
      task, stage=name, workdir=run.dir, data=data, loop=loop,
      mesh=run.env.mesh, rules=run.env.rules, eval_hooks=[hook])
  return summary
