"""Sampler settings swept over one trained model, and the trade-off plot.

Muse's Figure 8 traces FID against CLIP score as the guidance scale grows,
with and without its linear guidance ramp. `run_settings` samples one
prompt set under each `Setting` (guidance scale, schedule, temperature)
with the same seed, scores each with the caller's metrics and reports
progress with an ETA; `plot` draws one metric against another (or against
the guidance scale) with one line per schedule and temperature, the
setting a recipe uses ringed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import itertools
import time
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Setting:
  guidance_scale: float
  guidance_schedule: str
  temperature: float

  def label(self) -> str:
    return (f"guidance {self.guidance_scale:g} ({self.guidance_schedule}), "
            f"temperature {self.temperature:g}")


def grid(scales: Sequence[float], schedules: Sequence[str],
         temperatures: Sequence[float]) -> list[Setting]:
  """Every combination, schedule-major (one plotted line per schedule)."""
  return [Setting(float(g), str(s), float(t)) for s, t, g in
          itertools.product(schedules, temperatures, scales)]


def run_settings(settings: Sequence[Setting], *, num_prompts: int,
                 sample: Callable[[Setting, int, int], np.ndarray],
                 score: Callable[[np.ndarray], dict[str, Any]],
                 chunk: int, say: Callable[[str], None] = print
                 ) -> list[dict[str, Any]]:
  """For each setting: `sample(setting, lo, hi)` -> uint8 images of prompts
  [lo, hi) in chunks of `chunk`, then `score(all images)`; one result dict
  per setting (the setting's fields, the scores, `images_per_s`)."""
  results = []
  total = len(settings) * num_prompts
  done, t_start = 0, time.perf_counter()
  for i, setting in enumerate(settings):
    images, t0 = [], time.perf_counter()
    for lo in range(0, num_prompts, chunk):
      hi = min(num_prompts, lo + chunk)
      images.append(sample(setting, lo, hi))
      done += hi - lo
      rate = done / max(time.perf_counter() - t_start, 1e-9)
      eta = (total - done) / max(rate, 1e-9)
      say(f"[eval] setting {i + 1}/{len(settings)} ({setting.label()}): "
          f"{hi}/{num_prompts} images, {rate:.1f} images/s, ETA "
          f"{int(eta // 60)}m{int(eta % 60):02d}s")
    sample_s = time.perf_counter() - t0
    out = np.concatenate(images)
    result = dict(dataclasses.asdict(setting), num_prompts=num_prompts,
                  images_per_s=num_prompts / max(sample_s, 1e-9))
    result.update(score(out))
    results.append(result)
  return results


def plot(results: Sequence[dict[str, Any]], path: str, *, x: str, y: str,
         mark: Setting | None = None, title: str = "") -> None:
  """A PNG of `y` against `x` (result keys), one line per (schedule,
  temperature), the `mark`ed setting ringed."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.2), dpi=120)
  lines: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for r in results:
    lines.setdefault((r["guidance_schedule"], r["temperature"]), []).append(r)
  for (schedule, temperature), rows in sorted(lines.items()):
    rows = sorted(rows, key=lambda r: r["guidance_scale"])
    label = schedule + (f", T={temperature:g}" if len(
        {t for _, t in lines}) > 1 else "")
    ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", label=label)
    if x != "guidance_scale":
      for r in rows:
        ax.annotate(f"{r['guidance_scale']:g}", (r[x], r[y]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
  if mark is not None:
    hits = [r for r in results
            if (r["guidance_scale"], r["guidance_schedule"],
                r["temperature"]) == (mark.guidance_scale,
                                      mark.guidance_schedule,
                                      mark.temperature)]
    for r in hits:
      ax.plot([r[x]], [r[y]], "o", ms=14, mfc="none", mec="black",
              label=f"recipe: {mark.label()}")
  ax.set_xlabel(x.replace("_", " "))
  ax.set_ylabel(y.replace("_", " "))
  if title:
    ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
