"""MaskGIT VQGAN import (`muse_jax.interop.maskgit_vq`) against MaskGIT's code.

tests/golden/maskgit_vq_small.npz comes from google-research/maskgit's own
linen `VQVAE` (scripts/make_maskgit_vq_golden.py): a small tokenizer of the
released structure, its parameter tree and its tokens and reconstructions of
ten images. Converted into our `VQModel`, the tree must give the same tokens
and the same decoder output; a broken name mapping must not.
"""

from __future__ import annotations

import functools
import os

from flax import nnx
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.interop import maskgit_vq
from muse_jax.interop import vq_checkpoint

GOLDEN = os.path.join(os.path.dirname(__file__), "golden",
                      "maskgit_vq_small.npz")


def _nest(flat: dict[str, np.ndarray]) -> dict:
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    data = {k: g[k] for k in g.files}
  params = {k[len("param/"):]: (data[k].astype(np.float32)
                                * data["scale/" + k[len("param/"):]])
            for k in data if k.startswith("param/")}
  return data, params


@pytest.fixture(scope="module")
def converted(golden):
  _, params = golden
  return maskgit_vq.convert({"params": _nest(params)})


@pytest.fixture(scope="module")
def forward(converted):
  """(run, params): run(params, images) -> (indices, decoded, latents), one
  compiled program for every set of our params."""
  cfg, flat = converted
  model = vq_checkpoint.to_model(cfg, flat, source="golden")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(params, images):
    m = nnx.merge(graphdef, params, rest)
    latents = m.encode(images)
    _, indices, _ = m.quantize(latents)
    # Our model speaks [-1, 1]; MaskGIT's network [0, 1] (pixel_range).
    decoded = (m.decode_from_indices(indices, clip=False) + 1) / 2
    return indices, decoded, latents

  return run, params


def _images(u8: np.ndarray) -> jnp.ndarray:
  # MaskGIT's input is u8 / 255 in [0, 1]; ours is the same in [-1, 1].
  return jnp.asarray(u8, jnp.float32) / 127.5 - 1.0


def _with(params: nnx.State, flat: dict[str, np.ndarray]) -> nnx.State:
  """`params` with every leaf replaced by `flat`'s array at its path."""
  pure = nnx.to_pure_dict(params)

  def put(node, prefix):
    for k, v in node.items():
      path = f"{prefix}{k}"
      if isinstance(v, dict):
        put(v, path + "/")
      else:
        node[k] = jnp.asarray(flat[path])

  put(pure, "")
  out = jax.tree.map(lambda x: x, params)
  nnx.replace_by_pure_dict(out, pure)
  return out


def test_infers_the_architecture(converted, golden):
  cfg, flat = converted
  assert (cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks,
          cfg.code_dim, cfg.codebook_size) == (32, (1, 2, 2), 2, 16, 64)
  assert (cfg.quantizer, cfg.conv_bias, cfg.downsample, cfg.shortcut,
          cfg.encoder_out_kernel, cfg.num_groups) == (
              "euclidean", False, "avg_pool", "branch", 1, 32)
  _, params = golden
  assert len(flat) == len(params)
  # The config path gives the same result.
  vqvae = dict(filters=32, channel_multipliers=[1, 2, 2], num_res_blocks=2,
               embedding_dim=16, codebook_size=64, conv_downsample=False,
               norm_type="GN", activation_fn="swish", quantizer="vq")
  cfg2, flat2 = maskgit_vq.convert({"params": _nest(params)},
                                   {"vqvae": vqvae})
  assert cfg2 == cfg and flat2.keys() == flat.keys()


def test_matches_maskgit_tokens_and_reconstructions(forward, golden):
  run, params = forward
  data, _ = golden
  assert len(data["images_a"]) + len(data["images_b"]) >= 8
  for part in "ab":
    indices, decoded, latents = run(params, _images(data[f"images_{part}"]))
    np.testing.assert_array_equal(np.asarray(indices),
                                  data[f"indices_{part}"])
    np.testing.assert_allclose(np.asarray(decoded), data[f"decoded_{part}"],
                               atol=1e-5, rtol=0)
    if part == "a":
      np.testing.assert_allclose(np.asarray(latents), data["latents_a"],
                                 atol=1e-5, rtol=0)


@pytest.mark.parametrize("swap", [
    ("encoder/ResBlock_0", "encoder/ResBlock_1"),
    ("decoder/ResBlock_4", "decoder/ResBlock_5"),
    ("encoder/ResBlock_3/GroupNorm_0", "encoder/ResBlock_3/GroupNorm_1"),
])
def test_a_broken_mapping_is_detected(forward, golden, swap):
  """Swapping two same-shaped modules of the tree (what a wrong name map
  would do) changes the outputs far beyond the parity tolerance."""
  run, params = forward
  data, golden_params = golden
  a, b = swap
  tampered = {}
  for path, value in golden_params.items():
    if path.startswith(a + "/"):
      path = b + path[len(a):]
    elif path.startswith(b + "/"):
      path = a + path[len(b):]
    tampered[path] = value
  _, flat = maskgit_vq.convert({"params": _nest(tampered)})
  indices, decoded, _ = run(_with(params, flat), _images(data["images_a"]))
  if a.startswith("encoder"):
    assert np.mean(np.asarray(indices) != data["indices_a"]) > 0.1
  else:
    assert np.max(np.abs(np.asarray(decoded) - data["decoded_a"])) > 1e-2


