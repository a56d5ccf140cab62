"""The stage graph: which stages run, where their outputs live, when to redo.

A stage is a small unit (`Stage`) that declares its `name`, the stages it
`reads` and the config sections it depends on (`config_keys`). Its
*fingerprint* hashes those sections' values, its `version` and the
fingerprints of the stages it reads, so it changes exactly when something
the stage's output depends on changes (keys that only say where a cached
input comes from are left out: `Stage.fingerprint_ignores`).

Outputs are stored by fingerprint: stage `s` writes into
`<store>/<s>-<fingerprint>/` and marks it finished with a `done.json`
holding the fingerprint and the stage's summary. A re-run skips every stage
whose directory is finished; changing a config key re-runs the stages that
depend on it and everything downstream of them, and nothing else (the
others' fingerprints, hence directories, are unchanged). An interrupted
stage re-runs in its own directory and resumes from its checkpoints. The
store defaults to `<workdir>/stages`; runs given the same store (the points
of a sweep: `launch/sweep.py`) share every stage they have in common, so a
sweep over sampling settings trains once per distinct training config.

The workdir itself holds `config.json` (the whole config), `stages.json`
(each stage's directory and fingerprint: how the sample CLI finds the
trained models) and whatever the final stage publishes there.

Every process runs every stage; only the leader writes markers and
manifests, and processes meet at barriers before and after each stage.
Paths are `etils.epath` paths, so a `gs://` workdir is a bucket path.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, ClassVar

from etils import epath
import ml_collections

from muse_jax import distributed

DONE = "done.json"
MANIFEST = "stages.json"


class StageError(RuntimeError):
  """A stage cannot run: unknown, or an input stage is not finished."""


@dataclasses.dataclass
class StageRun:
  """What a stage sees while it runs.

  Attributes:
    config: the whole experiment config.
    dir: this stage's own output directory.
    inputs: the output directories of the stages it reads, by name.
    workdir: the experiment's workdir (where final results are published).
    env: shared per-run resources (mesh, rules, text encoder).
    infos: the summaries of every finished stage (those it reads among
      them).
  """

  config: ml_collections.ConfigDict
  dir: epath.Path
  inputs: dict[str, epath.Path]
  workdir: epath.Path
  env: Any
  infos: dict[str, dict[str, Any]]


class Stage(abc.ABC):
  """One step of the pipeline; subclasses set the class attributes."""

  name: ClassVar[str]
  reads: ClassVar[tuple[str, ...]] = ()
  config_keys: ClassVar[tuple[str, ...]] = ()
  # Bump when the stage's code changes what it writes: old outputs are then
  # not reused.
  version: ClassVar[int] = 1
  # Dotted keys inside `config_keys` that say where an input is read from,
  # not what it is (a cache of values the stage could compute itself): left
  # out of the fingerprint, so setting them reuses finished outputs.
  fingerprint_ignores: ClassVar[tuple[str, ...]] = ()

  @abc.abstractmethod
  def run(self, run: StageRun) -> dict[str, Any]:
    """Does the work; returns a JSON summary recorded in the done marker."""

  def check(self, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the key if the stage's config is invalid.

    The graph checks every stage before running any, so a typo in the last
    stage's section fails in seconds, not after training.
    """
    del config


def config_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The JSON value of a dotted config key ("transformer.model.width")."""
  node: Any = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError) as e:
      raise StageError(f"config has no key {key!r}") from e
  if isinstance(node, ml_collections.ConfigDict):
    node = node.to_dict()
  return json.loads(json.dumps(node, sort_keys=True, default=str))


def write_json(path: epath.Path, obj: Any) -> None:
  """Writes JSON atomically where the filesystem allows (local: rename)."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
  tmp.replace(path)


