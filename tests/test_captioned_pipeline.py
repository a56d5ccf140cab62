"""Real-format datasets through the main job, and the raw stream's resume.

The same shapes scenes are written as img2dataset webdataset tar shards,
img2dataset parquet files and a COCO captions folder (`captioned_files`);
each trains the tiny `configs/cc3m.py` end to end through the CLI, the
config switch (`:format=...`) and the paths being the only difference.
The tokenizer streams the raw shards; the tokenize stage pre-tokenises
them into the records the transformer reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import captioned_files as cf
from muse_jax import checkpointing
from muse_jax.data import records
from muse_jax.data.captioned import dataset
from muse_jax.data.captioned import preprocess
from muse_jax.data.captioned import stream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMATS = ("webdataset", "parquet", "coco")
NUM = {"train": 40, "validation": 16}
# The same for every format: the tokenizer's critic is tested elsewhere.
FLAGS = ("--config.tokenizer.adversarial.weight=0",)


def _args(data: dict[str, dict[str, str]]) -> list[str]:
  return [f"--config.data.{split}.{k}={v}" for split, kv in data.items()
          for k, v in kv.items()] + list(FLAGS)


def _env(**kw) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **kw)
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _main(fmt: str, data: dict[str, dict[str, str]], workdir: str,
          *extra: str, env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "muse_jax.main",
       f"--config=configs/cc3m.py:tiny,format={fmt}", f"--workdir={workdir}",
       *_args(data), *extra], cwd=REPO, env=env or _env(),
      capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("captioned")
  out = {}
  for fmt in FORMATS:
    data = {split: {k: v for k, v in cf.write_format(
        root / fmt / split, fmt, cf.shapes_examples(split, n)).items()
                    if k != "records_per_shard"}
            for split, n in NUM.items()}
    workdir = str(root / f"run_{fmt}")
    proc = _main(fmt, data, workdir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out[fmt] = (workdir, proc.stdout)
    out[f"data_{fmt}"] = data
  return out


def _stage_dir(workdir: str, stage: str) -> str:
  return json.load(open(os.path.join(workdir, "stages.json")))[stage]["dir"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_trains_the_tiny_config_end_to_end(runs, fmt):
  workdir, stdout = runs[fmt]
  for stage in ("data", "tokenizer", "tokenize", "transformer", "evaluate"):
    assert f"== stage {stage} done" in stdout, stage
  assert os.path.exists(os.path.join(workdir, "samples.png"))
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  assert metrics["validation"]["num_prompts"] == 8
  assert metrics["decoding"]["steps"] == 4
  tokens_dir = _stage_dir(workdir, "tokenize")
  for split, n in NUM.items():
    source = records.open_source(tokens_dir, split)
    assert len(source) == n
    assert source.manifest["skipped"] == {}
    expected = {key: caps for key, _, caps in cf.shapes_examples(split, n)}
    seen = {}
    for i in range(n):
      r = source[i]
      key = r["key"].decode() if isinstance(r["key"], bytes) else r["key"]
      caption = r["caption"]
      caption = caption.decode() if isinstance(caption, bytes) else caption
      seen[str(key)] = caption
      assert r["tokens"].shape == (16,)  # 32 px at f=8.
      assert r["text_emb"].shape[1] == source.manifest["text_dim"]
    if fmt == "coco":  # COCO keys are image ids, in file order.
      seen = {f"{split}{int(k):05d}": c for k, c in seen.items()}
    assert sorted(seen) == sorted(expected)
    # One of the record's captions (COCO: either of the two).
    assert all(c in expected[k] for k, c in seen.items())
  transformer = os.path.join(_stage_dir(workdir, "transformer"),
                             "metrics.jsonl")
  losses = [r for r in map(json.loads, open(transformer)) if "loss" in r]
  assert losses and all(np.isfinite(r["loss"]) for r in losses)


def test_tokenizer_checkpoint_holds_the_raw_streams_position(runs):
  workdir, _ = runs["webdataset"]
  ckpt = os.path.join(_stage_dir(workdir, "tokenizer"), "checkpoints")
  steps = sorted(int(s) for s in os.listdir(ckpt) if s.isdigit())
  assert steps[-1] == 4
  state = json.load(open(os.path.join(ckpt, str(steps[-1]), "data_iter",
                                     "process_0-of-1.json")))
  # ShardExamples' position: the shard order's state and the examples
  # read from the open shard (4 steps of 8 from 8-record shards).
  assert state["parent"] and state["offset"] == 8 and state["open"]


def test_two_processes_pretokenise_their_own_shards(runs, tmp_path):
  """Two jax.distributed processes run the main job: each streams and
  pre-tokenises its own shards on its own devices. Re-tokenised in one
  process with the same trained tokenizer, the shards are byte-identical."""
  import shutil  # pylint: disable=g-import-not-at-top
  data, multi = runs["data_webdataset"], str(tmp_path / "multi")
  proc = subprocess.run(
      ["bash", "launch/multiprocess.sh", "2",
       "configs/cc3m.py:tiny,format=webdataset", multi, *_args(data)],
      cwd=REPO, env=_env(PYTHON=sys.executable,
                         PORT=str(20000 + (os.getpid() + 7) % 20000),
                         XLA_FLAGS="--xla_force_host_platform_device_count=2"),
      capture_output=True, text=True, timeout=600)
  logs = "".join(open(f"{multi}.proc{i}.log").read()[-2000:] for i in (0, 1)
                 if os.path.exists(f"{multi}.proc{i}.log"))
  assert proc.returncode == 0, logs
  assert os.path.exists(os.path.join(multi, "samples.png"))
  tokens = _stage_dir(multi, "tokenize")
  store = tmp_path / "store"
  shutil.copytree(os.path.join(multi, "stages"), store)
  shutil.rmtree(store / os.path.basename(tokens))
  single = tmp_path / "single"
  proc = _main("webdataset", data, str(single), f"--stage_store={store}",
               "--stages=data,tokenizer,tokenize",
               env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tokenizer: already done" in proc.stdout
  again = store / os.path.basename(tokens)
  names = sorted(n for n in os.listdir(tokens) if n.endswith(".array_record"))
  assert len(names) == 7  # 5 train + 2 validation shards, one for one.
  for name in names:
    assert open(os.path.join(tokens, name), "rb").read() == (
        again / name).read_bytes(), name
  for split in ("train", "validation"):
    a = json.load(open(os.path.join(tokens, f"{split}.json")))
    b = json.loads((again / f"{split}.json").read_text())
    assert a == b


@pytest.mark.parametrize("fmt", ("webdataset", "parquet", "coco", "folder",
                                 "tfds"))
def test_the_full_recipe_passes_every_stage_check(tmp_path, fmt):
  from configs import cc3m  # pylint: disable=g-import-not-at-top
  from muse_jax import stages  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import artifacts  # pylint: disable=g-import-not-at-top
  config = cc3m.get_config(f"format={fmt}")
  config.data.train.path = str(tmp_path)
  if fmt == "tfds":
    config.data.validation.split = "validation"
  else:
    config.data.validation.path = str(tmp_path)
  config.data.train.images = config.data.validation.images = str(tmp_path)
  config.text_encoder.path = str(tmp_path)  # T5-XXL's sizes: the preset's.
  config.tokenizer.perceptual.vgg16_path = str(tmp_path / "vgg16.pth")
  stages.build(config, tmp_path / "run")  # Checks every stage.
  assert artifacts.vq_config(config).downsample_factor == 16  # 256 -> 16x16


def test_the_full_recipe_is_a_632m_base_model(tmp_path):
  import math  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from configs import cc3m  # pylint: disable=g-import-not-at-top
  from muse_jax.models import transformer  # pylint: disable=g-import-not-at-top
  from muse_jax.stages import artifacts  # pylint: disable=g-import-not-at-top
  config = cc3m.get_config()
  config.text_encoder.path = str(tmp_path)  # T5-XXL's 4096 from the preset.
  cfg = artifacts.transformer_config(config)
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: transformer.MaskedTransformer(
        cfg, rngs=nnx.Rngs(0)))
  n = sum(math.prod(v.shape) for v in jax.tree.leaves(
      nnx.state(model, nnx.Param)))
  assert cfg.seq_len == 256
  assert 0.6e9 < n < 0.7e9, n
  print(f"cc3m base transformer: {n / 1e6:.1f}M parameters")


def test_pretokenize_cli_redoes_only_unfinished_shards(runs, tmp_path):
  """The pretokenize CLI with the run's trained tokenizer: a restart after
  a kill (one shard's output and marker gone, a partial file left, no
  manifest) redoes that shard alone, and every file is byte-identical."""
  workdir, _ = runs["webdataset"]
  out = tmp_path / "tokens"
  cmd = [sys.executable, "-m", "muse_jax.pretokenize", f"--workdir={workdir}",
         "--format=webdataset",
         f"--path={runs['data_webdataset']['train']['path']}",
         f"--out={out}", "--embed_captions", "--batch_size=3"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote 40 records in 5 shards" in proc.stdout
  whole = {p.name: p.read_bytes() for p in out.iterdir()}
  (out / "train-00002.array_record").unlink()
  (out / "train-00002.done.json").unlink()
  (out / "train.json").unlink()
  (out / "train-00002.array_record.tmp").write_bytes(b"cut off")
  before = {n: (out / n).stat().st_mtime_ns for n in whole
            if (out / n).exists()}
  proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = {p.name: p.read_bytes() for p in out.iterdir()
           if not p.name.endswith(".tmp")}
  assert again == whole
  for name, mtime in before.items():  # The finished shards were not redone.
    if name.endswith((".array_record", ".done.json")):
      assert (out / name).stat().st_mtime_ns == mtime, name


def test_a_wrong_path_fails_in_the_data_stage(tmp_path):
  proc = _main("webdataset", {"train": {"path": str(tmp_path / "none")},
                              "validation": {"path": str(tmp_path)}},
               str(tmp_path / "run"))
  assert proc.returncode != 0
  assert "no files match" in proc.stderr and "none" in proc.stderr


def test_validation_defaults_to_an_error_not_the_training_data(tmp_path):
  proc = _main("webdataset", {"train": {"path": str(tmp_path)}},
               str(tmp_path / "run"))
  assert proc.returncode != 0
  assert "data.validation: set its path" in proc.stderr


# --- The raw stream: two processes, checkpointed mid-epoch. ---


def test_two_processes_resume_from_a_checkpoint_mid_epoch(tmp_path):
  """Each process streams its shards, checkpoints its iterator (Orbax +
  grain's handler, as the trainers do) mid-epoch, and a fresh iterator
  restored from that checkpoint finishes the epoch: across both
  processes, before and after, every example exactly once."""
  examples = cf.shapes_examples("train", 44, size=32)
  cf.write_format(tmp_path / "raw", "webdataset", examples, per_shard=5)
  shards = dataset.list_shards(dataset.SourceConfig(
      format="webdataset", path=str(tmp_path / "raw")))
  cfg = preprocess.PreprocessConfig(image_size=16, crop="random")

  def make(p):
    return iter(stream.stream(shards, cfg, batch_size=2, seed=5,
                              process_index=p, process_count=2,
                              num_epochs=1))

  seen = {0: [], 1: []}
  for p in (0, 1):
    it = make(p)
    for _ in range(3):  # 6 examples: inside this process's second shard.
      seen[p] += list(next(it)["key"])
    ckpt = checkpointing.Checkpointer(tmp_path / f"ckpt{p}", parts=("m",),
                                      async_save=False,
                                      handle_sigterm=False)
    ckpt.save(3, {"m": ({"w": np.zeros(2)}, None)}, data_iter=it)
    ckpt.wait()
    ckpt.close()
    reference = list(it)  # What the interrupted run would have read next.
    resumed = make(p)
    reader = checkpointing.Checkpointer(tmp_path / f"ckpt{p}", parts=("m",),
                                        read_only=True, handle_sigterm=False)
    reader.restore({"m": ({"w": np.zeros(2)}, None)}, data_iter=resumed)
    reader.close()
    rest = list(resumed)
    assert [list(b["key"]) for b in rest] == [list(b["key"])
                                             for b in reference]
    for a, b in zip(rest, reference):
      np.testing.assert_array_equal(a["image"], b["image"])
    seen[p] += [k for b in rest for k in b["key"]]
  # 9 shards of 5 (the last has 4): process 0 owns 5 shards (24
  # examples), process 1 four (20); batches of 2 drop nothing.
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(k for k, _, _ in examples)


def test_recipe_sweep_points_and_args():
  from configs import cc3m  # pylint: disable=g-import-not-at-top
  points = []
  cc3m.sweep(lambda **kw: points.append(kw))
  config = cc3m.get_config()
  assert len(points) >= 2
  for point in points:
    for key, value in point.items():
      node = config
      *parents, leaf = key.split(".")
      for part in parents:
        node = node[part]
      assert type(node[leaf]) is type(value), key
  assert cc3m.get_config("format=parquet").data.train.format == "parquet"
  with pytest.raises(ValueError, match="bogus"):
    cc3m.get_config("bogus=1")
