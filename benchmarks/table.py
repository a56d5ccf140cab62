"""Turns benchmark JSON lines into the README's markdown results table.

  python -m benchmarks.table benchmarks/results/cpu.jsonl [--readme=benchmarks/README.md]

With --readme, the text between `<!-- bench:begin -->` and
`<!-- bench:end -->` in that file is replaced by the table. Pure Python.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
OURS = "muse_jax"
# Issue 3's targets at config S (checked at each precision of S).
TARGET_CONFIGS = ("S", "S-bf16")
SAMPLE_VS_AMUSED, TRAIN_VS_PEERS = 1.5, 1.3
MIN_UTILISATION, MAX_OUTSIDE = 0.70, 0.05
MAX_BENCH_S = 30 * 60


def load(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _fmt(x: float | None, digits: int = 3) -> str:
  if x is None:
    return "–"
  return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
  return "–" if x is None else f"{100 * x:.0f}%"


def _header(records: list[dict[str, Any]]) -> list[str]:
  meta = next((r for r in records if r.get("what") == "meta"), {})
  done = next((r for r in records if r.get("what") == "done"), {})
  peaks = {(r["impl"], r.get("dtype", "float32")):
           (r["peak_flops_per_s"], r.get("n")) for r in records
           if r.get("what") == "peak"}
  torch_version = next((r["torch_version"] for r in records
                        if "torch_version" in r), None)
  lines = [f"Machine: {meta.get('device', '?')}. Measured peak "
           "matmul (n³, median): " + ", ".join(
               f"{impl} {dtype} {v / 1e9:.0f} GFLOP/s (n={n})"
               for (impl, dtype), (v, n) in peaks.items()) + "."]
  parts = [f"{meta.get('date', '?')}", f"commit {meta.get('git_commit')}",
           f"jax {meta.get('jax_version')}"]
  if torch_version:
    parts.append(f"torch {torch_version}")
  if done.get("wall_s"):
    parts.append(f"whole run {done['wall_s'] / 60:.1f} min")
  if "loadavg_1m" in meta:
    parts.append(f"load average {meta['loadavg_1m']:.2f} at the start, "
                 f"{done.get('loadavg_1m', float('nan')):.2f} at the end")
  lines.append("Run: " + ", ".join(parts) + ".")
  return lines


def _rows(records: list[dict[str, Any]]) -> list[str]:
  ratios = {(r["config"], r["what"], r["peer"]): r["ratio"]
            for r in records if r.get("kind") == "ratio"}
  bench = [r for r in records if r.get("what") in ("sample", "train")
           and "ratio" not in r]
  order = {OURS: 0}
  bench.sort(key=lambda r: (r["config"] not in TARGET_CONFIGS, r["config"],
                            r["what"] != "sample",
                            order.get(r["impl"], 1), r["impl"]))
  rows = ["| Config | What | Batch | Impl | Median s | Throughput | "
          "Matmul GFLOP/s | % of peak | Outside forwards | Compile / first "
          "call s | Ours ÷ this |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in bench:
    what = r["what"]
    if what == "sample":
      what = f"sample ({r.get('steps')} steps, CFG)"
    if "error" in r:
      rows.append(f"| {r['config']} | {what} | {r.get('batch')} | "
                  f"{r['impl']} | error: {r['error'][:80]} | | | | | | |")
      continue
    thr = (f"{_fmt(r['images_per_s'])} images/s" if r["what"] == "sample"
           else f"{r['tokens_per_s']:.0f} tokens/s")
    ratio = ratios.get((r["config"], r["what"], r["impl"]))
    first = f"{_fmt(r.get('compile_s'))} / {_fmt(r.get('first_call_s'))}"
    rows.append(
        f"| {r['config']} | {what} | {r['batch']} | {r['impl']} | "
        f"{_fmt(r['median_s'])} | {thr} | "
        f"{r['matmul_flops_per_s'] / 1e9:.1f} | "
        f"{_pct(r.get('matmul_utilisation'))} | "
        f"{_pct(r.get('non_transformer_fraction'))} | {first} | "
        f"{'–' if ratio is None else f'{ratio:.2f}×'} |")
  return rows


def _targets(records: list[dict[str, Any]], config: str = "S") -> list[str]:
  """Issue 3's must-show lines at `config`, where the records have them."""
  def find(impl, what):
    return next((r for r in records if r.get("impl") == impl
                 and r.get("what") == what and r.get("config") == config
                 and "error" not in r and "ratio" not in r), None)

  def ratio(what, peer):
    return next((r["ratio"] for r in records if r.get("kind") == "ratio"
                 and r["what"] == what and r["config"] == config
                 and r["peer"] == peer), None)

  def mark(ok):
    return "–" if ok is None else ("yes" if ok else "**no**")

  def at_least(x, bound):
    return None if x is None else x >= bound

  out = [f"| Target (config {config}) | Measured | Met |", "|---|---|---|"]
  s = find(OURS, "sample")
  amused = ratio("sample", "diffusers-amused")
  met = at_least(amused, SAMPLE_VS_AMUSED)
  out.append(f"| sampling ≥ {SAMPLE_VS_AMUSED}× aMUSEd images/s | "
             f"{_fmt(amused)}× | {mark(met)} |")
  if s:
    u, um = s.get("utilisation"), s.get("matmul_utilisation")
    out.append(f"| sampling FLOP/s ≥ {MIN_UTILISATION:.0%} of peak | "
               f"{_pct(u)} (XLA count), {_pct(um)} (matmul count) | "
               f"{mark(at_least(um, MIN_UTILISATION))} |")
    nt = s.get("non_transformer_fraction")
    out.append(f"| outside the transformer forwards ≤ {MAX_OUTSIDE:.0%} of "
               f"sampling | {_pct(nt)} | "
               f"{mark(None if nt is None else nt <= MAX_OUTSIDE)} |")
  for peer in ("diffusers-amused", "lucidrains-muse-maskgit"):
    r = ratio("train", peer)
    out.append(f"| training ≥ {TRAIN_VS_PEERS}× {peer} tokens/s | "
               f"{_fmt(r)}× | "
               f"{mark(at_least(r, TRAIN_VS_PEERS))} |")
  done = next((r for r in records if r.get("what") == "done"), None)
  if done:
    out.append(f"| `make bench` < 30 min | {done['wall_s'] / 60:.1f} min "
               f"(bench.py) | {mark(done['wall_s'] < MAX_BENCH_S)} |")
  return out


def render(records: list[dict[str, Any]]) -> str:
  lines = _header(records) + [""] + _rows(records)
  for r in records:
    if r.get("what") == "skip":
      lines += ["", f"Skipped config {r['config']}: {r['reason']}."]
  for config in TARGET_CONFIGS:
    if any(r.get("config") == config and r.get("what") != "skip"
           for r in records):
      lines += [""] + _targets(records, config)
  return "\n".join(lines) + "\n"


def replace_in(path: str, text: str) -> None:
  with open(path) as f:
    doc = f.read()
  if BEGIN not in doc or END not in doc:
    raise ValueError(f"{path} has no {BEGIN} ... {END} block")
  head, rest = doc.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(path, "w") as f:
    f.write(head + BEGIN + "\n" + text + END + tail)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("jsonl")
  p.add_argument("--readme", default="")
  args = p.parse_args()
  text = render(load(args.jsonl))
  if args.readme:
    replace_in(args.readme, text)
  print(text, end="")


if __name__ == "__main__":
  main()
