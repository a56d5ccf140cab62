"""The tokenizer pipeline end to end at smoke size (configs/photos_tokenizer
tiny): photo crops -> VQGAN tokenizer (adversarial phase switching on at
step 2) -> decoder fine-tuning -> evaluation against k-means."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image
import pytest

from configs import photos_tokenizer
from muse_jax import stages
from muse_jax.stages import artifacts


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("photos")
  config = photos_tokenizer.get_config("tiny")
  graph = stages.build(config, workdir)
  infos = graph.run()
  return graph, infos


def test_every_stage_runs_and_publishes(finished):
  graph, infos = finished
  assert list(infos) == ["data", "tokenizer", "tokenizer_decoder",
                         "tokenizer_eval"]
  metrics = json.loads((graph.workdir / "tokenizer_metrics.json").read_text())
  for method in ("tokenizer", "finetuned_decoder", "kmeans"):
    rep = metrics[method]
    assert rep["num_images"] == 16 and rep["codebook_size"] == 32
    assert 0 < rep["codebook_usage"] <= 1 and rep["perplexity"] >= 1
    assert np.isfinite(rep["psnr"])
  assert metrics["finetune_checks"] == {"encoder_unchanged": True,
                                        "codebook_unchanged": True,
                                        "tokens_identical": True}
  gain = metrics["psnr_gain_over_kmeans_db"]["tokenizer"]
  assert gain == pytest.approx(metrics["tokenizer"]["psnr"] -
                               metrics["kmeans"]["psnr"])
  grid = np.asarray(Image.open(graph.workdir / "reconstructions.png"))
  assert grid.ndim == 3 and grid.shape[0] > 4 * 64


def test_tokenizer_switched_to_the_adversarial_phase(finished):
  graph, _ = finished
  lines = (graph.stage_dir("tokenizer") / "metrics.jsonl").read_text()
  logged = [json.loads(l) for l in lines.splitlines()]
  by_step = {r["step"]: r for r in logged if "loss" in r}
  # start_step=2 in the tiny config: step 2 ran without the discriminator,
  # step 4 with it.
  assert "disc/disc_loss" not in by_step[2]
  assert "disc/disc_loss" in by_step[4]


def test_finetuned_tokenizer_has_the_larger_decoder(finished):
  graph, _ = finished
  cfg = artifacts.decoder_vq_config(graph.config)
  assert cfg.dec_base_channels == 12
  assert cfg.base_channels == artifacts.vq_config(graph.config).base_channels
