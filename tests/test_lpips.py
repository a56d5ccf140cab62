"""LPIPS and the torch-file reader against PyTorch goldens.

tests/golden/lpips_vgg_golden.npz comes from the reference `lpips` package
(scripts/make_lpips_golden.py) with its real VGG heads and a random VGG16
backbone rebuilt here from the same seed.
"""

from __future__ import annotations

import os
import pickle

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax.interop import torch_files
from muse_jax.losses import lpips
from muse_jax.losses import vgg16

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def _images(a: np.ndarray) -> jnp.ndarray:
  return jnp.asarray(a.astype(np.float32) / 127.5 - 1)


@pytest.fixture(scope="module")
def golden():
  with np.load(os.path.join(GOLDEN, "lpips_vgg_golden.npz")) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def model(golden):
  with nnx.use_eager_sharding(False):
    m = lpips.Lpips(rngs=nnx.Rngs(0))
  lpips.load_weights(m, vgg16.random_state_dict(int(golden["seed"])),
                     torch_files.load(lpips.heads_path()))
  return m


def test_lpips_matches_the_reference_package(model, golden):
  assert len(golden["distance"]) >= 8
  x, y = _images(golden["x"]), _images(golden["y"])
  np.testing.assert_allclose(np.asarray(model(x, y)), golden["distance"],
                             atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(model.per_layer(x, y)),
                             golden["per_layer"], atol=1e-6, rtol=1e-4)


def test_lpips_is_zero_on_identical_images_and_symmetric(model, golden):
  x, y = _images(golden["x"][:2]), _images(golden["y"][:2])
  np.testing.assert_allclose(np.asarray(model(x, x)), 0.0, atol=1e-7)
  np.testing.assert_allclose(np.asarray(model(x, y)),
                             np.asarray(model(y, x)), rtol=1e-5)


def test_lpips_rejects_bad_images(model):
  with pytest.raises(ValueError, match="one shape"):
    model(jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="at least 16x16"):
    model(jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 8, 8, 3)))


def test_load_weights_names_the_bad_entry():
  with nnx.use_eager_sharding(False):
    m = lpips.Lpips(rngs=nnx.Rngs(0))
  heads = torch_files.load(lpips.heads_path())
  sd = vgg16.random_state_dict(0)
  del sd["features.17.bias"]
  with pytest.raises(ValueError, match=r"features\.17\.bias"):
    lpips.load_weights(m, sd, heads)
  sd = vgg16.random_state_dict(0)
  sd["features.2.weight"] = sd["features.2.weight"][:, :32]
  with pytest.raises(ValueError, match=r"features\.2\.weight: shape"):
    lpips.load_weights(m, sd, heads)


def test_package_heads_have_the_vgg_widths():
  heads = torch_files.load(lpips.heads_path())
  widths = [stage[-1] for stage in vgg16.STAGES]
  assert {k: v.shape for k, v in heads.items()} == {
      f"lin{i}.model.1.weight": (1, c, 1, 1) for i, c in enumerate(widths)}
  assert all(v.dtype == np.float32 and (v >= 0).all() for v in heads.values())


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_torch_files_reads_both_formats(fmt):
  got = torch_files.load(os.path.join(GOLDEN, f"torch_state_{fmt}.pth"))
  with np.load(os.path.join(GOLDEN, "torch_state_expected.npz")) as want:
    assert list(got) == list(want.files)
    for k in want.files:
      assert got[k].dtype == want[k].dtype, k
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  assert got["transposed"].shape == (6, 5)


def test_torch_files_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    torch_files.load(tmp_path / "nope.pth")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(torch_files.TorchFileError, match="junk.pth"):
    torch_files.load(junk)
  # A legacy stream whose object calls a global outside the allowed few is
  # refused before anything runs.
  evil = tmp_path / "evil.pth"
  with open(evil, "wb") as f:
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
      pickle.dump(header, f)
    pickle.dump(os.getcwd, f)  # Pickled by reference: posix.getcwd.
  with pytest.raises(torch_files.TorchFileError, match="unsupported object"):
    torch_files.load(evil)
