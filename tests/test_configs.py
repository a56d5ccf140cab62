"""Every config recipe builds, locks, round-trips to JSON and has sweeps."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import common
from configs import shapes_demo
from muse_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("arg", [None, "tiny", "tiny=false"])
def test_get_config_locks_and_round_trips(arg):
  config = shapes_demo.get_config(arg)
  config.lock()
  with pytest.raises(AttributeError):
    config.not_a_key = 1
  again = ml_collections.ConfigDict(json.loads(config.to_json()))
  assert again.transformer.model.width == config.transformer.model.width
  sharding.validate_rules(config.sharding_rules)


def test_tiny_is_smaller():
  full, tiny = shapes_demo.get_config(), shapes_demo.get_config("tiny")
  assert tiny.transformer.loop.num_steps < full.transformer.loop.num_steps
  assert tiny.data.num_train < full.data.num_train


def test_parse_arg_errors_name_the_key():
  with pytest.raises(ValueError, match="bogus"):
    common.parse_arg("bogus=1", tiny=False)
  with pytest.raises(ValueError, match="steps"):
    common.parse_arg("steps", steps=3)
  assert common.parse_arg("steps=7", steps=3).steps == 7


def test_sweep_points_are_valid_overrides():
  points = []
  shapes_demo.sweep(lambda **kw: points.append(kw))
  assert len(points) >= 2
  config = shapes_demo.get_config()
  for point in points:
    for key in point:
      node = config
      for part in key.split("."):
        node = node[part]


def test_sweep_launcher_prints_one_command_per_point(tmp_path):
  out = subprocess.run(
      [sys.executable, "launch/sweep.py", "configs/shapes_demo.py",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      check=True, timeout=60).stdout.strip().splitlines()
  points = []
  shapes_demo.sweep(lambda **kw: points.append(kw))
  assert len(out) == len(points)
  assert all("muse_jax.main" in line for line in out)
  # Every point shares one stage store under the sweep's workdir.
  assert all(f"--stage_store={tmp_path}/stages" in line for line in out)
  assert len({line.split("--workdir=")[1].split()[0] for line in out}) == len(
      out)
