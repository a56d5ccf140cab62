"""Importing diffusers VQ tokenizers: parity with PyTorch, and bad input.

Parity: a VQModel in the aMUSEd layout with seeded random weights
(`diffusers_vq_layout.random_state_dict`), written in diffusers' format and
converted by the `muse_jax.import_tokenizer` CLI, must give diffusers'
token indices on the golden's 16 photos and its decoded images within 1e-4
(tests/golden/diffusers_vq_amused.npz, made by
scripts/make_diffusers_vq_golden.py in the peers' venv; no torch here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from muse_jax.interop import diffusers_vq
from muse_jax.interop import diffusers_vq_layout as layout
from muse_jax.interop import vq_checkpoint
from muse_jax.models import vqgan
from muse_jax.tasks import vq as vq_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "diffusers_vq_amused.npz")
TOL = 1e-4

# A small layout with every kind of tensor (shortcuts, down/upsamplers).
TINY = dict(layout.AMUSED_CONFIG, block_out_channels=[32, 64],
            down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
            latent_channels=8, vq_embed_dim=None, num_vq_embeddings=64)


def write_diffusers(directory, config, state) -> str:
  """A diffusers model directory: config.json + safetensors."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f)
  st_numpy.save_file(
      state, os.path.join(directory, diffusers_vq.SAFETENSORS_FILE))
  return str(directory)


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(GOLDEN))


@pytest.fixture(scope="module")
def imported(tmp_path_factory, golden):
  """The aMUSEd-layout weights of the golden, converted by the CLI."""
  tmp = tmp_path_factory.mktemp("amused")
  config = json.loads(str(golden["config"]))
  src = write_diffusers(
      tmp / "src", config,
      layout.random_state_dict(config, seed=int(golden["seed"])))
  out = tmp / "out"
  run = subprocess.run(
      [sys.executable, "-m", "muse_jax.import_tokenizer",
       "--format=diffusers", f"--src={src}", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert run.returncode == 0, run.stderr[-3000:]
  return out, run.stdout


def test_cli_matches_diffusers_on_the_golden(imported, golden):
  out, stdout = imported
  lines = stdout.strip().splitlines()
  assert len(lines) == 1 and "parameters" in lines[0] and "f=16" in lines[0]
  model = vq_checkpoint.load(out)
  cfg = model.config
  assert (cfg.base_channels, cfg.channel_mult, cfg.codebook_size,
          cfg.code_dim, cfg.downsample_factor) == (128, (1, 2, 2, 4, 6), 8192,
                                                   64, 16)
  x = jnp.asarray(vqgan.to_unit_range(golden["images"]))
  encode = nnx.jit(lambda m, x: (m.encode(x), m.encode_to_indices(x)))
  latents, indices = encode(model, x)
  decoded = nnx.jit(lambda m, i: m.decode_from_indices(i, clip=False))(
      model, jnp.asarray(golden["indices"]))
  assert len(golden["images"]) >= 16
  np.testing.assert_array_equal(np.asarray(indices), golden["indices"])
  lat_err = float(np.max(np.abs(np.asarray(latents) - golden["latents"])))
  dec_err = float(np.max(np.abs(np.asarray(decoded) - golden["decoded"])))
  print(f"latents max abs diff {lat_err:.2e}, decoded {dec_err:.2e}")
  assert lat_err <= TOL and dec_err <= TOL
  # The import is a working tokenizer for the project: images of the wrong
  # channel count or size are refused, naming the problem.
  with pytest.raises(ValueError, match="expects 3 channels, got 4"):
    model.encode_to_indices(jnp.zeros((1, 64, 64, 4)))
  with pytest.raises(ValueError, match=r"not a multiple .* f=16"):
    model.encode_to_indices(jnp.zeros((1, 40, 64, 3)))


@pytest.fixture(scope="module")
def tiny_state():
  return layout.random_state_dict(TINY, seed=3)


def test_round_trip_through_an_orbax_directory(tmp_path, tiny_state):
  src = write_diffusers(tmp_path / "pipeline" / "vqvae", TINY, tiny_state)
  # A pipeline directory works too: the tokenizer is its vqvae/ folder.
  cfg, model = vq_checkpoint.import_checkpoint(
      "diffusers", tmp_path / "pipeline", tmp_path / "out")
  assert os.path.dirname(src) == str(tmp_path / "pipeline")
  restored = vq_checkpoint.load(tmp_path / "out")
  assert restored.config == cfg
  assert vq_checkpoint.PART == vq_task.PART
  params = {vq_checkpoint.path_str(p): np.asarray(v[...]) for p, v in
            nnx.to_flat_state(nnx.state(restored, nnx.Param))}
  table = layout.tensors(layout.normalize_config(TINY))
  assert sorted(params) == sorted(t.ours for t in table)
  for t in table:
    np.testing.assert_array_equal(t.to_theirs(params[t.ours]),
                                  tiny_state[t.key], err_msg=t.key)
  with pytest.raises(FileExistsError, match="already holds a checkpoint"):
    vq_checkpoint.save(tmp_path / "out", cfg, model)


def test_wrong_shapes_missing_and_extra_tensors_are_named(tmp_path,
                                                         tiny_state):
  key = "decoder.up_blocks.1.resnets.0.conv1.weight"
  bad = dict(tiny_state, **{key: np.zeros((32, 64, 3, 1), np.float32)})
  with pytest.raises(ValueError) as e:
    diffusers_vq.read(write_diffusers(tmp_path / "shape", TINY, bad))
  assert all(s in str(e.value) for s in
             (key, "(32, 64, 3, 1)", "(32, 64, 3, 3)",
              "diffusion_pytorch_model.safetensors"))
  bad = {k: v for k, v in tiny_state.items() if k != "quant_conv.bias"}
  bad["encoder.mid_block.attentions.0.to_q.weight"] = np.zeros((2, 2),
                                                               np.float32)
  with pytest.raises(ValueError) as e:
    diffusers_vq.read(write_diffusers(tmp_path / "keys", TINY, bad))
  assert "missing 1 tensor(s) the config needs: quant_conv.bias" in str(
      e.value)
  assert "encoder.mid_block.attentions.0.to_q.weight" in str(e.value)
  # A checkpoint of another size than its config says.
  bigger = layout.random_state_dict(
      dict(TINY, block_out_channels=[32, 96]), seed=0)
  with pytest.raises(ValueError, match=r"'encoder.down_blocks.1.resnets.0."
                     r"conv1.weight' has shape \(96, 32, 3, 3\), but the "
                     r"config needs \(64, 32, 3, 3\)"):
    diffusers_vq.read(write_diffusers(tmp_path / "size", TINY, bigger))


def test_to_model_names_mismatched_paths():
  cfg = diffusers_vq.vq_config(layout.normalize_config(TINY))
  flat = diffusers_vq.convert(layout.normalize_config(TINY),
                              layout.random_state_dict(TINY, seed=0))
  flat["quantizer/codebook"] = np.zeros((65, 8), np.float32)
  with pytest.raises(ValueError, match=r"quantizer/codebook has shape "
                     r"\(65, 8\), the config needs \(64, 8\)"):
    vq_checkpoint.to_model(cfg, flat)
  del flat["quantizer/codebook"]
  flat["decoder/extra/kernel"] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match=r"missing: quantizer/codebook.*"
                     r"unexpected: decoder/extra/kernel"):
    vq_checkpoint.to_model(cfg, flat)


@pytest.mark.parametrize("change, match", [
    (dict(mid_block_add_attention=True), "mid_block_add_attention=True"),
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     r"down_block_types\[1\]='AttnDownEncoderBlock2D'"),
    ({"up_block_types": ["UpDecoderBlock2D"]},
     "up_block_types=.*one entry per block_out_channels"),
    (dict(block_out_channels=[32, 48]), "block_out_channels=.*multiple"),
    (dict(vq_embed_dim=16), "vq_embed_dim=16"),
    (dict(norm_type="spatial"), "norm_type='spatial'"),
    (dict(act_fn="gelu"), "act_fn='gelu'"),
    (dict(out_channels=4), "out_channels=4"),
    (dict(use_attention=1), "use_attention=1: unknown key"),
    (dict(_class_name="AutoencoderKL"), "_class_name='AutoencoderKL'"),
    (dict(norm_num_groups=48), "norm_num_groups=48"),
])
def test_unsupported_configs_are_named(tmp_path, tiny_state, change, match):
  src = write_diffusers(tmp_path, dict(TINY, **change), tiny_state)
  with pytest.raises(ValueError, match=match):
    diffusers_vq.read(src)


