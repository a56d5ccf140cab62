"""Runs the stages of a Muse experiment in order, resumably.

Stages, each writing into `<workdir>/<stage>/` and marked finished by a
`done.json` (a re-run skips finished stages and resumes an interrupted one
from its newest checkpoint):

1. `data`: build the procedural shapes dataset (TFDS, array_record).
2. `tokenizer`: train the conv VQ tokenizer.
3. `tokenize`: VQ-encode every image and embed every distinct caption once
   with the frozen text encoder (arrays in .npz files).
4. `transformer`: train the base masked transformer on those arrays.
5. `evaluate`: sample validation and heldout prompts, score them with the
   shapes scorer, write `samples.png` and `metrics.json` in the workdir.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import json
import os
import time
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from muse_jax import checkpointing
from muse_jax import config_types
from muse_jax import sampling
from muse_jax import sharding
from muse_jax.data import pipeline
from muse_jax.data import shapes
from muse_jax.data import shapes_tfds
from muse_jax.evaluation import sample_grid
from muse_jax.evaluation import shapes_scorer
from muse_jax.models import text_encoder as text_lib
from muse_jax.models import transformer as transformer_lib
from muse_jax.models import vqgan
from muse_jax.trainers import common
from muse_jax.trainers import transformer as transformer_trainer

STAGES = ("data", "tokenizer", "tokenize", "transformer", "evaluate")
EVAL_SPLITS = ("validation", "heldout")


class Experiment:
  """One workdir, one config: builds components lazily and runs stages."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    check_workdir(self.workdir)
    self.mesh = sharding.make_mesh(config.mesh)
    self.rules = sharding.validate_rules(config.sharding_rules, self.mesh)
    self._text_encoder = None
    self.vq_config = config_types.dataclass_from_config(
        vqgan.VQConfig, config.tokenizer.model)
    if config.data.image_size % self.vq_config.downsample_factor:
      raise ValueError(
          f"data.image_size={config.data.image_size} is not divisible by the "
          f"tokenizer's downsample factor {self.vq_config.downsample_factor}")
    self.grid_size = config.data.image_size // self.vq_config.downsample_factor

  # Paths and bookkeeping -------------------------------------------------

  def stage_dir(self, stage: str) -> str:
    return os.path.join(self.workdir, stage)

  def is_done(self, stage: str) -> bool:
    return os.path.exists(os.path.join(self.stage_dir(stage), "done.json"))

  def done_info(self, stage: str) -> dict[str, Any]:
    with open(os.path.join(self.stage_dir(stage), "done.json")) as f:
      return json.load(f)

  def _mark_done(self, stage: str, info: dict[str, Any]) -> None:
    _write_json(os.path.join(self.stage_dir(stage), "done.json"), info)

  def run(self, stages: Sequence[str] = STAGES) -> dict[str, Any]:
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
      raise ValueError(f"unknown stages {unknown}; known: {STAGES}")
    if jax.process_index() == 0:
      _write_json(os.path.join(self.workdir, "config.json"),
                  json.loads(self.config.to_json()))
    fns: dict[str, Callable[[], dict[str, Any]]] = {
        "data": self.build_data, "tokenizer": self.train_tokenizer,
        "tokenize": self.tokenize, "transformer": self.train_transformer,
        "evaluate": self.evaluate}
    infos = {}
    for i, stage in enumerate(stages):
      if self.is_done(stage):
        print(f"== stage {i + 1}/{len(stages)} {stage}: already done, "
              "skipping", flush=True)
        infos[stage] = self.done_info(stage)
        continue
      print(f"== stage {i + 1}/{len(stages)} {stage}", flush=True)
      os.makedirs(self.stage_dir(stage), exist_ok=True)
      t0 = time.perf_counter()
      info = fns[stage]()
      info["wall_s"] = time.perf_counter() - t0
      self._mark_done(stage, info)
      infos[stage] = info
      print(f"== stage {stage} done in {info['wall_s']:.1f}s", flush=True)
    return infos

  # Components ------------------------------------------------------------

  @property
  def data_dir(self) -> str:
    return self.config.data.data_dir or self.stage_dir("data")

  def builder(self):
    d = self.config.data
    return shapes_tfds.build_shapes(
        self.data_dir, config_name=f"s{d.image_size}", num_train=d.num_train,
        num_validation=d.num_validation, num_heldout=d.num_heldout,
        seed=d.seed)

  def text_encoder(self) -> text_lib.TextEncoder:
    if self._text_encoder is None:
      t = self.config.text_encoder
      self._text_encoder = text_lib.TextEncoder(
          t.path or None, max_len=t.max_len, batch_size=t.batch_size)
    return self._text_encoder

  def make_vq(self, seed: int = 0) -> vqgan.VQModel:
    return vqgan.VQModel(self.vq_config, rngs=nnx.Rngs(seed))

  def transformer_config(self) -> transformer_lib.TransformerConfig:
    return config_types.dataclass_from_config(
        transformer_lib.TransformerConfig, self.config.transformer.model,
        codebook_size=self.vq_config.codebook_size, grid_size=self.grid_size,
        text_dim=self.text_dim)

  @functools.cached_property
  def text_dim(self) -> int:
    """Width of the text encoder's embeddings (read once from its config)."""
    path = self.config.text_encoder.path or text_lib.default_minilm_path()
    return text_lib.MiniLMConfig.from_hf_config(path).hidden_size

  def make_transformer(self, seed: int = 0) -> transformer_lib.MaskedTransformer:
    return transformer_lib.MaskedTransformer(
        self.transformer_config(), rngs=nnx.Rngs(seed))

  def load(self, stage: str, make: Callable[[], nnx.Module]) -> nnx.Module:
    """The trained model of a finished training stage, sharded per rules."""
    model = sharding.create_sharded(make, self.mesh, self.rules)
    return checkpointing.restore_model(
        os.path.join(self.stage_dir(stage), "checkpoints"), model)

  # Stages ----------------------------------------------------------------

  def build_data(self) -> dict[str, Any]:
    builder = self.builder()
    return {"splits": {s: len(shapes_tfds.shapes_source(builder, s))
                       for s in shapes.SPLITS},
            "data_dir": self.data_dir}

  def train_tokenizer(self) -> dict[str, Any]:
    t = self.config.tokenizer
    source = shapes_tfds.shapes_source(self.builder(), "train")
    key = shapes.image_key(self.config.data.image_size)
    data = pipeline.make_iterator(
        source, batch_size=t.batch_size, seed=self.config.seed)
    data = BatchMap(data, lambda b: {"images": to_unit_range(b[key])})

    def loss_fn(model, batch, rng):
      del rng
      return vqgan.vq_loss(model, batch["images"])

    _, summary = common.train(
        stage="tokenizer", workdir=self.stage_dir("tokenizer"),
        make_model=self.make_vq,
        optimizer=config_types.dataclass_from_config(
            common.OptimizerConfig, t.optimizer),
        loss_fn=loss_fn, data=data,
        loop=config_types.dataclass_from_config(
            common.LoopConfig, t.loop, seed=self.config.seed),
        mesh=self.mesh, rules=self.rules)
    return summary

  def tokenize(self) -> dict[str, Any]:
    vq = self.load("tokenizer", self.make_vq)
    encode = jax.jit(lambda m, x: m.encode_to_indices(x))
    builder = self.builder()
    key = shapes.image_key(self.config.data.image_size)
    out_dir = self.stage_dir("tokenize")
    bs = self.config.eval.batch_size * 4
    info = {}
    for split in shapes.SPLITS:
      source = shapes_tfds.shapes_source(builder, split)
      n = len(source)
      tokens, captions, scene_types, images_bytes = [], [], [], 0
      for start in range(0, n, bs):
        recs = [source[i] for i in range(start, min(n, start + bs))]
        imgs = np.stack([r[key] for r in recs])
        images_bytes += imgs.nbytes
        padded = _pad_rows(imgs, bs)
        idx = np.asarray(encode(vq, to_unit_range(padded)))[:len(recs)]
        tokens.append(idx.reshape(len(recs), -1).astype(np.int32))
        captions += [_as_str(r["caption"]) for r in recs]
        scene_types += [int(r["scene_type"]) for r in recs]
      unique, caption_index = np.unique(np.asarray(captions), return_inverse=True)
      t0 = time.perf_counter()
      emb, mask = self.text_encoder().encode(list(unique))
      text_s = time.perf_counter() - t0
      np.savez(os.path.join(out_dir, f"{split}.npz"),
               tokens=np.concatenate(tokens),
               caption_index=caption_index.astype(np.int32),
               scene_type=np.asarray(scene_types, np.int32),
               captions=unique, text_emb=emb.astype(np.float16),
               text_mask=mask)
      info[split] = {"examples": n, "unique_captions": int(len(unique)),
                     "text_encode_s": text_s}
      print(f"[tokenize] {split}: {n} images, {len(unique)} distinct "
            f"captions embedded in {text_s:.1f}s", flush=True)
    return info

  def load_tokens(self, split: str) -> dict[str, np.ndarray]:
    path = os.path.join(self.stage_dir("tokenize"), f"{split}.npz")
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}

  def train_transformer(self) -> dict[str, Any]:
    t = self.config.transformer
    arrays = self.load_tokens("train")
    emb = arrays["text_emb"]
    tmask = arrays["text_mask"]
    source = pipeline.ArraySource({
        "tokens": arrays["tokens"], "caption_index": arrays["caption_index"]})
    data = pipeline.make_iterator(
        source, batch_size=t.batch_size, seed=self.config.seed + 1)
    data = BatchMap(data, lambda b: {
        "tokens": b["tokens"],
        "text_emb": emb[b["caption_index"]].astype(np.float32),
        "text_mask": tmask[b["caption_index"]]})
    objective = config_types.dataclass_from_config(
        transformer_trainer.ObjectiveConfig, t.objective)
    _, summary = common.train(
        stage="transformer", workdir=self.stage_dir("transformer"),
        make_model=self.make_transformer,
        optimizer=config_types.dataclass_from_config(
            common.OptimizerConfig, t.optimizer),
        loss_fn=transformer_trainer.make_loss_fn(objective), data=data,
        loop=config_types.dataclass_from_config(
            common.LoopConfig, t.loop, seed=self.config.seed),
        mesh=self.mesh, rules=self.rules)
    return summary

  def sampler_config(self) -> sampling.SamplerConfig:
    return config_types.dataclass_from_config(
        sampling.SamplerConfig, self.config.sampling)

  def generate(self, prompts: Sequence[str], *, seed: int = 0,
               models: tuple[nnx.Module, nnx.Module] | None = None,
               negative_prompt: str | None = None) -> np.ndarray:
    """Images uint8 [N, S, S, 3] for `prompts` with the trained models."""
    vq, model = models or (self.load("tokenizer", self.make_vq),
                           self.load("transformer", self.make_transformer))
    cfg = self.sampler_config()
    bs = self.config.eval.batch_size
    emb, mask = self.text_encoder().encode(list(prompts))
    neg = None
    if negative_prompt is not None:
      neg = self.text_encoder().encode([negative_prompt])
    decode = jax.jit(lambda m, t: m.decode_from_indices(t))
    out = []
    for start in range(0, len(prompts), bs):
      rows = min(bs, len(prompts) - start)
      e = _pad_rows(emb[start:start + bs], bs)
      m = _pad_rows(mask[start:start + bs], bs)
      kw = {}
      if neg is not None:
        kw = dict(neg_emb=jnp.broadcast_to(neg[0], e.shape),
                  neg_mask=jnp.broadcast_to(neg[1], m.shape))
      rng = jax.random.fold_in(jax.random.key(seed), start)
      tokens = sampling.sample(model, rng, e, m, cfg=cfg, **kw)
      grid = tokens.reshape(bs, self.grid_size, self.grid_size)
      images = np.asarray(decode(vq, grid))[:rows]
      out.append(from_unit_range(images))
    return np.concatenate(out)

  def evaluate(self) -> dict[str, Any]:
    e = self.config.eval
    vq = self.load("tokenizer", self.make_vq)
    model = self.load("transformer", self.make_transformer)
    metrics: dict[str, Any] = {}
    grid_images, grid_captions = [], []
    per_split = {"validation": e.num_validation, "heldout": e.num_heldout}
    sample_s = 0.0
    for split in EVAL_SPLITS:
      arrays = self.load_tokens(split)
      n = min(per_split[split], len(arrays["caption_index"]))
      prompts = [str(arrays["captions"][i]) for i in
                 arrays["caption_index"][:n]]
      types = arrays["scene_type"][:n]
      t0 = time.perf_counter()
      images = self.generate(prompts, seed=self.config.seed,
                             models=(vq, model))
      sample_s += time.perf_counter() - t0
      scores = [shapes_scorer.score(img, p) for img, p in zip(images, prompts)]
      metrics[split] = shapes_scorer.aggregate(scores, types)
      metrics[split]["num_prompts"] = n
      take = e.grid_prompts // len(EVAL_SPLITS)
      grid_images += list(images[:take])
      grid_captions += [
          f"{'[heldout] ' if split == 'heldout' else ''}{p}"
          f"{'' if s['correct'] else ' (x)'}"
          for p, s in zip(prompts[:take], scores[:take])]
      print(f"[evaluate] {split}: " + ", ".join(
          f"{k} {v:.3f}" for k, v in sorted(metrics[split].items())
          if k.startswith("accuracy")), flush=True)
    sample_grid.save_grid(os.path.join(self.workdir, "samples.png"),
                          grid_images, grid_captions)
    num_images = sum(metrics[s]["num_prompts"] for s in EVAL_SPLITS)
    metrics["sampling"] = {"images": num_images, "wall_s": sample_s,
                           "images_per_s": num_images / sample_s}
    timings = {s: self.done_info(s)["wall_s"] for s in STAGES[:-1]
               if self.is_done(s)}
    metrics["timings_s"] = timings
    metrics["devices"] = [str(d) for d in jax.devices()]
    _write_json(os.path.join(self.workdir, "metrics.json"), metrics)
    return {"metrics": metrics}


class BatchMap:
  """Applies `fn` to each batch; forwards the checkpointable state."""

  def __init__(self, iterator, fn: Callable[[dict], dict]):
    self._it = iterator
    self._fn = fn

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return self._fn(next(self._it))

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._it.set_state(state)


def to_unit_range(images: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images.astype(np.float32) / 127.5 - 1.0


def from_unit_range(images: np.ndarray) -> np.ndarray:
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  if x.shape[0] == rows:
    return x
  pad = np.repeat(x[-1:], rows - x.shape[0], axis=0)
  return np.concatenate([x, pad])


def _as_str(x: Any) -> str:
  return x.decode() if isinstance(x, bytes) else str(x)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_workdir(workdir: str) -> None:
  """Fails early, naming the directory, if it cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(
        f"workdir {workdir!r} is not writable: {e.strerror or e}") from e
