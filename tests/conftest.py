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
