"""The super-res transformer, its objective and the cascade (issue 15).

Model-level tests use a tiny model; one tiny cascade run of the main job
(module fixture) covers the stages, evaluation at both resolutions and the
sample CLI.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import shapes_cascade
from configs import shapes_demo
from muse_jax import masking
from muse_jax import sampling
from muse_jax import stages
from muse_jax.data import records
from muse_jax.models import conditioning
from muse_jax.models import superres
from muse_jax.models import transformer as tr
from muse_jax.stages import tokenize
from muse_jax.stages import workdir as workdir_lib
from muse_jax.tasks import masked_transformer as mt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HR = tr.TransformerConfig(codebook_size=24, grid_size=4, text_dim=8,
                          width=16, depth=2, num_heads=2, mlp_dim=32)
LOW = superres.LowResConfig(codebook_size=10, grid_size=2, depth=1)
B, L = 3, 5


def _model(seed=0, aligned=False):
  low = dataclasses.replace(LOW, aligned=aligned)
  with nnx.use_eager_sharding(False):
    return superres.SuperResTransformer(HR, low, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module", params=[False, True],
                ids=["cross_attention", "aligned"])
def model(request):
  return _model(aligned=request.param)


def _condition(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  text = conditioning.Text(
      jnp.asarray(rng.normal(size=(batch, L, HR.text_dim)), jnp.float32),
      jnp.asarray(np.arange(L)[None].repeat(batch, 0) < 3))
  low = jnp.asarray(rng.integers(0, LOW.codebook_size, (batch, LOW.seq_len)),
                    jnp.int32)
  return conditioning.LowRes(text, low)


def test_context_is_lowres_then_text_and_guidance_drops_text_only(model):
  cond = _condition()
  ctx = model.context(cond)
  assert ctx.embeddings.shape == (B, LOW.seq_len + L, HR.width)
  np.testing.assert_array_equal(ctx.mask[:, :LOW.seq_len], True)
  np.testing.assert_array_equal(ctx.mask[:, LOW.seq_len:], cond.text.mask)
  uncond = ctx.unconditional()
  np.testing.assert_array_equal(uncond.mask[:, :LOW.seq_len], True)
  np.testing.assert_array_equal(uncond.mask[:, LOW.seq_len:], False)
  dropped = ctx.drop(jnp.asarray([True, False, True]))
  np.testing.assert_array_equal(dropped.mask[1], uncond.mask[1])
  np.testing.assert_array_equal(dropped.mask[0], ctx.mask[0])
  pair = ctx.guidance_pair()
  assert pair.keyed_rows is None and pair.embeddings.shape[0] == 2 * B
  np.testing.assert_array_equal(pair.mask[B:], uncond.mask)
  if model.lowres_cfg.aligned:
    # Every high-res token of a 2x2 block gets its low-res token's features,
    # in both guidance branches.
    grid = np.asarray(ctx.aligned).reshape(B, 2, 2, 2, 2, HR.width)
    np.testing.assert_array_equal(grid, np.broadcast_to(
        grid[:, :, :1, :, :1], grid.shape))
    assert len({grid[0, i, 0, j, 0, 0] for i in (0, 1) for j in (0, 1)}) == 4
    np.testing.assert_array_equal(pair.aligned[B:], ctx.aligned)
  else:
    assert ctx.aligned is None


def test_lowres_tokens_condition_both_guidance_branches(model):
  cond = _condition()
  other = conditioning.LowRes(cond.text, (cond.tokens + 1) % 10)
  tokens = jnp.full((B, HR.seq_len), HR.mask_token_id, jnp.int32)
  for ctx_fn in (lambda c: model.context(c),
                 lambda c: model.context(c).unconditional()):
    a = model(tokens, ctx_fn(cond))
    b = model(tokens, ctx_fn(other))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  # Unconditional logits do not depend on the text.
  other_text = conditioning.LowRes(
      conditioning.Text(cond.text.embeddings * 3 + 1, cond.text.mask),
      cond.tokens)
  np.testing.assert_allclose(
      model(tokens, model.context(other_text).unconditional()),
      model(tokens, model.context(cond).unconditional()), atol=1e-6)


def test_bad_conditions_are_named(model):
  cond = _condition()
  with pytest.raises(TypeError, match="LowRes"):
    model.context(cond.text)
  with pytest.raises(ValueError, match=r"expects \[batch, 4\]"):
    model.context(conditioning.LowRes(cond.text, cond.tokens[:, :3]))
  with pytest.raises(ValueError, match="depth"):
    superres.LowResConfig(codebook_size=4, grid_size=2, depth=0)


def test_superres_sampling_invariants(model):
  cond = _condition()
  cfg = sampling.SamplerConfig(num_steps=3, guidance_scale=2.0)
  a = sampling.sample(model, jax.random.key(0), cond, cfg=cfg)
  assert not bool(jnp.any(a == HR.mask_token_id))
  b = sampling.sample(model, jax.random.key(0), cond, cfg=cfg)
  np.testing.assert_array_equal(a, b)
  # Given tokens never change.
  init = np.full((B, HR.seq_len), HR.mask_token_id, np.int32)
  init[:, ::3] = 7
  c = sampling.sample(model, jax.random.key(1), cond, cfg=cfg,
                      init_tokens=jnp.asarray(init))
  np.testing.assert_array_equal(np.asarray(c)[:, ::3], 7)
  # The same shapes again: no new program.
  size = sampling.sample._cache_size()  # pylint: disable=protected-access
  sampling.sample(model, jax.random.key(2), _condition(seed=5), cfg=cfg)
  assert sampling.sample._cache_size() == size  # pylint: disable=protected-access
  # A negative prompt (with the same low-res image) is accepted.
  neg = conditioning.LowRes(_condition(seed=9).text, cond.tokens)
  d = sampling.sample(model, jax.random.key(0), cond, cfg=cfg, negative=neg)
  assert d.shape == (B, HR.seq_len)


@pytest.mark.parametrize("impl", ["plain", "fused"])
def test_chunked_loss_equals_the_whole_loss(model, impl):
  rng = np.random.default_rng(0)
  features = jnp.asarray(rng.normal(size=(B, HR.seq_len, HR.width)),
                         jnp.float32)
  targets = jnp.asarray(rng.integers(0, HR.codebook_size, (B, HR.seq_len)))
  mask = jnp.asarray(rng.random((B, HR.seq_len)) < 0.6)

  def loss(f, chunk):
    return masking.chunked_masked_cross_entropy(
        model.head_logits, f, targets, mask, 0.1, impl, chunk)

  whole, whole_acc = loss(features, 0)
  for chunk in (4, 8):
    part, acc = loss(features, chunk)
    np.testing.assert_allclose(part, whole, rtol=1e-6)
    np.testing.assert_allclose(acc, whole_acc, rtol=1e-6)
    g_whole = jax.grad(lambda f: loss(f, 0)[0])(features)
    g_part = jax.grad(lambda f, c=chunk: loss(f, c)[0])(features)
    np.testing.assert_allclose(g_part, g_whole, rtol=1e-5, atol=1e-8)
  with pytest.raises(ValueError, match="does not divide"):
    loss(features, 5)


def test_superres_task_trains_on_pairs():
  from muse_jax.training import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  task = mt.MaskedTransformerTask(
      HR, optimizer_lib.OptimizerConfig(learning_rate=3e-3, warmup_steps=0),
      mt.ObjectiveConfig(loss_chunk=8), num_steps=30, lowres=LOW)
  with nnx.use_eager_sharding(False):
    model = task.make_model()
  assert isinstance(model, superres.SuperResTransformer)
  optimizer = nnx.Optimizer(model, task.optimizer_cfg.make(30),
                            wrt=nnx.Param)
  cond = _condition(batch=4)
  # High-res targets that are a function of the low-res tokens.
  hr = jnp.repeat(jnp.repeat(cond.tokens.reshape(4, 2, 2), 2, 1), 2, 2)
  batch = {"tokens": hr.reshape(4, -1), "lowres_tokens": cond.tokens,
           "text_emb": cond.text.embeddings, "text_mask": cond.text.mask}

  @nnx.jit
  def step(model, optimizer, rng):
    (loss, _), grads = nnx.value_and_grad(mt.loss_fn, has_aux=True)(
        model, batch, rng, task.objective)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, jax.random.key(i)))
            for i in range(30)]
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses


# ---------------------------------------------------------------------------
# The cascade end to end (tiny).
# ---------------------------------------------------------------------------


def _tiny_cascade_config():
  """The smoke-size cascade; tokenizers without their critics."""
  config = shapes_cascade.get_config("tiny")
  config.tokenizer.adversarial.weight = 0.0
  config.sr_tokenizer.adversarial.weight = 0.0
  return config


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cascade")
  config = _tiny_cascade_config()
  graph = stages.build(config, workdir)
  infos = graph.run()
  return graph, infos


def test_cascade_stages_and_metrics_at_both_resolutions(cascade):
  graph, infos = cascade
  assert list(infos) == ["data", "tokenizer", "sr_tokenizer", "tokenize",
                         "sr_tokenize", "transformer", "superres",
                         "evaluate", "edits"]
  source = tokenize.paired_source(
      {k: graph.stage_dir(k) for k in ("tokenize", "sr_tokenize")}, "train")
  rec = source[3]
  assert np.asarray(rec["tokens"]).shape == (64,)
  assert np.asarray(rec["hr_tokens"]).shape == (256,)
  assert int(rec["index"]) == int(
      records.open_source(graph.stage_dir("sr_tokenize"), "train")[3]["index"])
  metrics = infos["evaluate"]["metrics"]
  assert metrics["validation"]["image_size"] == 128
  assert metrics["validation_base"]["image_size"] == 64
  assert metrics["decoding_superres"]["steps"] == 2
  quality = metrics["superres_quality"]
  assert quality["image_size"] == 128 and quality["num_images"] == 8
  for key in ("superres_psnr", "bicubic_psnr", "sr_tokenizer_psnr"):
    assert 0 < quality[key] < 100
  grid = Image.open(graph.workdir / "samples.png")
  assert grid.size[0] > 0


def test_edits_stage_scores_every_mode_and_keeps_tokens(cascade):
  graph, infos = cascade
  metrics = infos["edits"]["metrics"]
  for mode in ("maskfree", "inpaint", "outpaint"):
    assert metrics[mode]["num"] == 2
    assert 0 <= metrics[mode]["success"] <= 1
  for mode in ("inpaint", "outpaint"):
    assert metrics[mode]["kept_tokens_bitwise"] == 1.0
  assert metrics["settings"]["maskfree"]["iterations"] == 3
  grid = Image.open(graph.workdir / "edits.png")
  assert grid.size[0] > 0
  assert (graph.workdir / "edits.json").exists()


def test_superres_sampling_keys_do_not_retrain(cascade):
  graph, _ = cascade
  config = _tiny_cascade_config()
  config.superres.sampling.num_steps = 3
  other = stages.build(config, graph.workdir, env=object())
  for name in ("superres", "transformer", "tokenize", "sr_tokenize"):
    assert other.fingerprint(name) == graph.fingerprint(name)
  assert other.fingerprint("evaluate") != graph.fingerprint("evaluate")


def test_new_sr_tokenizer_leaves_the_base_side_alone(cascade):
  """The super-res tokenizer's tokens are a stage of their own: changing
  it re-runs sr_tokenize and superres, never tokenize or the transformer."""
  graph, _ = cascade
  config = _tiny_cascade_config()
  config.sr_tokenizer.loop.num_steps = 3
  other = stages.build(config, graph.workdir, env=object())
  for name in ("tokenize", "transformer"):
    assert other.fingerprint(name) == graph.fingerprint(name)
  for name in ("sr_tokenizer", "sr_tokenize", "superres", "evaluate"):
    assert other.fingerprint(name) != graph.fingerprint(name)


def test_paired_source_names_mismatched_records(cascade, tmp_path):
  graph, _ = cascade
  base = graph.stage_dir("tokenize")
  hr = records.open_source(graph.stage_dir("sr_tokenize"), "validation")
  shuffled = [hr[i] for i in reversed(range(len(hr)))]
  records.write(tmp_path / "reversed", "validation", shuffled)
  source = tokenize.PairedSource(base, tmp_path / "reversed", "validation")
  with pytest.raises(records.RecordsError, match="sr_tokenize has scene"):
    source[0]
  records.write(tmp_path / "short", "validation", shuffled[1:])
  with pytest.raises(records.RecordsError, match="sr_tokenize records"):
    tokenize.PairedSource(base, tmp_path / "short", "validation")


def test_generator_samples_the_cascade(cascade):
  graph, _ = cascade
  generate = workdir_lib.load_generator(str(graph.workdir),
                                        sr_sampling_overrides={"num_steps": 3})
  images = generate(["a red circle", "two blue squares"], seed=0)
  assert images.shape == (2, 128, 128, 3) and images.dtype == np.uint8
  again = generate(["a red circle", "two blue squares"], seed=0)
  np.testing.assert_array_equal(images, again)
  base = workdir_lib.load_generator(str(graph.workdir), superres=False)
  assert base(["a red circle"]).shape == (1, 64, 64, 3)


def _sample_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "muse_jax.sample", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env)


def test_sample_cli_writes_each_image_and_a_grid(cascade, tmp_path):
  graph, _ = cascade
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a green triangle\n\n")
  out = tmp_path / "out"
  proc = _sample_cli(f"--workdir={graph.workdir}", "--prompt=a red circle",
                     f"--prompts_file={prompts}", "--num_images=2",
                     "--steps=2", "--sr_steps=2", "--guidance=1.5",
                     "--guidance_schedule=linear", "--temperature=0.5",
                     f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(out))
  assert names == ["000_0.png", "000_1.png", "001_0.png", "001_1.png",
                   "grid.png"]
  assert Image.open(out / "000_0.png").size == (128, 128)


@pytest.mark.parametrize("args,named", [
    (["--prompt= "], "prompt 0 is empty"),
    (["--prompt=a red circle", "--prompts_file=/nonexistent/p.txt"],
     "/nonexistent/p.txt"),
    (["--prompt=a red circle", "--negative_prompt="],
     "--negative_prompt is empty"),
])
def test_sample_cli_bad_input_is_one_line(cascade, tmp_path, args, named):
  graph, _ = cascade
  proc = _sample_cli(f"--workdir={graph.workdir}", *args,
                     f"--out={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert named in proc.stderr and "Traceback" not in proc.stderr


def test_sr_steps_on_a_base_workdir_is_named(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  (workdir / "config.json").write_text(
      shapes_demo.get_config("tiny").to_json())
  (workdir / "stages.json").write_text(
      '{"tokenizer": {"dir": "x"}, "transformer": {"dir": "y"}}')
  with pytest.raises(ValueError, match="no super-res stage"):
    workdir_lib.load_generator(str(workdir), None, {"num_steps": 4})


# ---------------------------------------------------------------------------
# Multi-scale editing of a cascade workdir (muse_jax.editor, the edit CLI).
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def editor(cascade):
  from muse_jax import editor as editor_lib  # pylint: disable=g-import-not-at-top
  graph, _ = cascade
  return editor_lib.Editor(workdir_lib.load_generator(str(graph.workdir),
                                                      batch_size=1))


def _source(editor):
  from muse_jax.data import shapes  # pylint: disable=g-import-not-at-top
  return shapes.example("validation", 0, 0, (editor.size,))[
      shapes.image_key(editor.size)]


def test_editor_edits_at_the_cascade_resolution(editor):
  from muse_jax import editing  # pylint: disable=g-import-not-at-top
  assert editor.size == 128 and editor.base_size == 64
  image = _source(editor)
  region = editing.box_mask(128, 128, (32, 32, 96, 96))
  a = editor.inpaint(image, region, "a red circle", seed=0)
  assert a.shape == (128, 128, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(
      a, editor.inpaint(image, region, "a red circle", seed=0))
  b = editor.outpaint(image, region, "a red circle", seed=0)
  assert b.shape == (128, 128, 3)
  edited, steps = editor.maskfree(image, "a blue square", iterations=4,
                                  intermediate_every=2)
  assert edited.shape == (128, 128, 3) and len(steps) == 2
  with pytest.raises(ValueError, match="whole image"):
    editor.outpaint(image, np.ones((128, 128), bool), "a red circle")
  with pytest.raises(ValueError, match=r"\(64, 64\)"):
    editor.inpaint(image, np.ones((64, 64), bool), "a red circle")
  with pytest.raises(ValueError, match="prompt is empty"):
    editor.maskfree(image, "  ", iterations=2)


def test_editor_batch_rows_do_not_depend_on_the_batch(editor):
  """A batch edit's first row equals the one-image edit, tokens and all
  (draws depend on a row's index, never on the other rows)."""
  from muse_jax import editing  # pylint: disable=g-import-not-at-top
  from muse_jax.data import shapes  # pylint: disable=g-import-not-at-top
  images = np.stack([shapes.example("validation", i, 0, (128,))[
      shapes.image_key(128)] for i in range(2)])
  region = editing.box_mask(128, 128, (0, 64, 128, 128))
  prompts = ["a red circle", "a blue square"]
  batch = editor.inpaint_batch(images, np.stack([region] * 2), prompts,
                               seed=3)
  assert batch.base.shape == (2, 64) and batch.hr.shape == (2, 256)
  one = editor.inpaint_batch(images[:1], region[None], prompts[:1], seed=3)
  np.testing.assert_array_equal(batch.hr[0], one.hr[0])
  np.testing.assert_array_equal(batch.images[0], one.images[0])
  edited, _ = editor.maskfree_batch(images, prompts, iterations=2)
  alone, _ = editor.maskfree_batch(images[:1], prompts[:1], iterations=2)
  np.testing.assert_array_equal(edited.base[0], alone.base[0])
  with pytest.raises(ValueError, match="one prompt per image"):
    editor.maskfree_batch(images, prompts[:1], iterations=2)


def test_editor_negative_prompt_per_image(editor):
  """One negative prompt per image equals that prompt given once for the
  batch, a row's result depends on its own negative only, and a wrong
  count is named."""
  from muse_jax import editing  # pylint: disable=g-import-not-at-top
  from muse_jax.data import shapes  # pylint: disable=g-import-not-at-top
  images = np.stack([shapes.example("validation", i, 0, (128,))[
      shapes.image_key(128)] for i in range(2)])
  keep = np.stack([editing.box_mask(128, 128, (0, 0, 64, 64))] * 2)
  prompts = ["a red circle", "a blue square"]
  once = editor.outpaint_batch(images, keep, prompts, seed=2,
                               negative_prompt="a green triangle")
  each = editor.outpaint_batch(images, keep, prompts, seed=2,
                               negative_prompt=["a green triangle"] * 2)
  np.testing.assert_array_equal(once.hr, each.hr)
  mixed = editor.outpaint_batch(images, keep, prompts, seed=2,
                                negative_prompt=["a green triangle",
                                                 "two yellow stars"])
  np.testing.assert_array_equal(mixed.base[0], once.base[0])
  with pytest.raises(ValueError, match="3 negative prompts for 2 images"):
    editor.outpaint_batch(images, keep, prompts,
                          negative_prompt=["a green triangle"] * 3)


def test_editor_inpainting_keeps_tokens_outside_the_region(editor,
                                                          monkeypatch):
  """Both resolutions' edits keep every token outside the region."""
  from muse_jax import editing  # pylint: disable=g-import-not-at-top
  seen = []
  real = editing.inpaint

  def recording(model, rng, condition, tokens, token_mask, **kw):
    out = real(model, rng, condition, tokens, token_mask, **kw)
    seen.append((np.asarray(tokens), np.asarray(token_mask),
                 np.asarray(out)))
    return out

  monkeypatch.setattr(editing, "inpaint", recording)
  image = _source(editor)
  region = editing.box_mask(128, 128, (0, 0, 40, 128))
  editor.inpaint(image, region, "a green triangle", seed=1)
  assert [t.shape[1] for t, _, _ in seen] == [64, 256]
  for tokens, mask, out in seen:
    mask = np.broadcast_to(mask, tokens.shape)
    assert mask.any() and not mask.all()
    np.testing.assert_array_equal(out[~mask], tokens[~mask])


def test_pretokenize_cli_tokenizes_webdataset_shards(cascade, tmp_path):
  """Validation scenes written as img2dataset tar shards, pre-tokenised by
  the cascade's tokenizers through the CLI: the high-res tokens equal the
  sr_tokenize stage's for the same scenes, broken records are counted."""
  import io  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import captioned_files  # pylint: disable=g-import-not-at-top
  from muse_jax.data import shapes  # pylint: disable=g-import-not-at-top
  graph, _ = cascade
  source = stages.data.split_source(graph.config,
                                    graph.stage_dir("data"), "validation")
  hr = records.open_source(graph.stage_dir("sr_tokenize"), "validation")
  raw = tmp_path / "raw"
  raw.mkdir()
  for s in range(2):
    samples = []
    for i in range(3 * s, 3 * s + 3):
      buf = io.BytesIO()
      Image.fromarray(np.asarray(source[i][shapes.image_key(128)])).save(
          buf, "PNG")
      caption = source[i]["caption"]
      samples.append((f"{i:09d}", {"png": buf.getvalue(), "txt": (
          caption if isinstance(caption, bytes) else caption.encode())}))
    samples.append((f"bad{s}", {"jpg": b"truncated", "txt": b"x"}))
    captioned_files.write_tar(raw / f"{s:05d}.tar", samples)
  out = tmp_path / "tokens"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "muse_jax.pretokenize",
       f"--workdir={graph.workdir}", "--format=webdataset", f"--path={raw}",
       f"--out={out}", "--embed_captions", "--batch_size=2"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote 6 records in 2 shards" in proc.stdout
  manifest = json.loads((out / "train.json").read_text())
  assert manifest["skipped"] == {"corrupt_image": 2}
  assert manifest["sr_image_size"] == 128 and manifest["image_size"] == 64
  got = records.open_source(out, "train")
  for i in range(6):
    rec = got[i]
    assert rec["key"] == f"{i:09d}"
    assert np.asarray(rec["tokens"]).shape == (64,)
    np.testing.assert_array_equal(rec["hr_tokens"], hr[i]["hr_tokens"])
    assert np.asarray(rec["text_emb"]).shape[1] == manifest["text_dim"]
  proc = subprocess.run(
      [sys.executable, "-m", "muse_jax.pretokenize",
       f"--workdir={graph.workdir}", "--format=webdataset",
       f"--path={tmp_path / 'nothing'}", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def _edit_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "muse_jax.edit", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env)


def test_edit_cli_inpaints_from_a_mask_file(cascade, tmp_path):
  graph, _ = cascade
  src = tmp_path / "src.png"
  # A 96 px RGBA source: converted and resized with warnings.
  Image.fromarray(np.full((96, 96, 4), 200, np.uint8)).save(src)
  mask = np.zeros((96, 96), np.uint8)
  mask[20:60, 20:60] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  out = tmp_path / "out.png"
  proc = _edit_cli(f"--workdir={graph.workdir}", "--mode=inpaint",
                   f"--image={src}", f"--mask={tmp_path / 'mask.png'}",
                   "--prompt=a red circle", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "converted to RGB" in proc.stderr and "resized" in proc.stderr
  assert Image.open(out).size == (128, 128)


@pytest.mark.parametrize("kind,named", [
    ("mask_size", "must have the image's size"),
    ("corrupt", "cannot read image"),
    ("missing", "not found"),
    ("empty_prompt", "--prompt is empty"),
    ("maskfree_box", "takes no --mask or --box"),
    ("bad_box", "outside"),
])
def test_edit_cli_bad_input_is_one_line(tmp_path, kind, named):
  src = tmp_path / "src.png"
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(src)
  args = ["--workdir=/nonexistent", "--mode=inpaint", f"--image={src}",
          "--prompt=a red circle", "--box=0,0,8,8"]
  if kind == "mask_size":
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "m.png")
    args[-1] = f"--mask={tmp_path / 'm.png'}"
  elif kind == "corrupt":
    src.write_bytes(b"not a png")
  elif kind == "missing":
    args[2] = "--image=/nonexistent/x.png"
  elif kind == "empty_prompt":
    args[3] = "--prompt= "
  elif kind == "maskfree_box":
    args[1] = "--mode=maskfree"
  elif kind == "bad_box":
    args[-1] = "--box=0,0,80,8"
  proc = _edit_cli(*args)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert named in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("crop", [20, 256])
def test_bad_tokenizer_crop_is_named(tmp_path, crop):
  config = shapes_cascade.get_config("tiny")
  config.sr_tokenizer.train_crop = crop
  with pytest.raises(ValueError, match="sr_tokenizer.train_crop"):
    stages.build(config, tmp_path, env=object())
