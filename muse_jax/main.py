r"""Runs a Muse experiment end to end: every stage, in order, resumably.

  python -m muse_jax.main --config=configs/shapes_demo.py --workdir=DIR

Finished stages are skipped on a re-run; an interrupted stage resumes from
its newest checkpoint. `--config.a.b=value` overrides are type-checked and
unknown keys are rejected. `--stages=data,tokenizer` runs a subset.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs are written.")
_STAGES = flags.DEFINE_list("stages", None, "Subset of stages to run.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")

flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  from muse_jax import experiment  # pylint: disable=g-import-not-at-top
  print(f"process {jax.process_index()}/{jax.process_count()}, "
        f"devices: {jax.devices()}", flush=True)
  exp = experiment.Experiment(_CONFIG.value, _WORKDIR.value)
  exp.run(_STAGES.value or experiment.STAGES)
  if jax.process_index() == 0:
    print(f"wrote {os.path.join(exp.workdir, 'samples.png')} and "
          f"{os.path.join(exp.workdir, 'metrics.json')}", flush=True)


def run():
  try:
    app.run(main)
  except (ValueError, PermissionError, FileNotFoundError,
          RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  run()
