"""Multi-host detection and initialisation (muse_jax.distributed)."""

from __future__ import annotations

import pytest

from muse_jax import distributed

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]",
         "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_no_cluster_on_a_plain_machine(monkeypatch):
  for k in SLURM:
    monkeypatch.delenv(k, raising=False)
  assert distributed.detected_cluster() is None
  assert distributed.initialize() is None  # Nothing to initialise.


def test_slurm_is_detected(monkeypatch):
  for k, v in SLURM.items():
    monkeypatch.setenv(k, v)
  assert distributed.detected_cluster() == "SlurmCluster"


def test_detected_cluster_initialises_jax_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda *a, **k: calls.append((a, k)))
  for k, v in SLURM.items():
    monkeypatch.setenv(k, v)
  assert distributed.initialize() == "SlurmCluster"
  assert calls == [((), {})]  # JAX reads SLURM's variables itself.
  monkeypatch.setenv("MUSE_NO_DISTRIBUTED", "1")
  assert distributed.initialize() is None


def test_explicit_flags(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda *a, **k: calls.append(a))
  assert distributed.initialize("127.0.0.1:1234", 2, 1) == "flags"
  assert calls == [("127.0.0.1:1234", 2, 1)]
  with pytest.raises(ValueError, match="--num_processes"):
    distributed.initialize("127.0.0.1:1234")


def test_single_process_helpers():
  assert distributed.is_leader()
  distributed.barrier("nothing-to-wait-for")
  assert distributed.broadcast_from_leader(5) == 5
