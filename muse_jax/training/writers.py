"""Metric writers: TensorBoard event files and JSON lines, process 0 only.

The interface is clu's `MetricWriter` (`write_scalars`, `write_images`,
`write_hparams`, `flush`, `close`); the TensorBoard backend is tensorboardX,
so no TensorFlow is imported. `create_default_writer(logdir)` gives a
writer of both kinds for process 0 and a no-op writer elsewhere, as
`clu.metric_writers.create_default_writer(just_logging=...)` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
from typing import Any

from etils import epath
import jax
import numpy as np


class MetricWriter:
  """Writes nothing (other processes, or where no output is wanted)."""

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    del step, scalars

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    del step, images

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    self.flush()


class JsonlWriter(MetricWriter):
  """Appends one JSON object per `write_scalars` call to a file.

  Every record is flushed at once, so a run that is killed outright
  (SIGKILL, a lost host) keeps every step it logged.
  """

  def __init__(self, path: epath.PathLike):
    self.path = epath.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = self.path.open("a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {k: float(v) for k, v in scalars.items()}
    record["step"] = int(step)
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._file.write(json.dumps({"hparams": dict(hparams)}, sort_keys=True,
                                default=str) + "\n")
    self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class TensorBoardWriter(MetricWriter):
  """TensorBoard event files (scalars and image grids) via tensorboardX."""

  def __init__(self, logdir: epath.PathLike):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    self._writer = tensorboardX.SummaryWriter(logdir=str(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    for k, v in scalars.items():
      self._writer.add_scalar(k, float(v), global_step=int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    for k, v in images.items():
      v = np.asarray(v)
      if v.ndim == 4:
        self._writer.add_images(k, v, global_step=int(step),
                                dataformats="NHWC")
      else:
        self._writer.add_image(k, v, global_step=int(step),
                               dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    self._writer.add_text("hparams", json.dumps(dict(hparams), indent=1,
                                                default=str))

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MultiWriter(MetricWriter):
  """Forwards every call to each of `writers`."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self._writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def create_default_writer(logdir: epath.PathLike) -> MetricWriter:
  """`<logdir>/metrics.jsonl` + TensorBoard events in `<logdir>/tb`, on
  process 0; a no-op writer on the other processes."""
  if jax.process_index() != 0:
    return MetricWriter()
  logdir = epath.Path(logdir)
  return MultiWriter([JsonlWriter(logdir / "metrics.jsonl"),
                      TensorBoardWriter(logdir / "tb")])
