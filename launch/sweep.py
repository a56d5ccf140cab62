r"""Enumerates a config's `sweep(add)` points and prints or runs one job each.

  python launch/sweep.py configs/shapes_demo.py --workdir=workdir/sweep
  python launch/sweep.py configs/shapes_demo.py --workdir=workdir/sweep --run

Each point becomes `--config.<key>=<value>` overrides of the same config file
and gets its own workdir named after its overrides; all points share one
stage store (`<workdir>/stages`), so a stage whose config the points have
in common (the tokenizer and transformer of a sweep over sampling
settings) runs once and the others reuse it (muse_jax.stages.graph). Run
points that share unfinished stages one after another (`--run` does); to
run them in parallel, first run one point per distinct training config.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys


def load_points(config_path: str) -> list[dict[str, object]]:
  spec = importlib.util.spec_from_file_location("sweep_config", config_path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"config file {config_path!r} not found")
  sys.path.insert(0, os.path.dirname(os.path.dirname(
      os.path.abspath(config_path))))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{config_path} defines no sweep(add)")
  points: list[dict[str, object]] = []
  module.sweep(lambda **kw: points.append(kw))
  return points


def commands(config_path: str, workdir: str, python: str = "python3"
             ) -> list[list[str]]:
  out = []
  for point in load_points(config_path):
    name = "_".join(f"{k.split('.')[-1]}{v}" for k, v in sorted(point.items()))
    cmd = [python, "-m", "muse_jax.main", f"--config={config_path}",
           f"--workdir={os.path.join(workdir, name or 'default')}",
           f"--stage_store={os.path.join(workdir, 'stages')}"]
    cmd += [f"--config.{k}={v}" for k, v in sorted(point.items())]
    out.append(cmd)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("config")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--run", action="store_true",
                      help="run the jobs one after another")
  args = parser.parse_args()
  for cmd in commands(args.config, args.workdir, sys.executable):
    print(shlex.join(cmd), flush=True)
    if args.run:
      subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()
