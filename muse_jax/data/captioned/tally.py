"""Counts of what a reader produced and skipped, by reason.

Nothing is dropped silently: every record a reader cannot use lands here
under its `decode.REASONS` reason, the first few of each with their key
and detail (to find them again), and `summary()` is what the data stages
write next to their output, so `ok + sum(skipped) == records seen`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import json
from typing import Any, TypeVar

from absl import logging
from etils import epath

from muse_jax.data.captioned import decode

EXAMPLES_PER_REASON = 5
T = TypeVar("T")


class Tally:
  """Usable records and skips by reason (and a few examples of each)."""

  def __init__(self):
    self.ok = 0
    self.skipped: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[dict[str, str]]] = collections.defaultdict(
        list)

  def good(self) -> None:
    self.ok += 1

  def skip(self, error: decode.Skip, *, where: str, count: int = 1) -> None:
    """Counts `count` records lost to `error` at `where` (a shard and key)."""
    self.skipped[error.reason] += count
    seen = self.examples[error.reason]
    if len(seen) < EXAMPLES_PER_REASON:
      seen.append({"where": where, "detail": error.detail})
      logging.warning("skipped %s (%s): %s", where, error.reason,
                      error.detail or "-")

  def attempt(self, make: Callable[[], T], *, where: str) -> T | None:
    """`make()` counted as good, or None with its `decode.Skip` counted."""
    try:
      out = make()
    except decode.Skip as e:
      self.skip(e, where=where)
      return None
    self.good()
    return out

  def merge(self, other: "Tally") -> None:
    self.ok += other.ok
    self.skipped.update(other.skipped)
    for reason, seen in other.examples.items():
      room = EXAMPLES_PER_REASON - len(self.examples[reason])
      self.examples[reason].extend(seen[:max(0, room)])

  @property
  def total(self) -> int:
    return self.ok + sum(self.skipped.values())

  def summary(self) -> dict[str, Any]:
    return {"ok": self.ok, "skipped": dict(sorted(self.skipped.items())),
            "total": self.total,
            "examples": {k: v for k, v in sorted(self.examples.items())}}

  def write(self, path: epath.PathLike) -> None:
    epath.Path(path).write_text(json.dumps(self.summary(), indent=1))
