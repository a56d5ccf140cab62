"""The VQGAN tokenizer task: generator and discriminator, two optimizers.

Parts (checkpoint items, `training.task`):

* ``vq``: the tokenizer (`models.vqgan.VQModel`), trained on pixel (L1/L2),
  perceptual (LPIPS) and adversarial losses plus the quantizer's own
  (codebook, commitment, entropy); dead codes are restarted after its
  optimizer step when the quantizer asks for it;
* ``disc`` (when the adversarial weight is > 0): the discriminator
  (`models.discriminator`) with its running LeCAM means, trained on the
  hinge or non-saturating loss with optional R1 / LeCAM regularisation;
* ``vq_ema`` (when ``ema_decay`` > 0): an exponential moving average of the
  tokenizer's parameters (its "optimizer" is the identity: the step sets
  it). Loaders may read it in place of ``vq``.

Frozen modules (arguments of the compiled step, never constants): ``lpips``,
the perceptual network, when the perceptual weight is > 0.

Decoder fine-tuning (Muse Sec. 2.5) is the same task with ``init_from`` (a
trained tokenizer) and ``train="decoder"``: the tokenizer part starts from
the trained encoder and codebook, and only ``decoder`` parameters are in its
optimizer, so the encoder and codebook stay bit-for-bit as they were and
the tokens do not change. A deeper decoder of the same widths starts from
the trained one (`grow_decoder`: extra residual blocks start as the
identity); a wider one starts fresh.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from muse_jax.evaluation import reconstruction
from muse_jax.losses import adversarial
from muse_jax.models import discriminator as disc_lib
from muse_jax.models import vqgan
from muse_jax.training import ema as ema_lib
from muse_jax.training import loop as loop_lib
from muse_jax.training import optimizer as optimizer_lib
from muse_jax.training import task as task_lib

PART = "vq"
DISC = "disc"
EMA = "vq_ema"
LPIPS = "lpips"
TRAIN = ("all", "decoder")
# Outputs of the generator's loss that are not scalar metrics.
_ARRAYS = ("recon", "code_counts", "latents")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Weights of the tokenizer's image losses.

  Attributes:
    l1_weight: Mean absolute pixel error.
    l2_weight: Mean squared pixel error. L2 alone trained clearly better
      than L1 on the shapes demo: early on, L1's median-seeking optimum
      paints small objects as background.
    perceptual_weight: LPIPS (VGG16); needs the VGG16 weights
      (`tokenizer.perceptual.vgg16_path`), off without them.
  """

  l1_weight: float = 0.0
  l2_weight: float = 1.0
  perceptual_weight: float = 0.0

  def __post_init__(self):
    for name in ("l1_weight", "l2_weight", "perceptual_weight"):
      if getattr(self, name) < 0:
        raise ValueError(f"loss.{name} must be >= 0, got "
                         f"{getattr(self, name)!r}")
    if not (self.l1_weight or self.l2_weight or self.perceptual_weight):
      raise ValueError("loss: l1_weight, l2_weight and perceptual_weight are "
                       "all 0; nothing would train the decoder")


class LecamMean(nnx.Variable):
  """A running mean of discriminator logits (LeCAM): state, not trained."""


class Critic(nnx.Module):
  """The discriminator and its running LeCAM means of real / fake logits."""

  def __init__(self, config: disc_lib.DiscriminatorConfig, *,
               rngs: nnx.Rngs):
    self.net = disc_lib.Discriminator(config, rngs=rngs)
    self.lecam_real = LecamMean(jnp.zeros((), jnp.float32))
    self.lecam_fake = LecamMean(jnp.zeros((), jnp.float32))


def pixel_terms(recon: jax.Array, images: jax.Array, loss: LossConfig
                ) -> dict[str, jax.Array]:
  """Weighted L1 / L2 terms (float32) of a reconstruction."""
  diff = recon.astype(jnp.float32) - images.astype(jnp.float32)
  terms = {}
  if loss.l1_weight:
    terms["l1"] = loss.l1_weight * jnp.mean(jnp.abs(diff))
  if loss.l2_weight:
    terms["l2"] = loss.l2_weight * jnp.mean(jnp.square(diff))
  return terms


