"""The trained models of finished stages: their configs, and loading them.

Later stages, evaluation and the sample CLI rebuild a stage's model from
the experiment config (the typed dataclass of its section) and read its
weights from the stage's Orbax checkpoint, shape-first: the abstract model
carries its shardings and the restore places every array there, so no
random init is paid and no host holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable

from etils import epath
from flax import nnx
import ml_collections

from muse_jax import checkpointing
from muse_jax import config_types
from muse_jax import sharding
from muse_jax import text_encoders
from muse_jax.models import superres
from muse_jax.models import transformer as transformer_lib
from muse_jax.models import vqgan
from muse_jax.tasks import masked_transformer
from muse_jax.tasks import vq as vq_task


def vq_config(config: ml_collections.ConfigDict) -> vqgan.VQConfig:
  return config_types.dataclass_from_config(vqgan.VQConfig,
                                            config.tokenizer.model)


def decoder_section(config: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """The `tokenizer_decoder` section completed from `tokenizer`: its
  `model` keys override the trained tokenizer's (the larger decoder), and
  every other key it leaves out (loss, adversarial, ...) is the
  tokenizer's."""
  merged = ml_collections.ConfigDict(config.tokenizer.to_dict())
  for key, value in config.tokenizer_decoder.items():
    if key == "model":
      merged.model.update(value.to_dict())
    elif isinstance(value, ml_collections.ConfigDict):
      merged[key] = ml_collections.ConfigDict(value.to_dict())
    else:
      merged[key] = value
  return merged


def decoder_vq_config(config: ml_collections.ConfigDict) -> vqgan.VQConfig:
  """The fine-tuned tokenizer's config (trained encoder, larger decoder)."""
  return config_types.dataclass_from_config(
      vqgan.VQConfig, decoder_section(config).model)


def vq_part(section: ml_collections.ConfigDict) -> str:
  """The checkpoint part to load: the weights' EMA when one was kept."""
  return vq_task.EMA if section.get("ema_decay", 0.0) else vq_task.PART


def grid_size(config: ml_collections.ConfigDict) -> int:
  """Image tokens per side: data.image_size / the tokenizer's factor."""
  f = vq_config(config).downsample_factor
  if config.data.image_size % f:
    raise ValueError(
        f"data.image_size={config.data.image_size} is not divisible by the "
        f"tokenizer's downsample factor {f}")
  return config.data.image_size // f


def transformer_config(config: ml_collections.ConfigDict
                       ) -> transformer_lib.TransformerConfig:
  """The base transformer's config; codebook, grid and text width follow
  the tokenizer, the image size and the text encoder."""
  return config_types.dataclass_from_config(
      transformer_lib.TransformerConfig, config.transformer.model,
      codebook_size=vq_config(config).codebook_size,
      grid_size=grid_size(config),
      text_dim=text_encoders.embedding_dim(
          text_encoders.config_from(config.text_encoder)))


def sr_vq_config(config: ml_collections.ConfigDict) -> vqgan.VQConfig:
  """The super-res (high-res) tokenizer's config."""
  return config_types.dataclass_from_config(vqgan.VQConfig,
                                            config.sr_tokenizer.model)


def sr_grid_size(config: ml_collections.ConfigDict) -> int:
  """High-res tokens per side: data.sr_image_size / its tokenizer's factor."""
  size = int(config.data.get("sr_image_size", 0) or 0)
  if not size:
    raise ValueError("a super-res stage needs data.sr_image_size")
  f = sr_vq_config(config).downsample_factor
  if size % f:
    raise ValueError(
        f"data.sr_image_size={size} is not divisible by the super-res "
        f"tokenizer's downsample factor {f}")
  return size // f


def superres_configs(config: ml_collections.ConfigDict
                     ) -> tuple[transformer_lib.TransformerConfig,
                                superres.LowResConfig]:
  """The super-res transformer's config (grid and codebook of the high-res
  tokenizer) and its low-res condition's (the base tokenizer's)."""
  s = config.superres
  model = config_types.dataclass_from_config(
      transformer_lib.TransformerConfig, s.model,
      codebook_size=sr_vq_config(config).codebook_size,
      grid_size=sr_grid_size(config),
      text_dim=text_encoders.embedding_dim(
          text_encoders.config_from(config.text_encoder)))
  lowres = superres.LowResConfig(
      codebook_size=vq_config(config).codebook_size,
      grid_size=grid_size(config), depth=s.lowres_depth,
      aligned=bool(s.get("lowres_aligned", False)))
  return model, lowres


def load(make: Callable[[], nnx.Module], directory: epath.PathLike,
         part: str, env) -> nnx.Module:
  """`make()`'s module with the weights of `part` in a stage's checkpoints,
  sharded per the env's rules."""
  graphdef, abstract, _ = sharding.abstract_state(make, env.mesh, env.rules)
  model = nnx.merge(graphdef, abstract)
  return checkpointing.restore_model(epath.Path(directory) / "checkpoints",
                                     model, part)


def load_vq(config, tokenizer_dir: epath.PathLike, env,
            cfg: vqgan.VQConfig | None = None, part: str | None = None
            ) -> vqgan.VQModel:
  """A trained tokenizer (`cfg` defaults to `tokenizer.model`; `part` to
  its EMA when the tokenizer kept one)."""
  cfg = cfg or vq_config(config)
  return load(lambda: vqgan.VQModel(cfg, rngs=nnx.Rngs(0)), tokenizer_dir,
              part or vq_part(config.tokenizer), env)


def load_sr_vq(config, sr_tokenizer_dir: epath.PathLike, env
               ) -> vqgan.VQModel:
  """The trained super-res tokenizer (its EMA when it kept one)."""
  cfg = sr_vq_config(config)
  return load(lambda: vqgan.VQModel(cfg, rngs=nnx.Rngs(0)), sr_tokenizer_dir,
              vq_part(config.sr_tokenizer), env)


def load_superres(config, superres_dir: epath.PathLike, env
                  ) -> superres.SuperResTransformer:
  model, lowres = superres_configs(config)
  return load(lambda: superres.SuperResTransformer(model, lowres,
                                                   rngs=nnx.Rngs(0)),
              superres_dir, masked_transformer.PART, env)


def load_transformer(config, transformer_dir: epath.PathLike, env
                     ) -> transformer_lib.MaskedTransformer:
  cfg = transformer_config(config)
  return load(lambda: transformer_lib.MaskedTransformer(cfg,
                                                        rngs=nnx.Rngs(0)),
              transformer_dir, masked_transformer.PART, env)
