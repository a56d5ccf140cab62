r"""Runs a Muse experiment end to end: every stage, in order, resumably.

  python -m muse_jax.main --config=configs/shapes_demo.py --workdir=DIR

Finished stages are skipped on a re-run, and a changed config key re-runs
exactly the stages that depend on it (muse_jax.stages.graph); an
interrupted stage resumes from its newest checkpoint. `--config.a.b=value`
overrides are type-checked and unknown keys are rejected.
`--stages=data,tokenizer` runs a subset; `--stage_store=DIR` shares
finished stages between runs (sweeps).

Multi-host: `jax.distributed` is initialised here, from the explicit flags
or JAX's own cluster detection (TPU pods, SLURM, ...). The console shows
the project's progress lines; library logs go to `<workdir>/logs/` (or
`--log_dir`).
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import flags
from absl import logging
from ml_collections import config_flags

from muse_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs are written.")
_STAGES = flags.DEFINE_list("stages", None, "Subset of stages to run.")
_STORE = flags.DEFINE_string(
    "stage_store", None,
    "Where stage outputs live (default <workdir>/stages); runs that share "
    "it share finished stages.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")

flags.mark_flags_as_required(["config", "workdir"])


def _log_to_file(workdir: str, process: int) -> str:
  """Sends the libraries' absl logs (Orbax, TFDS, grain) to a file; errors
  still reach stderr."""
  log_dir = flags.FLAGS.log_dir  # absl's own flag.
  if not log_dir:
    local = "://" not in workdir
    log_dir = (os.path.join(workdir, "logs") if local
               else tempfile.mkdtemp(prefix="muse_jax_logs_"))
  try:
    os.makedirs(log_dir, exist_ok=True)
  except OSError as e:
    raise PermissionError(
        f"log directory {log_dir} is not writable: {e.strerror or e}") from e
  logging.get_absl_handler().use_absl_log_file(f"main.proc{process}",
                                               log_dir)
  flags.FLAGS.stderrthreshold = "error"
  return log_dir


def main(argv):
  del argv
  workdir = _WORKDIR.value
  log_dir = _log_to_file(workdir, _PROCESS_ID.value or 0)
  from muse_jax import distributed  # pylint: disable=g-import-not-at-top
  how = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  import jax  # pylint: disable=g-import-not-at-top
  from muse_jax import stages  # pylint: disable=g-import-not-at-top
  if distributed.is_leader():
    print(f"processes: {jax.process_count()} ({how or 'single'}), devices: "
          f"{jax.device_count()} {jax.devices()[0].platform}; library logs "
          f"in {log_dir}", flush=True)
  graph = stages.build(_CONFIG.value, workdir, store=_STORE.value)
  graph.run(_STAGES.value)
  ran = _STAGES.value or graph.order
  if distributed.is_leader():
    for name, published in (("evaluate", ("samples.png", "metrics.json")),
                            ("tokenizer_eval", tokenizer_eval_published())):
      if name in ran and name in graph.order:
        print("wrote " + " and ".join(str(graph.workdir / p)
                                      for p in published), flush=True)


def tokenizer_eval_published() -> tuple[str, ...]:
  from muse_jax.stages import tokenizer_eval  # pylint: disable=g-import-not-at-top
  return tokenizer_eval.PUBLISHED


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a one-line error for a bad flag or config key."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections reports an unknown --config.<key> override this way.
    key = str(e).strip("'\"")
    bad = [a for a in argv if a.startswith("--config.") and key in a]
    print(f"error: unknown config key {key!r}"
          f"{' in ' + bad[0] if bad else ''}; see the config file for the "
          "valid keys", file=sys.stderr)
  except (flags.Error, ValueError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
  sys.exit(2)


def run():
  cli.run(main, errors=cli.USER_ERRORS + (FloatingPointError,),
          flags_parser=parse_flags)


if __name__ == "__main__":
  run()