def vq_loss(model: vqgan.VQModel, images: jax.Array,
            loss: LossConfig = LossConfig()
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction + quantizer loss, no perceptual or adversarial term.

  Usable as ``nnx.value_and_grad(vq_loss, has_aux=True)(model, images)``;
  returns (loss, scalar metrics).
  """
  recon, aux = model(images)
  terms = pixel_terms(recon, images, loss)
  terms["quantizer"] = model.quantizer.loss(aux)
  total = sum(terms.values())
  return total, _scalars(terms, recon, images, aux, total)


def _scalars(terms, recon, images, aux, total):
  diff = recon - images.astype(jnp.float32)
  metrics = {f"{k}_loss": v for k, v in terms.items()}
  metrics.update(
      loss=total, recon_mse=jnp.mean(jnp.square(diff)),
      recon_l1=jnp.mean(jnp.abs(diff)), perplexity=aux["perplexity"],
      codebook_usage=aux["codebook_usage"],
      entropy_loss=aux["entropy_loss"])
  return metrics


class VQTask(task_lib.Task):
  """Trains the tokenizer (and its discriminator); see the module doc."""

  def __init__(self, model: vqgan.VQConfig,
               optimizer: optimizer_lib.OptimizerConfig, *, num_steps: int,
               seed: int = 0, loss: LossConfig = LossConfig(),
               adversarial_cfg: adversarial.AdversarialConfig | None = None,
               discriminator: disc_lib.DiscriminatorConfig | None = None,
               disc_optimizer: optimizer_lib.OptimizerConfig | None = None,
               ema_decay: float = 0.0, perceptual: nnx.Module | None = None,
               train: str = "all", init_from: vqgan.VQModel | None = None):
    if train not in TRAIN:
      raise ValueError(f"tokenizer train={train!r} not in {TRAIN}")
    if train == "decoder" and init_from is None:
      raise ValueError("train='decoder' fine-tunes a trained tokenizer's "
                       "decoder: give init_from")
    if not 0 <= ema_decay < 1:
      raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}")
    if loss.perceptual_weight and perceptual is None:
      raise ValueError("loss.perceptual_weight > 0 needs the perceptual "
                       "network (LPIPS)")
    if init_from is not None:
      _check_compatible(init_from.config, model)
    self.model_cfg = model
    self.optimizer_cfg = optimizer
    self.num_steps = num_steps
    self.seed = seed
    self.loss = loss
    self.adv = (adversarial_cfg if adversarial_cfg is not None and
                adversarial_cfg.weight > 0 else None)
    self.disc_cfg = discriminator or disc_lib.DiscriminatorConfig()
    self.disc_optimizer_cfg = disc_optimizer or optimizer
    self.ema_decay = ema_decay
    self.perceptual = perceptual if loss.perceptual_weight else None
    self.train = train
    self.init_from = init_from

  # --- Parts ---------------------------------------------------------------

  def make_model(self) -> vqgan.VQModel:
    model = vqgan.VQModel(self.model_cfg, rngs=nnx.Rngs(self.seed))
    if self.init_from is not None:
      nnx.update(model.encoder, nnx.state(self.init_from.encoder))
      nnx.update(model.quantizer, nnx.state(self.init_from.quantizer))
      grow_decoder(model, self.init_from)
    return model

  def make_critic(self) -> Critic:
    return Critic(self.disc_cfg, rngs=nnx.Rngs(self.seed + 1))

  @property
  def wrt(self):
    if self.train == "decoder":
      return nnx.All(nnx.Param, nnx.PathContains("decoder"))
    return nnx.Param

  def parts(self) -> dict[str, task_lib.Part]:
    parts = {PART: task_lib.Part(
        self.make_model, self.optimizer_cfg.make(self.num_steps), self.wrt)}
    if self.adv is not None:
      parts[DISC] = task_lib.Part(
          self.make_critic, self.disc_optimizer_cfg.make(self.num_steps))
    if self.ema_decay:
      parts[EMA] = task_lib.Part(self.make_model, optax.identity())
    return parts

  def frozen(self) -> dict[str, nnx.Module]:
    return {LPIPS: self.perceptual} if self.perceptual is not None else {}

  # --- The step ------------------------------------------------------------

  def generator_loss(self, model: vqgan.VQModel, critic: Critic | None,
                     lpips: nnx.Module | None, images: jax.Array,
                     step: jax.Array):
    """(loss, metrics incl. the reconstruction and code statistics)."""
    z_q, indices, aux = model.quantize(model.encode(images))
    feats = model.decoder.features(z_q)
    conv_out = model.decoder.conv_out

    def render(head: nnx.Conv) -> jax.Array:
      x = model.decoder.head(feats, head).astype(jnp.float32)
      return vqgan.straight_through_clip(x)

    def image_terms(recon):
      terms = pixel_terms(recon, images, self.loss)
      if lpips is not None:
        terms["perceptual"] = self.loss.perceptual_weight * jnp.mean(
            lpips(recon, images.astype(jnp.float32)))
      return terms

    recon = render(conv_out)
    terms = image_terms(recon)
    terms["quantizer"] = model.quantizer.loss(aux)
    metrics = {}
    if critic is not None:
      adv = self.adv
      on = adversarial.adversarial_weight_schedule(step, adv.start_step,
                                                   adv.weight)
      # One critic forward and input-gradient per step serves both the
      # generator's update and the adaptive weight: the GAN term enters the
      # loss as <dL_gan/drecon, recon> (same value and parameter gradient
      # as differentiating through the critic again).
      g_loss, d_gan = jax.value_and_grad(
          lambda r: adversarial.generator_loss(critic.net(r), adv.kind))(
              jax.lax.stop_gradient(recon))
      g_term = g_loss + jnp.sum(
          d_gan * (recon - jax.lax.stop_gradient(recon)))
      if adv.adaptive:
        # VQGAN: balance the two gradients at the decoder's last layer.
        graphdef, head_state = nnx.split(conv_out)
        fixed = jax.lax.stop_gradient(feats)
        _, head_vjp = jax.vjp(
            lambda s: vqgan.straight_through_clip(
                model.decoder.head(fixed, nnx.merge(graphdef, s))
                .astype(jnp.float32)),
            jax.lax.stop_gradient(head_state))
        d_nll = jax.grad(lambda r: sum(image_terms(r).values()))(
            jax.lax.stop_gradient(recon))
        nll, = head_vjp(d_nll)
        gan, = head_vjp(d_gan)
        scale = adversarial.adaptive_weight(nll, gan, adv.max_adaptive_weight)
        metrics["adaptive_weight"] = scale
        on = on * scale
      terms["adversarial"] = on * g_term
      metrics["generator_gan_loss"] = g_loss
    total = sum(terms.values())
    metrics.update(_scalars(terms, recon, images, aux, total))
    metrics.update(recon=jax.lax.stop_gradient(recon),
                   code_counts=aux["code_counts"], latents=aux["latents"])
    del indices
    return total, metrics

  def critic_loss(self, critic: Critic, real: jax.Array, fake: jax.Array,
                  step: jax.Array):
    adv = self.adv
    real_logits = critic.net(real)
    fake_logits = critic.net(fake)
    loss = adversarial.discriminator_loss(real_logits, fake_logits, adv.kind)
    metrics = {"disc_loss": loss,
               "logits_real": jnp.mean(real_logits),
               "logits_fake": jnp.mean(fake_logits)}
    if adv.use_lecam:
      lecam = adversarial.lecam_penalty(real_logits, fake_logits,
                                        critic.lecam_real[...],
                                        critic.lecam_fake[...])
      metrics["lecam"] = lecam
      loss = loss + adv.lecam_weight * lecam
    if adv.use_r1:
      r1 = adversarial.lazy_r1_penalty(critic.net, real, step, adv.r1_every)
      metrics["r1"] = r1
      loss = loss + adv.r1_weight * r1
    metrics["real_logits"] = real_logits
    metrics["fake_logits"] = fake_logits
    return loss, metrics

  def _generator_step(self, gen, critic, lpips, images, step, rng):
    loss, metrics = gen.minimize(self.generator_loss,
                                 critic.model if critic else None, lpips,
                                 images, step)
    metrics = dict(metrics, loss=loss)
    recon = metrics.pop("recon")
    counts = metrics.pop("code_counts")
    latents = metrics.pop("latents")
    quantizer = gen.model.quantizer
    if self.train == "all" and quantizer.config.restart_threshold > 0:
      metrics["restarted_codes"] = quantizer.restart_dead_codes(
          counts, latents, rng)
    return metrics, recon

  def _critic_step(self, critic, images, recon, step):
    _, d_metrics = critic.minimize(self.critic_loss, images, recon, step)
    real_logits = d_metrics.pop("real_logits")
    fake_logits = d_metrics.pop("fake_logits")
    if self.adv.use_lecam:
      r, f = adversarial.update_lecam_emas(
          critic.model.lecam_real[...], critic.model.lecam_fake[...],
          real_logits, fake_logits, self.adv.lecam_decay)
      critic.model.lecam_real[...] = r
      critic.model.lecam_fake[...] = f
    return {f"{DISC}/{k}": v for k, v in d_metrics.items()}

  def phase(self, step: int) -> int:
    """1 from the adversarial start on, else 0: before it, the compiled
    step has no discriminator forward passes or update at all."""
    return int(self.adv is not None and step >= self.adv.start_step)

  def step_for_phase(self, phase: int):
    return functools.partial(self.step, adversarial_on=bool(phase))

  def step(self, parts, frozen, batch, rng, adversarial_on: bool = True):
    images = batch["images"]
    gen = parts[PART]
    critic = parts.get(DISC) if adversarial_on else None
    step = gen.optimizer.step[...]
    metrics, recon = self._generator_step(gen, critic, frozen.get(LPIPS),
                                          images, step, rng)
    if critic is not None:
      metrics.update(self._critic_step(critic, images, recon, step))
    if self.ema_decay:
      target = parts[EMA].model
      decay = ema_lib.decay_at(self.ema_decay, step)
      new = jax.tree.map(
          lambda e, p: (decay * e.astype(jnp.float32) + (1 - decay) *
                        p.astype(jnp.float32)).astype(e.dtype),
          nnx.state(target, nnx.Param), nnx.state(gen.model, nnx.Param))
      nnx.update(target, new)
    return metrics


def _decoder_slots(cfg: vqgan.VQConfig) -> list[tuple]:
  """A name for each of the decoder's blocks, in order: ("mid", i),
  ("res", level, i) or ("up", level)."""
  slots = [("mid", i) for i in range(cfg.mid_blocks(cfg.dec_res_blocks))]
  for level in reversed(range(len(cfg.dec_channel_mult))):
    slots += [("res", level, i) for i in range(cfg.dec_res_blocks[level])]
    if level > 0:
      slots.append(("up", level))
  return slots


def grow_decoder(model: vqgan.VQModel, trained: vqgan.VQModel) -> bool:
  """Starts a deeper decoder from a trained one of the same widths.

  Every block the trained decoder has is copied to the same place; the
  extra residual blocks keep their initialisation, whose zero last
  convolution makes each the identity, so the grown decoder starts out
  computing exactly the trained one's function and fine-tuning begins from
  its quality. Returns False (and leaves the fresh decoder) when the widths
  differ, or the trained decoder lacks a block at some level.
  """
  old, new = trained.config, model.config
  # Channel changes happen in each level's first block: the trained decoder
  # must have one at every level for the copy to be the same network.
  if (min(old.dec_res_blocks) < 1 or
      any(n < o for n, o in zip(new.dec_res_blocks, old.dec_res_blocks)) or
      new.mid_blocks(new.dec_res_blocks) < old.mid_blocks(old.dec_res_blocks)
      or old.dec_base_channels != new.dec_base_channels or
      old.dec_channel_mult != new.dec_channel_mult or
      old.patch_size != new.patch_size or old.quant_conv != new.quant_conv):
    return False
  old_slots = {s: i for i, s in enumerate(_decoder_slots(old))}
  for j, slot in enumerate(_decoder_slots(new)):
    if slot in old_slots:
      nnx.update(model.decoder.blocks[j],
                 nnx.state(trained.decoder.blocks[old_slots[slot]]))
  for name in ("conv_in", "norm_out", "conv_out", "post_quant_conv"):
    if getattr(trained.decoder, name) is not None:
      nnx.update(getattr(model.decoder, name),
                 nnx.state(getattr(trained.decoder, name)))
  return True


def _check_compatible(trained: vqgan.VQConfig, new: vqgan.VQConfig) -> None:
  """The fine-tuned model must keep the trained encoder and codebook."""
  keep = ("in_channels", "patch_size", "base_channels", "channel_mult",
          "num_res_blocks", "codebook_size", "code_dim", "quantizer",
          "conv_bias", "downsample", "shortcut", "encoder_out_kernel",
          "quant_conv", "local_encoder", "num_groups")
  bad = [k for k in keep if getattr(trained, k) != getattr(new, k)]
  if bad:
    raise ValueError(
        "decoder fine-tuning keeps the trained encoder and codebook, but the "
        "new tokenizer config changes " + ", ".join(
            f"{k} ({getattr(trained, k)!r} -> {getattr(new, k)!r})"
            for k in bad))


def codebook_usage_hook(images: Iterable[np.ndarray], part: str = PART,
                        grid: int = 0) -> loop_lib.EvalHook:
  """Codebook usage, perplexity and PSNR on fixed held-out image batches;
  with `grid` > 0, a reconstruction grid of that many images (TensorBoard).
  """
  batches = [jnp.asarray(b) for b in images]
  run = jax.jit(lambda m, x: m(x))

  def fn(step, models, frozen):
    del step, frozen
    model = models[part]
    ids, recons = [], []
    for b in batches:
      recon, aux = run(model, b)
      ids.append(np.asarray(aux["indices"]).ravel())
      recons.append(np.asarray(recon))
    ids = np.concatenate(ids)
    recon = np.concatenate(recons)
    originals = np.concatenate([np.asarray(b) for b in batches])
    rep = reconstruction.report(originals, recon, ids,
                                model.config.codebook_size)
    out = {"psnr": rep.psnr, "codebook_usage": rep.codebook_usage,
           "perplexity": rep.perplexity}
    if grid:
      # Originals above their reconstructions, uint8 [2, H, W*grid, C].
      rows = [np.concatenate(list(x[:grid]), axis=1)
              for x in (originals, recon)]
      out["images"] = {"reconstructions": vqgan.from_unit_range(
          np.stack(rows))}
    return out

  return loop_lib.EvalHook("heldout", fn)