def check_writable(directory: epath.Path) -> None:
  """Fails early, naming the directory, if it cannot be written."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / ".write_probe"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PermissionError(
        f"directory {directory} is not writable: {e.strerror or e}") from e


def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


class Graph:
  """Stages in dependency order over one config, workdir and store."""

  def __init__(self, stages: Sequence[Stage],
               config: ml_collections.ConfigDict, workdir: epath.PathLike,
               *, store: epath.PathLike | None = None, env: Any = None):
    self.stages = {s.name: s for s in stages}
    if len(self.stages) != len(stages):
      raise StageError(f"duplicate stage names in {[s.name for s in stages]}")
    for s in stages:
      unknown = [r for r in s.reads if r not in self.stages]
      if unknown:
        raise StageError(f"stage {s.name!r} reads unknown stages {unknown}")
    self.order = self._topological()
    self.config = config
    self.workdir = _absolute(workdir)
    self.store = _absolute(store) if store else self.workdir / "stages"
    self.env = env
    self._fingerprints: dict[str, str] = {}
    for name in self.order:
      for key in self.stages[name].config_keys:
        config_value(config, key)  # Fails early, naming a missing key.
      self.stages[name].check(config)

  def _topological(self) -> list[str]:
    order, seen, active = [], set(), set()

    def visit(name):
      if name in seen:
        return
      if name in active:
        raise StageError(f"stage graph has a cycle through {name!r}")
      active.add(name)
      for r in self.stages[name].reads:
        visit(r)
      active.discard(name)
      seen.add(name)
      order.append(name)

    for name in self.stages:
      visit(name)
    return order

  def fingerprint(self, name: str) -> str:
    """12 hex digits of what stage `name`'s output depends on."""
    if name not in self._fingerprints:
      stage = self.stages[name]
      config = {k: config_value(self.config, k) for k in stage.config_keys}
      for key in stage.fingerprint_ignores:
        _drop(config, key)
      spec = {
          "stage": name, "version": stage.version, "config": config,
          "reads": {r: self.fingerprint(r) for r in stage.reads},
      }
      digest = hashlib.sha256(
          json.dumps(spec, sort_keys=True).encode()).hexdigest()
      self._fingerprints[name] = digest[:12]
    return self._fingerprints[name]

  def stage_dir(self, name: str) -> epath.Path:
    return self.store / f"{name}-{self.fingerprint(name)}"

  def is_done(self, name: str) -> bool:
    marker = self.stage_dir(name) / DONE
    if not marker.exists():
      return False
    return read_json(marker).get("fingerprint") == self.fingerprint(name)

  def info(self, name: str) -> dict[str, Any]:
    """The summary a finished stage recorded."""
    marker = self.stage_dir(name) / DONE
    if not marker.exists():
      raise StageError(
          f"stage {name!r} has not finished for this config (no {marker})")
    return read_json(marker)["info"]

  def manifest(self) -> dict[str, Any]:
    return {name: {"dir": str(self.stage_dir(name)),
                   "fingerprint": self.fingerprint(name),
                   "reads": list(self.stages[name].reads)}
            for name in self.order}

  def run(self, selected: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the selected stages (default: all) in order; returns summaries.

    A selected stage whose inputs are not finished is an error naming them.
    """
    selected = list(self.order if selected is None else selected)
    unknown = [s for s in selected if s not in self.stages]
    if unknown:
      raise StageError(f"unknown stages {unknown}; known: {self.order}")
    todo = [s for s in self.order if s in selected]
    if distributed.is_leader():
      check_writable(self.workdir)
      check_writable(self.store)
      write_json(self.workdir / "config.json",
                 json.loads(self.config.to_json()))
      write_json(self.workdir / MANIFEST, self.manifest())
    distributed.barrier("graph-start")
    infos = {}
    for i, name in enumerate(todo):
      head = f"== stage {i + 1}/{len(todo)} {name}"
      distributed.barrier(f"before-{name}")
      if self.is_done(name):
        _say(f"{head}: already done ({self.stage_dir(name).name}), skipping")
        infos[name] = self.info(name)
        continue
      stage = self.stages[name]
      missing = [r for r in stage.reads if not self.is_done(r)]
      if missing:
        raise StageError(
            f"stage {name!r} reads {missing}, not finished for this config; "
            f"run them first (--stages={','.join(missing + [name])})")
      out = self.stage_dir(name)
      if distributed.is_leader():
        out.mkdir(parents=True, exist_ok=True)
      distributed.barrier(f"mkdir-{name}")
      _say(f"{head} -> {out}")
      t0 = time.perf_counter()
      info = stage.run(StageRun(
          config=self.config, dir=out,
          inputs={r: self.stage_dir(r) for r in stage.reads},
          workdir=self.workdir, env=self.env,
          infos={s: self.info(s) for s in self.order
                 if s != name and self.is_done(s)}))
      info = dict(info, wall_s=time.perf_counter() - t0)
      distributed.barrier(f"after-{name}")
      if distributed.is_leader():
        write_json(out / DONE, {"stage": name,
                                "fingerprint": self.fingerprint(name),
                                "info": info})
      distributed.barrier(f"done-{name}")
      infos[name] = info
      _say(f"== stage {name} done in {info['wall_s']:.1f}s")
    return infos


def _drop(config: dict[str, Any], key: str) -> None:
  """Removes dotted `key` from a nested dict of config values, if there."""
  *parents, leaf = key.split(".")
  node: Any = config
  for part in parents:
    node = node.get(part) if isinstance(node, dict) else None
  if isinstance(node, dict):
    node.pop(leaf, None)


def _absolute(path: epath.PathLike) -> epath.Path:
  """Local paths made absolute (stages.json is read from anywhere)."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def _say(message: str) -> None:
  if distributed.is_leader():
    print(message, flush=True)
