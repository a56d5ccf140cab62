"""The stage graph end to end at smoke size: outputs, what re-runs, sweeps.

One tiny demo run (module fixture) is shared; tests that change config keys
run in their own copies of its workdir and count the stages that run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

from etils import epath
from flax import nnx
import numpy as np
import pytest

from configs import shapes_demo
from muse_jax import checkpointing
from muse_jax import stages
from muse_jax.data import records
from muse_jax.stages import artifacts
from muse_jax.stages import graph as graph_lib
from muse_jax.stages import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ran(output: str) -> list[str]:
  """Stages that ran (not skipped), from the graph's console lines."""
  return re.findall(r"== stage \d+/\d+ (\w+) ->", output)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo")
  graph = stages.build(shapes_demo.get_config("tiny"), workdir)
  infos = graph.run()
  return graph, infos


def _copy(finished, tmp_path) -> epath.Path:
  graph, _ = finished
  copy = tmp_path / "copy"
  shutil.copytree(graph.workdir, copy)
  return epath.Path(copy)


def _build(config, workdir, finished):
  # The copy's stage store is its own; the env (mesh, encoder) is reused.
  return stages.build(config, workdir, env=finished[0].env)


def test_all_stages_write_their_outputs(finished):
  graph, infos = finished
  assert list(infos) == list(stages.NAMES)
  for name in stages.NAMES:
    assert graph.is_done(name), name
  wd = graph.workdir
  assert (wd / "samples.png").stat().length > 1000
  metrics = json.loads((wd / "metrics.json").read_text())
  for split in ("validation", "heldout"):
    m = metrics[split]
    for key in ("accuracy/overall", "accuracy/single", "accuracy/count",
                "accuracy/relation"):
      assert 0.0 <= m[key] <= 1.0, (split, key, m)
    assert m["num_prompts"] == 8
  assert metrics["decoding"]["steps"] == 4
  assert metrics["decoding"]["tokens"] == 64
  assert metrics["decoding"]["tokens_per_step"] == 16
  assert set(metrics["timings_s"]) == set(stages.NAMES[:-1])
  manifest = json.loads((wd / graph_lib.MANIFEST).read_text())
  assert {k: v["fingerprint"] for k, v in manifest.items()} == {
      n: graph.fingerprint(n) for n in stages.NAMES}
  # Tokens and caption embeddings live in ArrayRecord shards.
  train = records.open_source(graph.stage_dir("tokenize"), "train")
  assert len(train) == 64
  rec = train[0]
  assert rec["tokens"].shape == (64,) and rec["tokens"].max() < 32
  assert rec["text_emb"].dtype.name == "bfloat16"
  assert rec["text_emb"].shape[1] == 384
  # Metrics: JSON lines and TensorBoard events for each training stage.
  for name in ("tokenizer", "transformer"):
    d = graph.stage_dir(name)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 4
    assert list((d / "tb").glob("events.out.tfevents.*"))


def test_rerun_skips_finished_stages(finished, capsys):
  graph, infos = finished
  again = stages.build(graph.config, graph.workdir, env=graph.env).run()
  out = capsys.readouterr().out
  assert _ran(out) == []
  assert out.count("already done") == len(stages.NAMES)
  assert again["transformer"]["steps"] == infos["transformer"]["steps"]


