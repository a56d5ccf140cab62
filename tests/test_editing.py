"""Tests of zero-shot editing (muse_jax.editing): in/outpainting, mask-free."""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import editing
from muse_jax import sampling
from muse_jax.models import conditioning
from muse_jax.models import transformer as tr

import recorder
from recorder import RecordingTransformer

CFG = tr.TransformerConfig(codebook_size=16, grid_size=8, text_dim=8,
                           width=32, depth=1, num_heads=2, mlp_dim=64)
MASK_ID = CFG.mask_token_id
N = CFG.seq_len  # 64
BATCH = 3
FACTOR = 4  # pixels per token side: images of 32 x 32.
SAMPLER = sampling.SamplerConfig(num_steps=4, guidance_scale=2.0)
# fraction 0.08 of 64 tokens: round(5.12) = 5 re-masked per iteration.
EDIT = dict(fraction=0.08, iterations=8, guidance_scale=4.0, top_k=3)
K = 5


def _make(cls=tr.MaskedTransformer, seed=0):
  return recorder.make(CFG, cls, seed)


@pytest.fixture(scope="module")
def model():
  return _make()


def _text(batch, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(batch, 5, CFG.text_dim)) * scale
  mask = np.ones((batch, 5), bool)
  mask[-1, 3:] = False
  return conditioning.Text(jnp.asarray(emb, jnp.float32), jnp.asarray(mask))


def _source(batch, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, CFG.codebook_size, (batch, N)).astype(np.int32)


@pytest.fixture(scope="module")
def text():
  return _text(BATCH)


@pytest.fixture(scope="module")
def source():
  return _source(BATCH)


def _check_valid(out, batch=BATCH):
  out = np.asarray(out)
  assert out.shape == (batch, N) and out.dtype == np.int32
  assert not np.any(out == MASK_ID)
  assert np.all((out >= 0) & (out < CFG.codebook_size))
  return out


# ---------------------------------------------------------------------------
# Pixel masks, boxes and token masks.
# ---------------------------------------------------------------------------


