"""Test setup: eight fake CPU devices, so sharding code runs on a real mesh.

One persistent XLA compilation cache serves the whole session, subprocesses
included (they inherit the environment): the suite runs the tiny pipeline
many times (stage graph, cascade, embedding cache, multi-process, CLIs),
and identical programs then compile once. The cache is a fresh temporary
directory per session, so no run reads another's programs.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="muse_jax_test_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"

# Files whose module fixtures run whole pipelines (minutes each), slowest
# first. `make test` hands whole files to two pytest-xdist workers in
# collection order; starting these first keeps one worker from drawing two
# of them at the end (longest-first scheduling).
SLOW_FILES = ("test_multiprocess.py", "test_tokenizer_pipeline.py",
              "test_superres.py", "test_captioned_pipeline.py",
              "test_stages.py", "test_embedding_cache.py",
              "test_vq_task.py", "test_trainer.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(item.path.name, len(rank)),
                               order[id(item)]))