def test_config_defaults_are_diffusers(tmp_path):
  # diffusers' default mid block has attention: a config that omits the key
  # is not ours.
  config = {k: v for k, v in TINY.items() if k != "mid_block_add_attention"}
  with pytest.raises(ValueError, match="mid_block_add_attention=True"):
    layout.normalize_config(config)


def test_missing_files_are_named(tmp_path, tiny_state):
  with pytest.raises(FileNotFoundError, match="no such directory"):
    diffusers_vq.read(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    diffusers_vq.read(tmp_path / "empty")
  src = write_diffusers(tmp_path / "noweights", TINY, tiny_state)
  os.remove(os.path.join(src, diffusers_vq.SAFETENSORS_FILE))
  with pytest.raises(FileNotFoundError,
                     match="no diffusion_pytorch_model.safetensors or "
                     "diffusion_pytorch_model.bin"):
    diffusers_vq.read(src)
  with open(os.path.join(src, "config.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(ValueError, match="config.json: not valid JSON"):
    diffusers_vq.read(src)
  with pytest.raises(FileNotFoundError, match="vq_config.json not found"):
    vq_checkpoint.load(tmp_path / "empty")
  with pytest.raises(ValueError, match="unknown tokenizer format 'onnx'"):
    vq_checkpoint.import_checkpoint("onnx", src, tmp_path / "out")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_upsample_is_a_nearest_repeat_then_its_conv(dtype):
  """The sub-pixel Upsample equals repeating pixels, then the 3x3 conv."""
  cfg = vqgan.VQConfig(base_channels=32, channel_mult=(1, 2), dtype=dtype)
  with nnx.use_eager_sharding(False):
    up = vqgan.Upsample(8, cfg, nnx.Rngs(jax.random.key(0, impl="rbg")))
  up.conv.bias[...] = jnp.linspace(-1.0, 1.0, 8)
  x = jax.random.normal(jax.random.key(1), (2, 5, 3, 8))
  want = up.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
  got = up(x)
  assert got.shape == (2, 10, 6, 8) and got.dtype == want.dtype
  tol = 1e-5 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), atol=tol, rtol=tol)
  if dtype == "float32":  # Training sees the same kernel gradient.
    loss = lambda y: jnp.sum(jnp.sin(y))
    g_got = nnx.grad(lambda m: loss(m(x)))(up)
    g_want = nnx.grad(lambda m: loss(m.conv(jnp.repeat(jnp.repeat(
        x, 2, axis=1), 2, axis=2))))(up)
    np.testing.assert_allclose(np.asarray(g_got.conv.kernel[...]),
                               np.asarray(g_want.conv.kernel[...]),
                               atol=1e-4, rtol=1e-4)
