"""Tests of Muse's iterative parallel decoding (muse_jax.sampling)."""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muse_jax import masking
from muse_jax.models import conditioning
from muse_jax.models import transformer as tr
from muse_jax import sampling

import recorder
from recorder import RecordingTransformer

CFG = tr.TransformerConfig(codebook_size=16, grid_size=4, text_dim=8,
                           width=16, depth=2, num_heads=2, mlp_dim=32)
MASK_ID = CFG.mask_token_id
N = CFG.seq_len
BATCH = 2
BASE = sampling.SamplerConfig(num_steps=4, guidance_scale=2.0)


def _make(cls=tr.MaskedTransformer, seed=0):
  return recorder.make(CFG, cls, seed)


@pytest.fixture(scope="module")
def model():
  return _make()


@pytest.fixture(scope="module")
def text():
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(BATCH, 5, CFG.text_dim)), jnp.float32)
  mask = np.ones((BATCH, 5), bool)
  mask[1, 3:] = False
  return conditioning.Text(emb, jnp.asarray(mask))


@pytest.fixture(scope="module")
def neg_text():
  rng = np.random.default_rng(1)
  emb = jnp.asarray(rng.normal(size=(BATCH, 5, CFG.text_dim)) * 2, jnp.float32)
  return conditioning.Text(emb, jnp.ones((BATCH, 5), bool))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef, state, tokens, unconditional, text):
  m = nnx.merge(graphdef, state)
  context = m.context(text)
  return m(tokens, context.unconditional() if unconditional else context)


def logits(model, tokens, text, unconditional=False):
  """The model's logits given `text`, or given its unconditional branch."""
  graphdef, state = nnx.split(model)
  return _logits(graphdef, state, tokens, unconditional, text)


def _check_valid(out):
  out = np.asarray(out)
  assert out.shape == (BATCH, N) and out.dtype == np.int32
  assert not np.any(out == MASK_ID), "every token is fixed by the last step"
  assert np.all((out >= 0) & (out < CFG.codebook_size))


# ---------------------------------------------------------------------------
# Basic properties.
# ---------------------------------------------------------------------------


def test_output_valid_and_seed_deterministic(model, text):
  a = sampling.sample(model, jax.random.key(0), text, cfg=BASE)
  b = sampling.sample(model, jax.random.key(0), text, cfg=BASE)
  c = sampling.sample(model, jax.random.key(1), text, cfg=BASE)
  for out in (a, b, c):
    _check_valid(out)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  # The two rows (different captions, different noise) differ as well.
  assert not np.array_equal(a[0], a[1])


def _expected_masked_counts(unknown: np.ndarray, steps: int):
  """Mask ids entering each step, re-deriving P§2.8's cosine schedule."""
  counts = [unknown.copy()]
  for k in range(steps - 1):
    x = unknown * np.cos(np.pi / 2 * (k + 1) / steps)
    # Keep the test well-posed: no float32-rounding-sensitive floor().
    assert np.all(np.abs(x - np.round(x)) > 1e-3), x
    n = np.floor(x).astype(np.int64)
    n = np.maximum(np.minimum(np.maximum(n, 1), counts[-1] - 1), 0)
    counts.append(n)
  return np.stack(counts)  # [steps, B]


# Both tests below share one compiled sampler (same model class and config).
SCHEDULE_CFG = sampling.SamplerConfig(num_steps=5, guidance_scale=0.0)


@pytest.fixture(scope="module")
def recording_model():
  return _make(RecordingTransformer)


def _run_recorded(model, text, init, seed, cfg=SCHEDULE_CFG):
  """Samples; returns (output, tokens entering each step [steps, B, N]).

  Callbacks may run out of order; every step has fewer [MASK] tokens than
  the one before, so the steps are sorted by that count.
  """
  RecordingTransformer.calls.clear()
  kw = {} if init is None else dict(init_tokens=jnp.asarray(init))
  out = sampling.sample(model, jax.random.key(seed), text, cfg=cfg, **kw)
  jax.block_until_ready(out)
  jax.effects_barrier()
  _check_valid(out)
  steps = np.stack(RecordingTransformer.calls)
  order = np.argsort(-(steps == MASK_ID).sum(axis=(1, 2)), kind="stable")
  return np.asarray(out), steps[order]


