"""Stage `tokenizer_eval`: the trained tokenizers against a k-means codebook.

On fixed held-out images (crops of photographs never seen in training, for
the photos source) it reports, for the trained tokenizer and its
fine-tuned decoder: PSNR, codebook usage and perplexity
(`evaluation.reconstruction`, one definition for every method), and for
reference a k-means codebook of the same size fitted to raw f x f patches
of the same training crops (`evaluation.kmeans_baseline`), the per-patch
mean colour and a bilinear down/up-sample. It also checks what decoder
fine-tuning promises: encoder and codebook bit-for-bit unchanged, identical
tokens. Process 0 writes `tokenizer_metrics.json` and
`reconstructions.png` (rows: original, k-means, tokenizer, fine-tuned
decoder) here and publishes both in the workdir.
"""

from __future__ import annotations

import json
from typing import Any

from flax import nnx
import jax
import numpy as np

from muse_jax import distributed
from muse_jax.evaluation import kmeans_baseline
from muse_jax.evaluation import reconstruction
from muse_jax.evaluation import sample_grid
from muse_jax.models import vqgan
from muse_jax.stages import artifacts
from muse_jax.stages import data as data_stage
from muse_jax.stages import graph

PUBLISHED = ("tokenizer_metrics.json", "reconstructions.png")
SECTION = "tokenizer_eval"


def _reconstruct(model: vqgan.VQModel, images: np.ndarray, batch: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  run = nnx.jit(lambda m, x: m(x))
  recons, ids = [], []
  for i in range(0, len(images), batch):
    recon, aux = run(model, images[i:i + batch])
    recons.append(np.asarray(recon))
    ids.append(np.asarray(aux["indices"]))
  return np.concatenate(recons), np.concatenate(ids)


def _same_params(a: nnx.Module, b: nnx.Module) -> bool:
  la = jax.tree.leaves(nnx.state(a, nnx.Param))
  lb = jax.tree.leaves(nnx.state(b, nnx.Param))
  return len(la) == len(lb) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


class TokenizerEval(graph.Stage):
  name = "tokenizer_eval"
  reads = ("data", "tokenizer", "tokenizer_decoder")
  config_keys = ("seed", SECTION)

  def check(self, config) -> None:
    e = config[SECTION]
    for key in ("num_images", "batch_size", "grid_images",
                "kmeans_train_crops"):
      if e[key] < 1:
        raise ValueError(f"{SECTION}.{key} must be >= 1, got {e[key]}")

  def run(self, run: graph.StageRun) -> dict[str, Any]:
    config, e, env = run.config, run.config[SECTION], run.env
    images = vqgan.to_unit_range(data_stage.heldout_images(
        config, run.inputs["data"], e.num_images))
    trained = artifacts.load_vq(config, run.inputs["tokenizer"], env)
    tuned = artifacts.load_vq(
        config, run.inputs["tokenizer_decoder"], env,
        cfg=artifacts.decoder_vq_config(config),
        part=artifacts.vq_part(artifacts.decoder_section(config)))
    rec_a, ids_a = _reconstruct(trained, images, e.batch_size)
    rec_b, ids_b = _reconstruct(tuned, images, e.batch_size)
    k = trained.config.codebook_size
    f = trained.config.downsample_factor
    metrics: dict[str, Any] = {
        "num_images": int(len(images)),
        "tokenizer": reconstruction.report(images, rec_a, ids_a,
                                           k).as_dict(),
        "finetuned_decoder": reconstruction.report(images, rec_b, ids_b,
                                                   k).as_dict(),
        "finetune_checks": {
            "encoder_unchanged": _same_params(trained.encoder,
                                              tuned.encoder),
            "codebook_unchanged": _same_params(trained.quantizer,
                                               tuned.quantizer),
            "tokens_identical": bool(np.array_equal(ids_a, ids_b)),
        },
    }
    train = vqgan.to_unit_range(data_stage.training_images(
        config, run.inputs["data"], e.kmeans_train_crops))
    codebook, stats = kmeans_baseline.fit(train, kmeans_baseline.KMeansConfig(
        codebook_size=k, patch_size=f, seed=config.seed,
        max_fit_patches=e.get("kmeans_max_fit_patches", None)))
    kmeans_rec = codebook.decode(codebook.encode(images))
    metrics["kmeans"] = dict(
        kmeans_baseline.evaluate(codebook, images).as_dict(),
        train_crops=int(len(train)), fit_seconds=stats.fit_seconds,
        iterations=stats.iterations)
    metrics["patch_mean"] = reconstruction.report(
        images, kmeans_baseline.patch_mean_reconstruction(images, f)).as_dict()
    metrics["bilinear"] = reconstruction.report(
        images, kmeans_baseline.bilinear_reconstruction(images, f)).as_dict()
    metrics["psnr_gain_over_kmeans_db"] = {
        "tokenizer": metrics["tokenizer"]["psnr"] - metrics["kmeans"]["psnr"],
        "finetuned_decoder": (metrics["finetuned_decoder"]["psnr"] -
                              metrics["kmeans"]["psnr"])}
    if distributed.is_leader():
      n = min(e.grid_images, len(images))
      rows = [images[:n], kmeans_rec[:n], rec_a[:n], rec_b[:n]]
      names = ["original", "k-means", "tokenizer", "fine-tuned decoder"]
      tiles = [vqgan.from_unit_range(r[i]) for r in rows for i in range(n)]
      captions = [names[j] if i == 0 else "" for j in range(4)
                  for i in range(n)]
      sample_grid.save_grid(str(run.dir / "reconstructions.png"), tiles,
                            captions, columns=n)
      (run.dir / "tokenizer_metrics.json").write_text(
          json.dumps(metrics, indent=1))
      for name in PUBLISHED:
        (run.workdir / name).write_bytes((run.dir / name).read_bytes())
    distributed.barrier("tokenizer-eval-written")
    return metrics
