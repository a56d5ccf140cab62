"""Counts of what a reader produced and skipped, by reason.

Nothing is dropped silently: every record a reader cannot use lands here
under its `decode.REASONS` reason, the first few of each with their key
and detail (to find them again), and `summary()` is what the data stages
write next to their output, so `ok + sum(skipped) == records seen`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
import json
from typing import Any, BinaryIO, Protocol, TypeVar

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

  @classmethod
  def from_summary(cls, summary: dict[str, Any]) -> "Tally":
    """The tally a `summary()` was made from."""
    out = cls()
    out.ok = int(summary["ok"])
    out.skipped.update(summary["skipped"])
    for reason, seen in summary["examples"].items():
      out.examples[reason] = list(seen)
    return out

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

  def open_shard(self, path: epath.Path) -> BinaryIO | None:
    """`path` opened for reading, or None with the shard counted as
    "empty_shard" (zero bytes) or "unreadable_shard" (cannot open)."""
    try:
      if path.stat().length == 0:
        self.skip(decode.Skip("empty_shard"), where=str(path))
        return None
      return path.open("rb")
    except OSError as e:
      self.skip(decode.Skip("unreadable_shard", repr(e)), where=str(path))
      return None

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


class Indexed(Protocol):
  """A random-access reader: `example(i)` or `decode.Skip`; `where(i)`
  names record i in logs."""

  def __len__(self) -> int: ...
  def example(self, index: int) -> dict[str, Any]: ...
  def where(self, index: int) -> str: ...


def read_indexed(source: Indexed, tally: Tally,
                 indices: Iterable[int] | None = None
                 ) -> Iterator[dict[str, Any]]:
  """The usable examples of `source` among `indices` (default all), in
  order; the others counted in `tally`."""
  for i in range(len(source)) if indices is None else indices:
    example = tally.attempt(lambda i=i: source.example(i),
                            where=source.where(i))
    if example is not None:
      yield example
