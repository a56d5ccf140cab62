"""The super-res benchmark's own side on tiny sizes, and its ratios."""

from __future__ import annotations

import dataclasses

from benchmarks import configs
from benchmarks import superres

TINY = dataclasses.replace(configs.get("tiny"), name="SR-tiny", grid_size=8,
                           depth=1, sample_steps=2)


def test_ours_sample_record_and_ratio_to_a_peer():
  rec = superres.bench_sample(TINY, lowres_grid=2, lowres_depth=1,
                              device="cpu: test", repeats=1,
                              forward_repeats=1, warmup_steps=1)
  assert rec["impl"] == "muse_jax" and rec["what"] == "sample_superres"
  assert rec["batch"] == TINY.batch and rec["steps"] == 2
  assert rec["grid_size"] == 8 and rec["lowres_grid"] == 2
  assert rec["lowres_depth"] == 1 and rec["context_len"] == TINY.text_len + 4
  assert rec["forward_batch"] == 2 * TINY.batch
  assert rec["images_per_s"] > 0 and rec["flops_matmul"] > 0
  assert rec["first_call_s"] is not None and rec["compile_s"] > 0
  assert rec["device"] == "cpu: test" and rec["warmup_steps"] == 1
  peer = dict(impl="lucidrains-muse-maskgit-superres", what="sample_superres",
              images_per_s=rec["images_per_s"] / 2)
  ratios = superres.ratio_records([rec, peer, dict(what="meta")])
  assert len(ratios) == 1
  assert abs(ratios[0]["ratio"] - 2.0) < 1e-9 and ratios[0]["met"]
  assert ratios[0]["lowres_depth"] == 1
  # A depth whose sampler was not run: estimated from the context times.
  ctx = [dict(what="context", lowres_depth=d, median_s=m)
         for d, m in ((1, 0.0), (16, rec["median_s"]))]
  est = superres.ratio_records([rec, peer] + ctx)[1]
  assert est["estimated"] and est["lowres_depth"] == 16
  assert abs(est["ratio"] - 1.0) < 1e-9 and not est["met"]


def test_multi_axis_and_full_attention_records():
  cfg = dataclasses.replace(TINY, batch=1)
  recs = [superres.bench_attention(cfg, lowres_grid=2, self_attention=kind,
                                   window=4, device="cpu: test", repeats=1,
                                   sample_memory=False)
          for kind in ("multi_axis", "full")]
  ma, full = recs
  assert ma["self_attention_keys_per_query"] == 16
  assert full["self_attention_keys_per_query"] == 64
  assert ma["forward_batch"] == full["forward_batch"] == 2
  assert full["score_bytes_per_layer"] == 4 * ma["score_bytes_per_layer"]
  for r in recs:
    assert r["median_s"] > 0 and r["step_xla_temp_bytes"] >= 0
    increase = r["step_peak_rss_increase_bytes"]
    assert increase is None or increase >= 0
  assert "sample_xla_temp_bytes" not in full
  (ratio,) = superres.ratio_records(recs)
  assert ratio["what"] == "attention_step" and ratio["time_ratio"] > 0
  assert ratio["score_per_layer_ratio"] == 4