def test_transformer_key_reruns_transformer_and_evaluate_only(
    finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  config = shapes_demo.get_config("tiny")
  config.transformer.model.mlp_dim = 48
  _build(config, workdir, finished).run()
  assert _ran(capsys.readouterr().out) == ["transformer", "evaluate"]


def test_sampling_key_reruns_evaluate_only(finished, tmp_path, capsys):
  workdir = _copy(finished, tmp_path)
  config = shapes_demo.get_config("tiny")
  config.sampling.guidance_scale = 2.0
  g = _build(config, workdir, finished)
  g.run()
  assert _ran(capsys.readouterr().out) == ["evaluate"]
  # The first config's evaluation is still there, untouched.
  old = finished[0].stage_dir("evaluate").name
  assert (workdir / "stages" / old / graph_lib.DONE).exists()
  assert g.stage_dir("evaluate").name != old


def test_inception_and_clip_paths_add_fid_and_clip_score(finished,
                                                         tmp_path, capsys):
  from muse_jax.evaluation import inception_layout  # pylint: disable=g-import-not-at-top
  from muse_jax.interop import torch_files  # pylint: disable=g-import-not-at-top
  weights = tmp_path / inception_layout.WEIGHTS_FILE
  torch_files.save(inception_layout.random_state_dict(0), weights)
  workdir = _copy(finished, tmp_path)
  config = shapes_demo.get_config("tiny")
  config.eval.update(inception_path=str(weights), num_heldout=0)
  clip_dir = os.path.join(REPO, "tests", "golden", "clip_score_tiny")
  config.eval.update(clip_path=f"{clip_dir}/openai_jit.pt",
                     clip_model=f"{clip_dir}/arch.json",
                     clip_tokenizer=f"{REPO}/tests/golden/clip_tiny")
  g = _build(config, workdir, finished)
  g.run()
  assert _ran(capsys.readouterr().out) == ["evaluate"]
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert np.isfinite(metrics["validation"]["fid"])
  assert metrics["validation"]["fid"] > 0
  assert -1 <= metrics["validation"]["clip_score"] <= 1
  assert "accuracy/overall" in metrics["validation"]
  config.eval.inception_path = str(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError, match="--config.eval.inception_path"):
    _build(config, workdir, finished)
  config.eval.update(inception_path="", clip_path=str(tmp_path / "c.pt"))
  with pytest.raises(FileNotFoundError, match="--config.eval.clip_path"):
    _build(config, workdir, finished)


def test_fingerprints_follow_only_declared_keys():
  base = shapes_demo.get_config("tiny")
  fp = lambda c: {n: stages.build(c, "/tmp/unused", env=object())
                  .fingerprint(n) for n in stages.NAMES}
  ref = fp(base)
  cases = {
      "eval.batch_size": ["evaluate"],
      "sampling.num_steps": ["evaluate"],
      "transformer.loop.num_steps": ["transformer", "evaluate"],
      "text_encoder.max_len": ["tokenize", "transformer", "evaluate"],
      "tokenizer.model.code_dim": ["tokenizer", "tokenize", "transformer",
                                   "evaluate"],
      "data.num_train": list(stages.NAMES),
      "seed": ["tokenizer", "tokenize", "transformer", "evaluate"],
  }
  for key, changed in cases.items():
    config = shapes_demo.get_config("tiny")
    section, _, leaf = key.rpartition(".")
    node = config
    for part in filter(None, section.split(".")):
      node = node[part]
    node[leaf] = node[leaf] + 1 if not isinstance(node[leaf], str) else "x"
    got = fp(config)
    assert [n for n in stages.NAMES if got[n] != ref[n]] == changed, key
  # Parallelism is not part of any result.
  config = shapes_demo.get_config("tiny")
  config.mesh = [("data", 1), ("fsdp", -1), ("tensor", 1)]
  assert fp(config) == ref


def test_sweep_of_six_sampling_points_trains_once(finished, tmp_path,
                                                  capsys):
  root = tmp_path / "sweep"
  store = root / "stages"
  ran = []
  for scale in (1.0, 2.0):
    for steps in (2, 3, 4):
      config = shapes_demo.get_config("tiny")
      config.sampling.guidance_scale = scale
      config.sampling.num_steps = steps
      stages.build(config, root / f"g{scale}_s{steps}", store=store,
                   env=finished[0].env).run()
      ran += _ran(capsys.readouterr().out)
  counts = {n: ran.count(n) for n in stages.NAMES}
  assert counts == {"data": 1, "tokenizer": 1, "tokenize": 1,
                    "transformer": 1, "evaluate": 6}
  # Each point's workdir has its own published results.
  for d in root.iterdir():
    if d.name != "stages":
      assert (d / "metrics.json").exists()


def test_stage_with_unfinished_inputs_is_named(tmp_path):
  config = shapes_demo.get_config("tiny")
  g = stages.build(config, tmp_path, env=object())
  with pytest.raises(graph_lib.StageError, match="tokenize"):
    g.run(["transformer"])
  with pytest.raises(graph_lib.StageError, match="unknown stages"):
    g.run(["transfomer"])


def test_missing_config_key_is_named():
  config = shapes_demo.get_config("tiny")
  del config["eval"]
  with pytest.raises(graph_lib.StageError, match="'eval'"):
    stages.build(config, "/tmp/unused", env=object())


def test_generate_is_deterministic_and_handles_unknown_words(finished):
  graph, _ = finished
  generate = workdir_lib.load_generator(str(graph.workdir))
  prompts = ["a zorbflax blicket circle", "two red squares", ""]
  a = generate(prompts, seed=3)
  b = generate(prompts, seed=3)
  assert a.shape == (3, 64, 64, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  neg = generate(prompts[:1], seed=3, negative_prompt="a red circle")
  assert neg.shape == (1, 64, 64, 3)


def test_checkpoint_restore_gives_identical_outputs(finished):
  graph, _ = finished
  d = graph.stage_dir("transformer")
  first = artifacts.load_transformer(graph.config, d, graph.env)
  second = artifacts.load_transformer(graph.config, d, graph.env)
  cfg = artifacts.transformer_config(graph.config)
  with nnx.use_eager_sharding(False):
    from muse_jax.models import transformer as tr  # pylint: disable=g-import-not-at-top
    fresh = tr.MaskedTransformer(cfg, rngs=nnx.Rngs(123))
  from muse_jax.models import conditioning  # pylint: disable=g-import-not-at-top
  tokens = np.zeros((8, cfg.seq_len), np.int32)
  text = conditioning.Text(np.ones((8, 4, cfg.text_dim), np.float32),
                           np.ones((8, 4), bool))
  out = lambda m: np.asarray(m(tokens, m.context(text)))
  np.testing.assert_array_equal(out(first), out(second))
  assert not np.allclose(out(fresh), out(first))


def test_missing_checkpoint_is_a_clear_error(finished, tmp_path):
  graph, _ = finished
  with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
    artifacts.load_vq(graph.config, tmp_path / "nowhere", graph.env)


def test_corrupt_checkpoint_is_a_clear_error(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  g = _build(finished[0].config, workdir, finished)
  ckpt_dir = g.stage_dir("transformer") / "checkpoints"
  for root, _, files in os.walk(ckpt_dir):
    if "transformer.model" in root:
      for name in files:
        with open(os.path.join(root, name), "wb") as f:
          f.write(b"garbage")
  with pytest.raises(checkpointing.CheckpointError, match=str(ckpt_dir)):
    artifacts.load_transformer(g.config, g.stage_dir("transformer"), g.env)


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  g = stages.build(shapes_demo.get_config("tiny"), blocker / "workdir",
                   env=object())
  with pytest.raises(PermissionError, match="a_file"):
    g.run()


def test_unknown_model_key_is_rejected():
  config = shapes_demo.get_config("tiny")
  config.transformer.model.unlock()
  config.transformer.model.widht = 3
  with pytest.raises(ValueError, match="widht"):
    artifacts.transformer_config(config)


def _cli(*args, timeout=180):
  return subprocess.run([sys.executable, "-m", "muse_jax.main",
                         "--config=configs/shapes_demo.py:tiny", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.parametrize("flag,named", [
    ("--config.bogus_key=1", "bogus_key"),
    ("--config.sampling.top_k=99999", "top_k"),
    ("--config.sampling.guidance_scale=-1", "guidance_scale"),
])
def test_cli_bad_config_is_a_one_line_error(tmp_path, flag, named):
  proc = _cli(flag, f"--workdir={tmp_path}", "--stages=evaluate")
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and named in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_cli_rejects_unwritable_workdir(tmp_path):
  blocker = tmp_path / "plain_file"
  blocker.write_text("x")
  proc = _cli(f"--workdir={blocker}/w")
  assert proc.returncode == 2
  assert "not writable" in proc.stderr and "plain_file" in proc.stderr


def test_main_imports_no_tensorflow(tmp_path):
  # A stand-in TensorFlow that records being imported: the check can fail
  # even where the real one is not installed.
  fake = tmp_path / "tensorflow"
  fake.mkdir()
  (fake / "__init__.py").write_text(
      "raise ImportError('muse_jax.main imported tensorflow')\n")
  code = ("import sys; import muse_jax.main, muse_jax.stages; "
          "assert 'tensorflow' not in sys.modules")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_sampling_and_decoding_shard_the_batch(finished, monkeypatch):
  """Every device samples and decodes a slice of each batch (8 devices)."""
  from muse_jax import sharding  # pylint: disable=g-import-not-at-top
  seen = []
  original = sharding.shard_host_batch

  def recording(x, mesh, rules):
    out = original(x, mesh, rules)
    seen.append(out)
    return out

  monkeypatch.setattr(sharding, "shard_host_batch", recording)
  generate = workdir_lib.load_generator(str(finished[0].workdir))
  images = generate(["a red circle"] * 3, seed=0)
  assert images.shape == (3, 64, 64, 3)
  assert generate.batch_size % 8 == 0 and seen
  for array in seen:  # text embeddings, mask, then token grids
    shards = array.addressable_shards
    assert len({s.device for s in shards}) == 8
    assert all(s.data.shape[0] == array.shape[0] // 8 for s in shards)


_CLIP_DIR = os.path.join(REPO, "tests", "golden", "clip_score_tiny")
_TINY_CLIP_FLAGS = (f"--clip_path={_CLIP_DIR}/openai_jit.pt",
                    f"--clip_model={_CLIP_DIR}/arch.json",
                    f"--clip_tokenizer={REPO}/tests/golden/clip_tiny")


def _eval_cli(*args, timeout=300):
  # One device: the Inception network runs faster on 2 cores unsplit.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "muse_jax.eval", *args],
                        cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env)


def test_eval_cli_sweeps_guidance_with_accuracy_fid_and_clip(finished,
                                                           tmp_path):
  """The eval CLI over a finished workdir: 1 scale x 2 schedules, scored
  by the shapes scorer, FID (Inception weights: random, in pytorch-fid's
  file layout) and CLIP score (the tiny OpenAI-format CLIP of
  test_clip_score), a results line per setting, TensorBoard and the plot
  of FID against CLIP score."""
  from muse_jax.evaluation import inception_layout  # pylint: disable=g-import-not-at-top
  from muse_jax.interop import torch_files  # pylint: disable=g-import-not-at-top
  graph, _ = finished
  weights = tmp_path / inception_layout.WEIGHTS_FILE
  torch_files.save(inception_layout.random_state_dict(0), weights)
  out = tmp_path / "eval"
  proc = _eval_cli(f"--workdir={graph.workdir}", "--num_prompts=8",
                   "--guidance=1", "--guidance_schedule=constant,linear",
                   "--metrics=accuracy,fid,clip", f"--inception_path={weights}",
                   *_TINY_CLIP_FLAGS, f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ETA" in proc.stdout
  rows = [json.loads(line) for line in open(out / "results.jsonl")]
  assert [(r["guidance_scale"], r["guidance_schedule"]) for r in rows] == [
      (1.0, "constant"), (1.0, "linear")]
  for r in rows:
    assert 0 <= r["accuracy"] <= 1 and r["num_prompts"] == 8
    assert np.isfinite(r["fid"]) and r["fid"] > 0
    assert -1 <= r["clip_score"] <= 1 and r["clip_score"] != 0
  # The recipe's own setting (1.0, constant) samples what the evaluate
  # stage sampled for the same prompts.
  stage = json.loads((graph.workdir / "metrics.json").read_text())
  assert rows[0]["accuracy"] == stage["validation"]["accuracy/overall"]
  assert (out / "sweep.png").stat().st_size > 1000
  data_dir = epath.Path(json.loads(
      (graph.workdir / "stages.json").read_text())["data"]["dir"])
  assert list(data_dir.glob("fid_reference_validation_8_64px_*.npz"))
  assert os.listdir(out / "tb")
  summary = json.load(open(out / "metrics.json"))
  assert summary["num_prompts"] == 8 and len(summary["results"]) == 2


def test_eval_cli_names_the_missing_inception_file(finished, tmp_path):
  graph, _ = finished
  proc = _eval_cli(f"--workdir={graph.workdir}", "--num_prompts=4",
                   "--metrics=fid", f"--inception_path={tmp_path}/x.pth",
                   f"--out={tmp_path}/eval")
  assert proc.returncode == 2
  line = proc.stderr.strip().splitlines()[-1]
  assert "pt_inception-2015-12-05-6726825d.pth" in line
  assert "--inception_path" in line
  proc = _eval_cli(f"--workdir={graph.workdir}", "--num_prompts=4",
                   "--metrics=clip", f"--clip_path={tmp_path}/ViT-L-14.pt")
  assert proc.returncode == 2
  line = proc.stderr.strip().splitlines()[-1]
  assert "ViT-L-14.pt" in line and "--clip_path" in line
  proc = _eval_cli(f"--workdir={graph.workdir}", "--metrics=bleu")
  assert proc.returncode == 2 and "--metrics" in proc.stderr
