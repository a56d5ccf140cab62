"""Every library module imports together; only the CLIs define flags.

absl flags live in one global registry, so two modules that both define
`--out` cannot be imported into one process. Tests and notebooks import the
library, so the library must define no flags; each CLI below defines its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# The programs: each may define flags and is run, never imported by tests.
CLIS = ("muse_jax.main", "muse_jax.sample", "muse_jax.edit",
        "muse_jax.import_tokenizer",
        "muse_jax.embed_captions", "muse_jax.pretokenize", "muse_jax.eval",
        "benchmarks.bench", "benchmarks.fid_inception",
        "benchmarks.tokenizer", "benchmarks.input_pipeline",
        "benchmarks.text_encoder", "benchmarks.text_encoder_aot")
# Run by the peers' own virtual environment (PyTorch), not importable here.
PEERS = "benchmarks.peers"
# Modules of an optional extra: imported where their package is installed.
EXTRAS = {"muse_jax.data.seqio_tasks": "seqio"}

_PROBE = r"""
import importlib, importlib.util, json, pkgutil, sys
from absl import flags
import muse_jax, benchmarks, configs
clis = set(json.loads(sys.argv[1]))
peers = sys.argv[2]
extras = json.loads(sys.argv[3])
clis |= {m for m, dep in extras.items() if importlib.util.find_spec(dep) is None}
names = []
for pkg in (muse_jax, benchmarks, configs):
  names.append(pkg.__name__)
  for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    if m.name != peers and not m.name.startswith(peers + "."):
      names.append(m.name)
for name in sorted(set(names) - clis):
  importlib.import_module(name)
# Only flags our own modules define count (absl.app and tfds add their own).
ours = tuple(p + "." for p in ("muse_jax", "benchmarks", "configs"))
defined = {m: sorted(f.name for f in fl)
           for m, fl in flags.FLAGS.flags_by_module_dict().items()
           if m.startswith(ours)}
print(json.dumps(dict(modules=len(names), defined=defined)))
"""


def test_library_modules_import_together_and_define_no_flags():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
      [sys.executable, "-c", _PROBE, json.dumps(CLIS), PEERS,
       json.dumps(EXTRAS)], cwd=root,
      capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["modules"] > 30
  assert result["defined"] == {}, (
      f"library modules define absl flags (move them under the CLI's "
      f"__main__ or into a CLI module listed in CLIS): {result['defined']}")