def _reference_token_mask(pixel_mask, f):
  h, w = pixel_mask.shape
  out = np.zeros((h // f, w // f), bool)
  for i in range(h // f):
    for j in range(w // f):
      out[i, j] = pixel_mask[i * f:(i + 1) * f, j * f:(j + 1) * f].any()
  return out.reshape(-1)


def test_token_mask_from_pixels_single_pixel_and_partial_patches():
  # One pixel marks its whole token (row 1, column 2 of a 4 x 4 grid).
  pixels = np.zeros((8, 8), bool)
  pixels[3, 5] = True
  expected = np.zeros(16, bool)
  expected[1 * 4 + 2] = True
  np.testing.assert_array_equal(editing.token_mask_from_pixels(pixels, 2),
                                expected)
  # A box straddling patch borders marks every patch it touches.
  pixels = editing.box_mask(8, 8, (1, 2, 5, 4))  # rows 1..4, columns 2..3
  got = editing.token_mask_from_pixels(pixels, 2)
  assert isinstance(got, np.ndarray) and got.dtype == bool
  np.testing.assert_array_equal(got, _reference_token_mask(pixels, 2))
  grid = got.reshape(4, 4)
  assert grid[0:3, 1].all() and grid.sum() == 3
  # Batched, random, from JAX, on a non-square image.
  rng = np.random.default_rng(0)
  batch = rng.random((3, 8, 12)) < 0.03
  got = editing.token_mask_from_pixels(jnp.asarray(batch), 4)
  assert isinstance(got, jax.Array) and got.shape == (3, 6)
  for row in range(3):
    np.testing.assert_array_equal(got[row],
                                  _reference_token_mask(batch[row], 4))
  # A tokenizer with factor 1: tokens are pixels.
  np.testing.assert_array_equal(
      editing.token_mask_from_pixels(batch[0], 1), batch[0].reshape(-1))


def test_token_mask_from_pixels_errors():
  with pytest.raises(ValueError, match=r"9x8 pixels.*factor 2"):
    editing.token_mask_from_pixels(np.zeros((9, 8), bool), 2)
  with pytest.raises(ValueError, match=r"8x10 pixels.*factor 4"):
    editing.token_mask_from_pixels(np.zeros((2, 8, 10), bool), 4)
  with pytest.raises(ValueError, match="factor must be a positive integer"):
    editing.token_mask_from_pixels(np.zeros((8, 8), bool), 0)
  with pytest.raises(ValueError, match=r"\[H, W\] or \[B, H, W\]"):
    editing.token_mask_from_pixels(np.zeros((1, 1, 8, 8), bool), 2)


def test_mask_and_image_size_mismatch_names_both_shapes():
  with pytest.raises(ValueError,
                     match=r"mask of shape \(32, 32\).*image of shape "
                     r"\(2, 32, 48, 3\)"):
    editing.check_mask_matches_image((32, 32), (2, 32, 48, 3))
  with pytest.raises(ValueError, match=r"\(3, 32, 32\).*3 rows.*\(2, 32, "
                     r"32, 3\).*2"):
    editing.check_mask_matches_image((3, 32, 32), (2, 32, 32, 3))
  with pytest.raises(ValueError, match=r"\(32, 32\).*\(32, 32\)"):
    editing.check_mask_matches_image((32, 32), (32, 32))  # no channels
  # Fitting shapes: one mask for the batch, one per image, unbatched.
  editing.check_mask_matches_image((32, 48), (2, 32, 48, 3))
  editing.check_mask_matches_image((2, 32, 48), (2, 32, 48, 3))
  editing.check_mask_matches_image((32, 48), (32, 48, 1))
  # token_mask_from_pixels checks the image when given one.
  with pytest.raises(ValueError, match=r"\(16, 16\).*\(1, 32, 32, 3\)"):
    editing.token_mask_from_pixels(np.zeros((16, 16), bool), 4,
                                   image_shape=(1, 32, 32, 3))
  got = editing.token_mask_from_pixels(np.ones((32, 32), bool), 4,
                                       image_shape=(1, 32, 32, 3))
  assert got.shape == (64,) and got.all()


def test_box_mask():
  mask = editing.box_mask(6, 8, (1, 2, 4, 7))
  assert mask.shape == (6, 8) and mask.dtype == bool
  assert mask.sum() == 3 * 5 and mask[1:4, 2:7].all()
  assert editing.box_mask(6, 8, (0, 0, 6, 8)).all()  # the whole image


@pytest.mark.parametrize("box,pattern", [
    ((0, 0, 7, 8), "outside the 6x8 image"),
    ((0, 0, 6, 9), "outside the 6x8 image"),
    ((-1, 0, 3, 3), "outside the 6x8 image"),
    ((0, -2, 3, 3), "outside the 6x8 image"),
    ((2, 1, 2, 5), "empty"),
    ((3, 1, 2, 5), "empty"),
    ((0, 4, 3, 4), "empty"),
    ((0, 1, 2), "four integers"),
    ((0.5, 1, 2, 3), "four integers"),
])
def test_box_mask_errors(box, pattern):
  with pytest.raises(ValueError, match=pattern):
    editing.box_mask(6, 8, box)


# ---------------------------------------------------------------------------
# Inpainting and outpainting.
# ---------------------------------------------------------------------------


def _random_token_mask(seed, batch=BATCH, p=0.3):
  mask = np.random.default_rng(seed).random((batch, N)) < p
  mask[:, 0] = True  # At least one token to regenerate per row.
  return mask


def test_inpaint_keeps_every_token_outside_the_mask(model, text, source):
  mask = _random_token_mask(1)
  mask[2] = False  # A row with nothing to regenerate comes back as is.
  out = editing.inpaint(model, jax.random.key(0), text, source, mask,
                        cfg=SAMPLER)
  out = _check_valid(out)
  np.testing.assert_array_equal(out[~mask], source[~mask])
  np.testing.assert_array_equal(out[2], source[2])
  # The masked tokens were decoded anew (a random source is not what the
  # model would draw everywhere).
  assert np.any(out[mask] != source[mask])
  # Same key, same result; a [N] mask applies to every row.
  again = editing.inpaint(model, jax.random.key(0), text, source, mask,
                          cfg=SAMPLER)
  np.testing.assert_array_equal(out, again)
  shared = editing.inpaint(model, jax.random.key(1), text, source, mask[0],
                           cfg=SAMPLER)
  shared = _check_valid(shared)
  keep = np.broadcast_to(~mask[0], shared.shape)
  np.testing.assert_array_equal(shared[keep], source[keep])


def test_outpaint_keeps_the_box(model, text, source):
  # Keep a box of a 32 x 32 image whose right edge cuts through a token
  # column: only the tokens wholly inside are kept (the region to
  # regenerate, the box's complement, is what gets mapped onto tokens).
  box = editing.box_mask(32, 32, (8, 8, 24, 26))
  keep = ~editing.token_mask_from_pixels(~box, FACTOR,
                                         image_shape=(BATCH, 32, 32, 3))
  assert keep.sum() == 4 * 4
  assert editing.token_mask_from_pixels(box, FACTOR).sum() == 4 * 5
  out = editing.outpaint(model, jax.random.key(2), text, source, keep,
                         cfg=SAMPLER)
  out = _check_valid(out)
  np.testing.assert_array_equal(out[:, keep], source[:, keep])
  assert np.any(out[:, ~keep] != source[:, ~keep])


def test_inpaint_row_does_not_depend_on_the_batch(model, text, source):
  # sampling.sample draws [B, N] arrays from one key: with the partitionable
  # threefry (JAX's default) row 0's draws do not depend on B.
  assert jax.config.jax_threefry_partitionable
  mask = _random_token_mask(3)
  key = jax.random.key(4)
  batch = editing.inpaint(model, key, text, source, mask, cfg=SAMPLER)
  alone = editing.inpaint(
      model, key, conditioning.Text(text.embeddings[:1], text.mask[:1]),
      source[:1], mask[:1], cfg=SAMPLER)
  np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(batch)[0])


def test_inpaint_input_errors(model, text, source):
  mask = _random_token_mask(0)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="must be boolean"):
    editing.inpaint(model, key, text, source, mask.astype(np.int32),
                    cfg=SAMPLER)
  with pytest.raises(ValueError, match="must be boolean"):
    editing.outpaint(model, key, text, source, mask.astype(np.int32),
                     cfg=SAMPLER)
  with pytest.raises(ValueError, match=r"token mask of shape \(3, 63\).*"
                     r"tokens of shape \(3, 64\)"):
    editing.inpaint(model, key, text, source, mask[:, 1:], cfg=SAMPLER)
  with pytest.raises(ValueError, match=r"tokens of shape \(3, 63\).*\[B, 64\]"):
    editing.inpaint(model, key, text, source[:, 1:], mask, cfg=SAMPLER)
  with pytest.raises(ValueError, match="2 rows, the condition 3"):
    editing.inpaint(model, key, text, source[:2], mask[:2], cfg=SAMPLER)


# ---------------------------------------------------------------------------
# Mask-free editing.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording_model():
  return _make(RecordingTransformer)


@pytest.fixture(scope="module")
def recorded(recording_model, text, source):
  """(output, intermediates of every iteration, forward inputs) of EDIT."""
  RecordingTransformer.calls.clear()
  out, steps = editing.maskfree_edit(recording_model, jax.random.key(0), text,
                                     source, return_intermediate=True, **EDIT)
  jax.block_until_ready(out)
  jax.effects_barrier()
  return np.asarray(out), np.asarray(steps), list(RecordingTransformer.calls)


def test_maskfree_remasks_exactly_the_fraction_per_iteration(source,
                                                             recorded):
  out, steps, calls = recorded
  out = _check_valid(out)
  iterations = EDIT["iterations"]
  assert steps.shape == (iterations, BATCH, N)
  np.testing.assert_array_equal(steps[-1], out)
  # One guided forward per iteration ([cond; uncond] rows: 2B), each with
  # exactly round(0.08 * 64) = 5 [MASK] tokens in every row.
  assert len(calls) == iterations
  for inputs in calls:
    assert inputs.shape == (2 * BATCH, N)
    np.testing.assert_array_equal(inputs[:BATCH], inputs[BATCH:])
    np.testing.assert_array_equal((inputs == MASK_ID).sum(-1), K)
  # The tokens before each iteration and after it differ in at most those
  # 5 positions, which the forward saw as [MASK]. (Callbacks may run out of
  # order: match each iteration to the input that agrees with it.)
  before = np.concatenate([source[None], steps[:-1]])
  changed = []
  for prev, new in zip(before, steps):
    assert not np.any(new == MASK_ID)
    diff = prev != new
    assert np.all(diff.sum(-1) <= K)
    changed.append(diff.sum())
    seen = [x[:BATCH] for x in calls
            if np.all((x[:BATCH] == prev) | (x[:BATCH] == MASK_ID))]
    assert seen, "no forward saw this iteration's tokens"
    assert any(np.all(~diff | (x == MASK_ID)) for x in seen)
  assert sum(changed) > 0, "the edit changed nothing"


@pytest.fixture(scope="module")
def edited(model, text, source):
  """maskfree_edit with EDIT and key 0 (shared by the tests below)."""
  return np.asarray(editing.maskfree_edit(model, jax.random.key(0), text,
                                          source, **EDIT))


def test_maskfree_seed_determinism(model, text, source, edited):
  _check_valid(edited)
  same = editing.maskfree_edit(model, jax.random.key(0), text, source, **EDIT)
  other = editing.maskfree_edit(model, jax.random.key(1), text, source,
                                **EDIT)
  np.testing.assert_array_equal(same, edited)
  assert not np.array_equal(_check_valid(other), edited)
  # Only some tokens changed: 8 iterations x 5 of 64 at most.
  assert np.all((edited != source).sum(-1) <= EDIT["iterations"] * K)


def test_maskfree_row_does_not_depend_on_the_batch(model, text, source,
                                                   edited):
  one = conditioning.Text(text.embeddings[:1], text.mask[:1])
  alone = editing.maskfree_edit(model, jax.random.key(0), one, source[:1],
                                **EDIT)
  np.testing.assert_array_equal(_check_valid(alone, batch=1)[0], edited[0])
  # Every row draws from its own folded-in key, so this holds in the
  # non-partitionable threefry mode too, where the draws of one [B, N]
  # array from one key would depend on B.
  with jax.threefry_partitionable(False):
    batch = editing.maskfree_edit(model, jax.random.key(0), text, source,
                                  **EDIT)
    alone = editing.maskfree_edit(model, jax.random.key(0), one, source[:1],
                                  **EDIT)
  np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(batch)[0])
  # Other batch-mates (different captions and images) do not matter either.
  others = _text(BATCH, seed=7)
  mixed = conditioning.Text(
      others.embeddings.at[0].set(text.embeddings[0]),
      others.mask.at[0].set(text.mask[0]))
  mixed_source = _source(BATCH, seed=7)
  mixed_source[0] = source[0]
  out = editing.maskfree_edit(model, jax.random.key(0), mixed, mixed_source,
                              **EDIT)
  np.testing.assert_array_equal(np.asarray(out)[0], edited[0])


def test_maskfree_intermediate_stride(recording_model, text, source,
                                      recorded):
  # A stride keeps every s-th iteration's tokens (after 3 and 6 of 8) and
  # does not change the result.
  out, every3 = editing.maskfree_edit(recording_model, jax.random.key(0),
                                      text, source, return_intermediate=True,
                                      intermediate_every=3, **EDIT)
  full_out, every1, _ = recorded
  assert every3.shape == (EDIT["iterations"] // 3, BATCH, N)
  np.testing.assert_array_equal(every3, every1[2::3])
  np.testing.assert_array_equal(out, full_out)


def test_maskfree_intermediates_do_not_change_the_result(recorded, edited):
  # The recording model has `model`'s parameters (same seed); the same key
  # gives the same edit with and without intermediate outputs.
  np.testing.assert_array_equal(recorded[0], edited)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef, state, tokens, unconditional, text):
  m = nnx.merge(graphdef, state)
  context = m.context(text)
  return m(tokens, context.unconditional() if unconditional else context)


def _reference_logits(model, tokens, text, unconditional=False):
  """The model's logits given `text`, or given its unconditional branch."""
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, tokens, unconditional, text))


