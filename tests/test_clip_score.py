"""CLIP score against open_clip: preprocessing, both towers, the loaders.

tests/golden/clip_score_golden.npz and tests/golden/clip_score_tiny/ come
from the reference `open_clip` package (scripts/make_clip_score_golden.py)
run on seeded random weights in OpenAI's layout; the tests rebuild the same
weights from the seeds (`clip_layout.random_state_dict`), write them as
torch files and load them as users load real ones. The tiny model also
comes as OpenAI ships CLIP (a TorchScript archive made by OpenAI's own
model code, float16 weights) and as a transformers CLIPModel directory.
"""

from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx
import jax
import numpy as np
import pytest

from muse_jax import sharding
from muse_jax.evaluation import clip_layout
from muse_jax.evaluation import clip_score
from muse_jax.interop import torch_files

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
GOLDEN = os.path.join(GOLDEN_DIR, "clip_score_golden.npz")
TINY_DIR = os.path.join(GOLDEN_DIR, "clip_score_tiny")
TINY_ARCH = os.path.join(TINY_DIR, "arch.json")
TINY_JIT = os.path.join(TINY_DIR, "openai_jit.pt")
TINY_TOKENIZER = os.path.join(GOLDEN_DIR, "clip_tiny")
SETS = ("64x64", "256x256", "200x300")
TOL = 1e-4  # The bound on embeddings; measured ~6e-6.


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


def _images(golden) -> list[np.ndarray]:
  return [golden[f"images_{s}"] for s in SETS]


def _pixels(golden, size: int) -> np.ndarray:
  return np.concatenate([clip_score.preprocess(x, size)
                         for x in _images(golden)])


def _model(arch, path) -> clip_score.CLIPModel:
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: clip_score.CLIPModel(arch,
                                                        rngs=nnx.Rngs(0)))
  return clip_score.load_weights(model, path)


def _features(model, pixels, ids):
  image = jax.jit(lambda m, x: m.encode_image(x))(model, pixels)
  text = jax.jit(lambda m, x: m.encode_text(x))(model, ids)
  return np.asarray(image), np.asarray(text)


def test_preprocess_matches_open_clip(golden):
  """PIL bicubic of the short side, centre crop, CLIP normalisation."""
  for s in SETS:  # Upsampled, downsampled, non-square (cropped).
    ours = clip_score.preprocess(golden[f"images_{s}"], 32)
    np.testing.assert_allclose(ours, golden[f"pixels_32_{s}"], atol=1e-6)


@pytest.mark.parametrize("path,key", [
    (TINY_JIT, "tiny/fp16_"),  # OpenAI's TorchScript format.
    (os.path.join(TINY_DIR, "hf"), "tiny/"),  # transformers' CLIPModel.
])
def test_tiny_model_files_match_open_clip(golden, path, key):
  model = _model(clip_layout.arch(TINY_ARCH), path)
  image, text = _features(model, _pixels(golden, 32), golden["tiny/ids"])
  assert np.abs(image - golden[key + "image_features"]).max() <= TOL
  assert np.abs(text - golden[key + "text_features"]).max() <= TOL
  if key == "tiny/":  # transformers' own outputs agree too.
    np.testing.assert_allclose(image, golden["hf_image_features"], atol=TOL)


@pytest.mark.parametrize("name,arch_name", [
    ("b32_2l", "ViT-B-32-quickgelu"), ("l14_2l_gelu", "ViT-L-14")])
def test_vit_b32_and_l14_match_open_clip(golden, tmp_path, name, arch_name):
  """The real towers' widths, patches and heads (two layers each; the
  full depth is `test_full_depth_matches_open_clip`), from an open_clip
  state dict file."""
  arch = dataclasses.replace(clip_layout.arch(arch_name), vision_layers=2,
                             text_layers=2)
  path = tmp_path / "open_clip_pytorch_model.bin"
  torch_files.save(clip_layout.random_state_dict(
      arch, int(golden[f"{name}/seed"])), path)
  model = _model(arch, tmp_path)  # The directory: its file is found.
  image, text = _features(model, _pixels(golden, 224), golden[f"{name}/ids"])
  assert np.abs(image - golden[f"{name}/image_features"]).max() <= TOL
  assert np.abs(text - golden[f"{name}/text_features"]).max() <= TOL


@pytest.mark.skipif(not os.environ.get("MUSE_JAX_CLIP_FULL_GOLDEN"),
                    reason="set MUSE_JAX_CLIP_FULL_GOLDEN to the --full "
                    "output of scripts/make_clip_score_golden.py")
def test_full_depth_matches_open_clip(tmp_path):
  with np.load(os.environ["MUSE_JAX_CLIP_FULL_GOLDEN"]) as g:
    full = {k: g[k] for k in g.files}
  pixels = np.concatenate([full[f"pixels_224_{s}"] for s in SETS])
  for name in ("b32_full", "l14_full"):
    arch = clip_layout.arch(str(full[f"{name}/arch"]))
    path = tmp_path / f"{name}.bin"
    torch_files.save(clip_layout.random_state_dict(
        arch, int(full[f"{name}/seed"])), path)
    image, text = _features(_model(arch, path), pixels, full["ids_full"])
    err = (np.abs(image - full[f"{name}/image_features"]).max(),
           np.abs(text - full[f"{name}/text_features"]).max())
    print(f"{name}: max abs image {err[0]:.2e}, text {err[1]:.2e}")
    assert max(err) <= TOL
    path.unlink()