def _masked_counts(steps):
  return (steps == MASK_ID).sum(axis=-1)  # [steps, B]


def test_tokens_fixed_per_step_follow_cosine_schedule(recording_model, text):
  steps = SCHEDULE_CFG.num_steps
  # Row 0 starts all-[MASK] (U = 16); row 1 knows 5 tokens (U = 11).
  init = np.full((BATCH, N), MASK_ID, np.int32)
  init[1, :5] = np.arange(5)
  _, recorded = _run_recorded(recording_model, text, init, seed=3)
  assert recorded.shape == (steps, BATCH, N), "one forward pass per step"
  recorded = _masked_counts(recorded)
  expected = _expected_masked_counts(np.array([N, N - 5]), steps)
  np.testing.assert_array_equal(recorded, expected)
  # The cosine schedule fixes few tokens first and many at the end.
  fixed = -np.diff(np.concatenate([expected, np.zeros((1, BATCH))]), axis=0)
  assert fixed[0, 0] < fixed[-1, 0]


@pytest.mark.parametrize("num_unknown", [1, 6])
def test_known_tokens_never_change(recording_model, text, num_unknown):
  rng = np.random.default_rng(num_unknown)
  init = rng.integers(0, CFG.codebook_size, (BATCH, N)).astype(np.int32)
  unknown = np.zeros((BATCH, N), bool)
  for row in range(BATCH):
    unknown[row, rng.choice(N, num_unknown, replace=False)] = True
  init[unknown] = MASK_ID
  out, steps = _run_recorded(recording_model, text, init, seed=2)
  np.testing.assert_array_equal(out[~unknown], init[~unknown])
  # Every forward saw the known tokens, unchanged.
  for tokens in steps:
    np.testing.assert_array_equal(tokens[~unknown], init[~unknown])
  recorded = _masked_counts(steps)
  # Only the unknown tokens were ever [MASK]: a single one is fixed at once.
  assert recorded.max() == num_unknown
  if num_unknown == 1:
    assert np.all(np.sort(recorded, axis=0)[:-1] == 0)


# ---------------------------------------------------------------------------
# Token draws.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [8192, 512, 17])  # 64, 16 and 1 blocks.
def test_sample_categorical_matches_softmax(vocab):
  rng = np.random.default_rng(vocab)
  logits = rng.normal(size=vocab).astype(np.float32) * 2
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  draws = 40_000
  batch = jnp.broadcast_to(jnp.asarray(logits), (draws, vocab))
  ids, log_prob = jax.jit(sampling.sample_categorical)(jax.random.key(0),
                                                       batch)
  ids, log_prob = np.asarray(ids), np.asarray(log_prob)
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < vocab
  np.testing.assert_allclose(log_prob, np.log(probs)[ids], atol=1e-4)
  # Pearson chi-square over the bins expecting >= 20 draws.
  counts = np.bincount(ids, minlength=vocab)
  expected = probs * draws
  big = expected >= 20
  chi2 = np.sum((counts[big] - expected[big])**2 / expected[big])
  rest_obs, rest_exp = counts[~big].sum(), expected[~big].sum()
  if rest_exp > 0:
    chi2 += (rest_obs - rest_exp)**2 / rest_exp
  dof = big.sum() + (rest_exp > 0) - 1
  # mean dof, sd sqrt(2 dof): 5 sd is a bug, not bad luck.
  assert chi2 < dof + 5 * np.sqrt(2 * dof), (chi2, dof)


