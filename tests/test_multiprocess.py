"""Two processes on localhost run the tiny demo through every stage.

`launch/multiprocess.sh 2` starts two `jax.distributed` processes with two
fake CPU devices each; a single process with four fake devices is the
reference. Both must write one set of files (process 0 writes shared files,
the others wait) and the same results: byte-identical token/embedding
shards and sample grid, equal evaluation metrics, and the same training
losses up to the order of the cross-process gradient sums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/shapes_demo.py:tiny"
# The tokenizer without its critic: the adversarial phase is tested in
# test_stages and test_vq_task; here it would only add two compiles per
# process.
FLAGS = ("--config.tokenizer.adversarial.weight=0",)


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHON=sys.executable,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _files(workdir: str) -> set[str]:
  """Result files, relative; checkpoints' internals and logs left out."""
  out = set()
  for root, _, names in os.walk(workdir):
    rel = os.path.relpath(root, workdir)
    if "checkpoints" in rel.split(os.sep) or rel.startswith("logs") or (
        os.sep + "tb" in os.sep + rel):
      continue
    out |= {os.path.join(rel, n) for n in names}
  return out


def _losses(workdir: str, stage: str) -> list[dict[str, float]]:
  manifest = json.load(open(os.path.join(workdir, "stages.json")))
  path = os.path.join(manifest[stage]["dir"], "metrics.jsonl")
  return [r for r in map(json.loads, open(path)) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("mp")
  single, multi = str(root / "single"), str(root / "multi")
  proc = subprocess.run(
      [sys.executable, "-m", "muse_jax.main", f"--config={CONFIG}",
       f"--workdir={single}", *FLAGS], cwd=REPO, env=_env(4),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  env = dict(_env(2), PORT=str(20000 + os.getpid() % 20000))
  proc = subprocess.run(["bash", "launch/multiprocess.sh", "2", CONFIG, multi,
                         *FLAGS],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  logs = "".join(open(f"{multi}.proc{i}.log").read()[-3000:] for i in (0, 1)
                 if os.path.exists(f"{multi}.proc{i}.log"))
  assert proc.returncode == 0, logs
  return single, multi


def test_one_set_of_files(runs):
  single, multi = runs
  assert _files(multi) == _files(single)
  # Process 1 wrote no shared files of its own.
  assert not [f for f in _files(multi) if "proc1" in f or "process_1" in f]


def test_same_shards_samples_and_metrics(runs):
  single, multi = runs
  for rel in _files(single):
    if rel.endswith((".array_record", "samples.png")):
      with open(os.path.join(single, rel), "rb") as a, open(
          os.path.join(multi, rel), "rb") as b:
        assert a.read() == b.read(), rel
  ma = json.load(open(os.path.join(single, "metrics.json")))
  mb = json.load(open(os.path.join(multi, "metrics.json")))
  for key in ("validation", "heldout", "decoding"):
    assert ma[key] == mb[key], key
  assert mb["num_processes"] == 2 and ma["num_processes"] == 1


def test_same_training_losses(runs):
  single, multi = runs
  for stage in ("tokenizer", "transformer"):
    a, b = _losses(single, stage), _losses(multi, stage)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
      np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=1e-5)