def test_reads_maskgit_checkpoint_files(golden, converted, tmp_path):
  """The released format: msgpack of the variables dict, one file; also a
  flax.training.checkpoints directory of such files."""
  _, params = golden
  blob = serialization.msgpack_serialize({"params": _nest(params)})
  path = tmp_path / "tokenizer_checkpoint"
  path.write_bytes(blob)
  cfg, flat = maskgit_vq.read(path)
  assert cfg == converted[0]
  for k, v in converted[1].items():
    np.testing.assert_array_equal(flat[k], v)
  (tmp_path / "ckpts").mkdir()
  (tmp_path / "ckpts" / "checkpoint_7").write_bytes(blob)
  assert maskgit_vq.read(tmp_path / "ckpts")[0] == cfg


def test_linen_names_is_the_inverse_map(converted):
  cfg, flat = converted
  names = maskgit_vq.linen_names(cfg)
  assert set(names) == set(flat)
  assert names["encoder/blocks/3/skip/kernel"] == (
      "encoder/ResBlock_2/Conv_2/kernel")
  assert names["decoder/blocks/7/conv/kernel"] == "decoder/Conv_2/kernel"
  assert names["decoder/conv_out/bias"] == "decoder/Conv_3/bias"


def test_wrong_shape_names_the_linen_path_and_both_shapes(golden):
  _, params = golden
  bad = dict(params)
  bad["decoder/ResBlock_4/Conv_1/kernel"] = np.zeros((3, 3, 64, 32),
                                                     np.float32)
  with pytest.raises(maskgit_vq.MaskGITCheckpointError,
                     match=r"decoder/ResBlock_4/Conv_1/kernel has shape "
                     r"\(3, 3, 64, 32\), our decoder/blocks/5/conv2/kernel "
                     r"needs \(3, 3, 64, 64\)"):
    maskgit_vq.convert({"params": _nest(bad)})


def test_config_that_does_not_fit_the_tree_is_reported(golden):
  _, params = golden
  vqvae = dict(filters=32, channel_multipliers=[1, 2, 4], num_res_blocks=2,
               embedding_dim=16, codebook_size=64)
  with pytest.raises(maskgit_vq.MaskGITCheckpointError,
                     match=r"(?s)channel_multipliers=\[1, 2, 4\].*"
                     r"encoder/ResBlock_4/Conv_0/kernel has shape "
                     r"\(3, 3, 64, 64\), our encoder/blocks/6/conv1/kernel "
                     r"needs \(3, 3, 64, 128\).*the checkpoint's shapes "
                     r"describe filters=32, channel_multipliers=\[1, 2, 2\]"):
    maskgit_vq.convert({"params": _nest(params)}, vqvae)


def test_missing_and_unused_entries_are_named(golden, tmp_path):
  _, params = golden
  bad = dict(params)
  del bad["encoder/ResBlock_5/GroupNorm_1/scale"]
  with pytest.raises(maskgit_vq.MaskGITCheckpointError,
                     match=r"missing \(1\):\n  encoder/ResBlock_5/GroupNorm_1/"
                     r"scale \(our encoder/blocks/7/norm2/scale, shape "
                     r"\(64,\)\)"):
    maskgit_vq.convert({"params": _nest(bad)})
  bad = dict(params)
  bad["decoder/ResBlock_1/Conv_2/kernel"] = np.zeros((1, 1, 64, 64))
  path = tmp_path / "extra"
  path.write_bytes(serialization.msgpack_serialize({"params": _nest(bad)}))
  with pytest.raises(maskgit_vq.MaskGITCheckpointError,
                     match=r"(?s)extra: .*unused \(not in this architecture\) "
                     r"\(1\):\n  decoder/ResBlock_1/Conv_2/kernel "
                     r"\(1, 1, 64, 64\)"):
    maskgit_vq.read(path)


def test_unsupported_layouts_and_bad_files_are_refused(golden, tmp_path):
  _, params = golden
  bad = dict(params)
  bad["encoder/Conv_2/kernel"] = np.zeros((4, 4, 32, 32))
  with pytest.raises(maskgit_vq.MaskGITCheckpointError,
                     match="conv_downsample=True"):
    maskgit_vq.convert({"params": _nest(bad)})
  with pytest.raises(maskgit_vq.MaskGITCheckpointError,
                     match=r"vqvae.activation_fn='relu'"):
    maskgit_vq.convert({"params": _nest(params)},
                       dict(filters=32, channel_multipliers=[1, 2, 2],
                            num_res_blocks=2, embedding_dim=16,
                            codebook_size=64, activation_fn="relu"))
  with pytest.raises(maskgit_vq.MaskGITCheckpointError,
                     match=r"found keys \['decoder'\]"):
    maskgit_vq.convert({"decoder": {}})
  junk = tmp_path / "junk"
  junk.write_bytes(b"\xc1 not msgpack")
  with pytest.raises(maskgit_vq.MaskGITCheckpointError, match="junk: not a "):
    maskgit_vq.read(junk)