def test_sample_categorical_never_draws_filtered_tokens():
  # Top-k leaves a few finite logits (here in the first and a middle block)
  # and every other block without mass.
  logits = np.full((4096, 512), -np.inf, np.float32)
  logits[:, [0, 200, 201]] = [0.0, 3.0, -1.0]
  ids, log_prob = sampling.sample_categorical(jax.random.key(1),
                                              jnp.asarray(logits))
  ids = np.asarray(ids)
  assert set(np.unique(ids)) == {0, 200, 201}
  assert np.all(np.isfinite(np.asarray(log_prob)))


# ---------------------------------------------------------------------------
# Classifier-free guidance and negative prompts.
# ---------------------------------------------------------------------------


def _greedy(model, text, scale, neg=None):
  # One step with top_k=1 is deterministic: the argmax of the guided logits.
  cfg = sampling.SamplerConfig(num_steps=1, top_k=1, guidance_scale=scale,
                               guidance_schedule="constant")
  out = sampling.sample(model, jax.random.key(5), text, cfg=cfg, negative=neg)
  _check_valid(out)
  return np.asarray(out)


def _assert_argmax_equal(out, ref_logits):
  ref_logits = np.asarray(ref_logits)
  top2 = np.sort(ref_logits, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4  # Skip numerical near-ties.
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(out[clear], ref_logits.argmax(-1)[clear])


def _reference_logits(model, text, neg_text):
  all_masked = jnp.full((BATCH, N), MASK_ID, jnp.int32)
  cond = logits(model, all_masked, text)
  uncond = logits(model, all_masked, text, unconditional=True)
  neg = logits(model, all_masked, neg_text)
  return cond, uncond, neg


def test_guidance_scale_zero_is_a_single_conditional_pass(model, text,
                                                          neg_text):
  cond, _, _ = _reference_logits(model, text, neg_text)
  # No unconditional pass at all...
  _assert_argmax_equal(_greedy(model, text, 0.0), cond)
  # ...and when a negative prompt forces the two-pass path, its logits get
  # weight 0: the result is still the conditional argmax.
  _assert_argmax_equal(_greedy(model, text, 0.0, neg=neg_text), cond)


def test_guided_logits_and_negative_prompt(model, text, neg_text):
  scale = 3.0
  cond, uncond, neg = _reference_logits(model, text, neg_text)
  plain = _greedy(model, text, scale)
  with_neg = _greedy(model, text, scale, neg=neg_text)
  _assert_argmax_equal(plain, (1 + scale) * cond - scale * uncond)
  _assert_argmax_equal(with_neg, (1 + scale) * cond - scale * neg)
  # Guidance matters, and the negative prompt changes the output: it
  # replaced the unconditional logits.
  assert not np.array_equal(plain, np.argmax(cond, -1))
  assert not np.array_equal(plain, with_neg)
  assert not np.array_equal(
      with_neg, np.argmax((1 + scale) * cond - scale * uncond, -1))


def test_guidance_kv_rows(model, text, neg_text):
  # Guided without a negative: only the conditional rows have keys (the
  # unconditional half attends nothing). With one: all 2B rows have keys.
  # Unguided: the conditional rows alone.
  cases = [(BASE, None, BATCH, BATCH),
           (BASE, neg_text, 2 * BATCH, None),
           (SCHEDULE_CFG, None, BATCH, None)]
  for cfg, neg, rows, keyed_rows in cases:
    kv = jax.eval_shape(
        lambda m, t, n, cfg=cfg: sampling.guidance_kv(m, cfg, t, n),
        model, text, neg)
    assert kv.keyed_rows == keyed_rows
    assert kv.mask.shape == (rows, 5)
    assert kv.keys.shape[:2] == (CFG.depth, rows)
  kv = sampling.guidance_kv(model, BASE, text, neg_text)
  np.testing.assert_array_equal(kv.mask, np.concatenate([text.mask,
                                                         neg_text.mask]))


# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    (dict(num_steps=0), "num_steps"),
    (dict(num_steps=-3), "num_steps"),
    (dict(schedule="exponential"), "schedule"),
    (dict(guidance_schedule="cosine"), "guidance_schedule"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(guidance_scale=-0.5), "guidance_scale"),
    (dict(choice_temperature=-1.0), "choice_temperature"),
    (dict(confidence="softmax"), "confidence"),
])
def test_sampler_config_validation(kw, field):
  with pytest.raises(ValueError, match=rf"SamplerConfig\.{field}\b"):
    sampling.SamplerConfig(**kw)