def test_scorer_end_to_end_with_open_clip_tokens(golden):
  """Captions -> open_clip's token ids -> embeddings -> cosine, sharded
  over 8 devices, equal to the unsharded scorer."""
  config = clip_score.ScorerConfig(TINY_JIT, TINY_ARCH, TINY_TOKENIZER,
                                   batch_size=8)
  captions = [str(c) for c in golden["captions"]]
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  rules = sharding.validate_rules(sharding.DEFAULT_RULES, mesh)
  scorer = clip_score.CLIPScorer(config, mesh, rules)
  ids = clip_score.tokenize(scorer.tokenizer, captions, 77)
  np.testing.assert_array_equal(ids, golden["tiny/ids"])  # Long one cut.
  images = _images(golden)
  scores = np.concatenate([
      scorer.score(x, captions[lo:lo + len(x)])
      for x, lo in zip(images, np.cumsum([0, 3, 3]))])
  expected = clip_score.cosine(golden["tiny/fp16_image_features"],
                               golden["tiny/fp16_text_features"])
  np.testing.assert_allclose(scores, expected, atol=1e-5)
  assert np.all(np.abs(scores) <= 1)
  plain = clip_score.CLIPScorer(dataclasses.replace(config, batch_size=3))
  np.testing.assert_allclose(plain.text_embeds(captions),
                             scorer.text_embeds(captions), atol=1e-5)


@pytest.mark.skipif(not os.environ.get("MUSE_JAX_CLIP_BPE"),
                    reason="set MUSE_JAX_CLIP_BPE to OpenAI's "
                    "bpe_simple_vocab_16e6.txt.gz (in open_clip_torch)")
def test_full_vocabulary_tokens_match_open_clip(golden):
  from muse_jax.text_encoders import clip_tokenizer  # pylint: disable=g-import-not-at-top
  tok = clip_tokenizer.CLIPTokenizer(os.environ["MUSE_JAX_CLIP_BPE"])
  ids = clip_score.tokenize(tok, [str(c) for c in golden["captions"]], 77)
  np.testing.assert_array_equal(ids, golden["ids_full"])


def test_xla_cpu_impl_equals_plain(golden):
  """The CPU speed switch computes the same function (float32), and in
  bfloat16 stays close to it."""
  arch = clip_layout.arch(TINY_ARCH)
  pixels, ids = _pixels(golden, 32), golden["tiny/ids"]
  out = {}
  for impl, dtype in (("plain", "float32"), ("xla_cpu", "float32"),
                      ("xla_cpu", "bfloat16")):
    with nnx.use_eager_sharding(False):
      model = nnx.eval_shape(lambda: clip_score.CLIPModel(
          arch, rngs=nnx.Rngs(0), dtype=dtype, impl=impl))  # pylint: disable=cell-var-from-loop
    out[impl, dtype] = _features(clip_score.load_weights(model, TINY_JIT),
                                 pixels, ids)
  for ours, ref in zip(out["xla_cpu", "float32"], out["plain", "float32"]):
    np.testing.assert_allclose(ours, ref, atol=1e-5)
  for ours, ref in zip(out["xla_cpu", "bfloat16"], out["plain", "float32"]):
    assert np.min(clip_score.cosine(ours, ref)) > 0.99


def test_missing_weights_name_the_standard_file_and_flag(tmp_path):
  missing = str(tmp_path / "ViT-L-14.pt")
  with pytest.raises(FileNotFoundError) as e:
    clip_score.CLIPScorer(clip_score.ScorerConfig(missing))
  text = str(e.value)
  assert "ViT-L-14.pt" in text and "openaipublic" in text
  assert "--clip_path" in text and "--config.eval.clip_path" in text
  with pytest.raises(FileNotFoundError, match="open_clip_pytorch_model"):
    clip_score.CLIPScorer(clip_score.ScorerConfig(missing, "ViT-B-32"))


def test_bad_inputs_are_named(tmp_path):
  with pytest.raises(ValueError, match="unknown CLIP model 'ViT-X'"):
    clip_layout.arch("ViT-X")
  bad = tmp_path / "arch.json"
  bad.write_text(json.dumps({"embed_dim": 8, "colour": "red"}))
  with pytest.raises(ValueError, match="arch.json"):
    clip_layout.arch(str(bad))
  # A tiny file for ViT-B-32: every mismatch named, nothing read.
  with pytest.raises(ValueError, match="shape mismatch for 'visual.conv1"):
    _model(clip_layout.arch("ViT-B-32-quickgelu"), TINY_JIT)
  with pytest.raises(ValueError, match="uint8"):
    clip_score.preprocess(np.zeros((2, 8, 8, 3), np.float32), 32)
  config = clip_score.ScorerConfig(TINY_JIT, TINY_ARCH, TINY_TOKENIZER)
  scorer = clip_score.CLIPScorer(config)
  with pytest.raises(ValueError, match="2 images but 1 captions"):
    scorer.score(np.zeros((2, 32, 32, 3), np.uint8), ["a"])