def _assert_argmax_equal(out, ref_logits):
  top2 = np.sort(ref_logits, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4  # Skip numerical near-ties.
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(out[clear], ref_logits.argmax(-1)[clear])


def test_maskfree_guidance(model, text, source):
  # fraction 1, one iteration, top-1: every token is the argmax of the
  # guided logits of the all-[MASK] input.
  greedy = dict(fraction=1.0, iterations=1, top_k=1)
  all_masked = jnp.full((BATCH, N), MASK_ID, jnp.int32)
  cond = _reference_logits(model, all_masked, text)
  uncond = _reference_logits(model, all_masked, text, unconditional=True)
  key = jax.random.key(3)
  # guidance_scale 0 is the conditional forward alone...
  plain = editing.maskfree_edit(model, key, text, source, guidance_scale=0.0,
                                **greedy)
  _assert_argmax_equal(_check_valid(plain), cond)
  # ...and a negative prompt (which forces the paired forward) gets weight 0.
  neg = _text(BATCH, seed=5, scale=2.0)
  with_neg = editing.maskfree_edit(model, key, text, source,
                                   guidance_scale=0.0, negative=neg, **greedy)
  np.testing.assert_array_equal(with_neg, plain)
  # guidance_scale t: (1 + t) * l_c - t * l_u.
  guided = editing.maskfree_edit(model, key, text, source, guidance_scale=3.0,
                                 **greedy)
  _assert_argmax_equal(_check_valid(guided), 4.0 * cond - 3.0 * uncond)
  assert not np.array_equal(guided, plain)


def test_maskfree_no_retrace(model, text, source, edited):
  del edited  # Compiled EDIT's program already.
  jitted = editing._maskfree_edit  # pylint: disable=protected-access
  size = jitted._cache_size()  # pylint: disable=protected-access
  out = editing.maskfree_edit(model, jax.random.key(9), _text(BATCH, seed=9),
                              _source(BATCH, seed=11), **EDIT)
  _check_valid(out)
  assert jitted._cache_size() == size  # pylint: disable=protected-access


@pytest.mark.parametrize("kw,pattern", [
    (dict(fraction=0.0), "fraction must be in"),
    (dict(fraction=1.5), "fraction must be in"),
    (dict(iterations=0), "iterations must be >= 1"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_k=17), "top_k=17 exceeds the codebook size 16"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(return_intermediate=True, intermediate_every=0),
     "intermediate_every must be in"),
    (dict(return_intermediate=True, iterations=4, intermediate_every=5),
     "intermediate_every must be in"),
])
def test_maskfree_config_errors(model, text, source, kw, pattern):
  with pytest.raises(ValueError, match=pattern):
    editing.maskfree_edit(model, jax.random.key(0), text, source, **kw)


def test_maskfree_num_remasked():
  assert editing.MaskFreeConfig().num_remasked(64) == 5
  assert editing.MaskFreeConfig().num_remasked(256) == 20  # 20.48
  assert editing.MaskFreeConfig(fraction=0.01).num_remasked(16) == 1
  assert editing.MaskFreeConfig(fraction=1.0).num_remasked(16) == 16
