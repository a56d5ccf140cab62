"""The tokenizer benchmark's own side on a tiny config, and its ratios."""

from __future__ import annotations

from benchmarks import tokenizer_ours
from muse_jax.interop import diffusers_vq_layout as layout

TINY = dict(layout.AMUSED_CONFIG, block_out_channels=[32, 64],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
            latent_channels=8, vq_embed_dim=None, num_vq_embeddings=64)


def test_ours_encode_and_decode_records():
  records = tokenizer_ours.bench(TINY, name="tiny", batch=2, size=16,
                                 repeats=2, device="cpu: test")
  assert [r["what"] for r in records] == ["encode", "decode"]
  for r in records:
    assert r["impl"] == "muse_jax" and r["config"] == "tiny"
    assert r["batch"] == 2 and r["image_size"] == 16 and r["repeats"] == 2
    assert r["tokens_per_image"] == 64 and r["dtype"] == "float32"
    assert r["images_per_s"] > 0 and r["flops"] > 0
    assert r["first_call_s"] is not None and r["compile_s"] > 0
  peer = [dict(r, impl="diffusers-vqmodel",
               images_per_s=r["images_per_s"] / 2) for r in records]
  ratios = tokenizer_ours.ratio_records(records + peer + [
      dict(what="meta", impl="bench-tokenizer")])
  assert [(r["what"], r["peer"]) for r in ratios] == [
      ("encode", "diffusers-vqmodel"), ("decode", "diffusers-vqmodel")]
  assert all(abs(r["ratio"] - 2.0) < 1e-9 for r in ratios)