def test_sampler_config_accepts_every_schedule():
  for s in masking.SCHEDULES:
    for g in sampling.GUIDANCE_SCHEDULES:
      sampling.SamplerConfig(schedule=s, guidance_schedule=g)


def test_top_k_larger_than_codebook_raises(model, text):
  cfg = sampling.SamplerConfig(num_steps=2, top_k=CFG.codebook_size + 1)
  with pytest.raises(ValueError, match=r"top_k=17 exceeds the codebook size "
                     r"16"):
    sampling.sample(model, jax.random.key(0), text, cfg=cfg)
  with pytest.raises(ValueError, match="top_k=17.*16"):
    cfg.check_codebook(16)
  # The whole codebook is a valid (if pointless) top-k.
  sampling.SamplerConfig(top_k=16).check_codebook(16)


# ---------------------------------------------------------------------------
# Which tokens get fixed: the confidence.
# ---------------------------------------------------------------------------

CONF_TEMPERATURE = 2.0


def _confidence_cfg(confidence, num_steps):
  # No choice noise: the confidence alone decides what is fixed.
  return sampling.SamplerConfig(
      num_steps=num_steps, guidance_scale=0.0, temperature=CONF_TEMPERATURE,
      choice_temperature=0.0, confidence=confidence)


def _fixed_first(model, text, confidence, seed):
  """(the step-1 draw at every position, the positions step 1 fixed)."""
  # One step fixes every draw; two steps draw the same tokens first (same
  # key) and fix the 16 - floor(16 cos(pi/4)) = 5 most confident.
  drawn, _ = _run_recorded(model, text, None, seed,
                           cfg=_confidence_cfg(confidence, 1))
  _, steps = _run_recorded(model, text, None, seed,
                           cfg=_confidence_cfg(confidence, 2))
  assert steps.shape == (2, BATCH, N)
  fixed = steps[1] != MASK_ID
  assert np.all(fixed.sum(-1) == 5)
  np.testing.assert_array_equal(steps[1][fixed], drawn[fixed])
  return drawn, fixed


@pytest.mark.parametrize("confidence", sampling.CONFIDENCES)
def test_confidence_ranks_by_its_distribution(recording_model, text,
                                              confidence):
  # "untempered" (MaskGIT's choice) ranks the draws by their log-probability
  # under the guided logits before temperature; "tempered" under the
  # distribution they were drawn from.
  all_masked = jnp.full((BATCH, N), MASK_ID, jnp.int32)
  ref = np.asarray(logits(recording_model, all_masked, text), np.float64)
  if confidence == "tempered":
    ref = ref / CONF_TEMPERATURE
  log_probs = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
  checked = 0
  for seed in range(3):
    drawn, fixed = _fixed_first(recording_model, text, confidence, seed)
    conf = np.take_along_axis(log_probs, drawn[..., None], -1)[..., 0]
    for row in range(BATCH):
      order = np.sort(conf[row])[::-1]
      if order[4] - order[5] < 1e-3:
        continue  # A near-tie at the cut: not decidable from outside.
      np.testing.assert_array_equal(fixed[row], conf[row] >= order[4])
      checked += 1
  assert checked >= 4


def test_tempered_and_untempered_confidence_differ(recording_model, text):
  # With temperature != 1 the two rankings differ: for some seed they fix
  # other tokens first.
  differ = []
  for seed in range(3):
    _, untempered = _fixed_first(recording_model, text, "untempered", seed)
    _, tempered = _fixed_first(recording_model, text, "tempered", seed)
    differ.append(not np.array_equal(untempered, tempered))
  assert any(differ), differ
