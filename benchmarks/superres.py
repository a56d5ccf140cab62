r"""Super-res sampling, ours vs lucidrains' super-res MaskGit, in one run;
and multi-axis vs full self-attention at 64x64 tokens.

  python -m benchmarks.superres --peers_python=.venv-peers/bin/python \
      --out=benchmarks/results/superres_cpu.jsonl

(`make bench-superres` runs this.) Issue 15's speed line:

- Super-res sampling at config SR: 16x16 low-res tokens -> 32x32 high-res
  tokens, width 512, 8 layers, 8 heads, MLP 2048, codebook 8192 (both
  grids), 32 random text embeddings of width 384, batch 8, 8 steps with
  classifier-free guidance (scale 3). Ours: `SuperResTransformer` (random
  weights, the XLA:CPU path the other CPU benchmarks use) driven by the
  library's jitted `sampling.sample` with a `conditioning.LowRes`
  condition (random low-res ids): the low-res encoder and the context
  keys/values once per request, then one [cond; uncond] forward per step.
  lucidrains: `MaskGit(cond_vae=..., cond_image_size=...)`.generate
  (benchmarks/peers/superres_lucidrains.py, in the peers' venv), which
  embeds the low-res ids with its token embedding and appends them to the
  text context: it has no low-res encoder. Ours needs at least one encoder
  layer, so the matched comparison times ours with `--lowres_depths=1`
  (the smallest ours allows: slightly more work than the peer). The
  encoder runs once per request, so for the paper's 16 layers the
  once-per-request context program is timed at `--context_depths` (1 and
  16) and the 16-layer sampler's time is estimated as the measured one
  plus the difference (a `ratio` line with `estimated: true`).
  Both sides: one excluded warm-up request of `--warmup_steps` (1) steps at
  the same shapes (ours: the sampler compiled for 1 step; the timed
  program's compilation is `compile_s`), then `--repeats` /
  `--peer_repeats` timed requests (median; 1 by default to stay near ten
  minutes on the 2-core machine, where one request of ours takes ~2.3
  minutes and one of lucidrains' ~4).
- Multi-axis vs full attention at 64x64 high-res tokens (16x16 low-res):
  one decoding step's transformer work (features of the guidance pair,
  2 x --attn_batch rows, guided and projected onto the codebook once, as
  the sampler runs it) with `self_attention="multi_axis"`
  (`attention_window=8`) and `"full"`: median time, the peak resident
  memory the step adds (VmHWM), the analytic size of one layer's scores,
  and XLA's compiled memory (`memory_analysis()`: on XLA:CPU it leaves out
  the runtime's temporaries, so there it is no measure of what a step
  needs; `--attn_sample_memory` adds the whole sampler's, compiled only).

Prints JSON lines (and writes them to --out): `what: meta`, each record
(`impl`, `what`, `config`, `batch`, `median_s`, `images_per_s`, ...,
`device`), `kind: ratio` lines (ours / peer images/s; full / multi-axis
time and memory) and `what: done`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs
from benchmarks import ours
from benchmarks import peak as peak_lib
from benchmarks import timing
from muse_jax import sampling
from muse_jax.models import conditioning
from muse_jax.models import superres as superres_lib

IMPL = "muse_jax"
WHAT = "sample_superres"
WHAT_ATTENTION = "attention_step"
PEER_MODULE = "benchmarks.peers.superres_lucidrains"
TARGET_RATIO = 1.5

# The super-res size: the high-res grid is the config's grid.
SR = configs.BenchConfig(
    name="SR", width=512, depth=8, num_heads=8, mlp_dim=2048, grid_size=32,
    text_len=32, text_dim=384, codebook_size=8192, batch=8, sample_steps=8)
LOWRES_GRID = 16


def model_configs(cfg: configs.BenchConfig, lowres_grid: int,
                  lowres_depth: int, *, self_attention: str = "full",
                  window: int = 8
                  ) -> tuple[Any, superres_lib.LowResConfig]:
  """(TransformerConfig of the high-res model, LowResConfig)."""
  tcfg = dataclasses.replace(ours.transformer_config(cfg),
                             self_attention=self_attention,
                             attention_window=window)
  # lucidrains' MaskGit shares one codebook between both grids; so do we.
  lcfg = superres_lib.LowResConfig(codebook_size=cfg.codebook_size,
                                   grid_size=lowres_grid, depth=lowres_depth)
  return tcfg, lcfg


def make_model(tcfg, lcfg, seed: int = 0):
  """Random weights on the one CPU device (no mesh: nothing to shard)."""
  with nnx.use_eager_sharding(False):
    return superres_lib.SuperResTransformer(tcfg, lcfg, rngs=nnx.Rngs(seed))


def condition(cfg: configs.BenchConfig, lowres_grid: int, batch: int,
              seed: int = 0) -> conditioning.LowRes:
  """Random text embeddings (all tokens valid) and random low-res ids."""
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((batch, cfg.text_len, cfg.text_dim), np.float32)
  low = rng.integers(0, cfg.codebook_size, (batch, lowres_grid**2),
                     dtype=np.int32)
  text = conditioning.Text(jnp.asarray(emb),
                           jnp.ones((batch, cfg.text_len), bool))
  return conditioning.LowRes(text, jnp.asarray(low))


def _params(model) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(
      nnx.state(model, nnx.Param))))


def _memory(compiled, prefix: str = "xla_") -> dict[str, Any]:
  out: dict[str, Any] = {}
  try:
    mem = compiled.memory_analysis()
    for name in ("temp", "argument", "output", "alias",
                 "generated_code"):
      value = getattr(mem, f"{name}_size_in_bytes", None)
      if value is not None:
        out[f"{prefix}{name}_bytes"] = int(value)
  except Exception:  # pylint: disable=broad-except
    pass  # Not every backend implements memory_analysis.
  return out


def _proc_status_bytes(key: str) -> int | None:
  """A `/proc/self/status` memory line (VmRSS, VmHWM) in bytes (Linux)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets this process's peak resident size (VmHWM) to its current one."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def matmul_flops(cfg: configs.BenchConfig, lowres_grid: int,
                 lowres_depth: int, guided: bool = True) -> float:
  """Analytic matmul FLOPs of our super-res sampler (2 per multiply-add).

  Once per request: the low-res encoder over B x n tokens (self-attention
  q,k,v,out 8d^2, scores and values 4nd, MLP 4dm per token and layer), the
  text projection, the context keys/values of every layer for the rows
  that attend (2B with guidance: the unconditional half keeps the low-res
  part). Per step: the forward at 2B with cross-attention to S = n + L
  context tokens for every row, the codebook projection at B.
  """
  b, d, m = cfg.batch, cfg.width, cfg.mlp_dim
  n, s = lowres_grid**2, lowres_grid**2 + cfg.text_len
  rows = 2 * b if guided else b
  encoder = b * n * lowres_depth * (8 * d * d + 4 * n * d + 4 * d * m)
  text = 2 * b * cfg.text_len * cfg.text_dim * d
  kv = cfg.depth * rows * s * 4 * d * d
  t = cfg.seq_len
  layer = 8 * d * d + 4 * t * d + 4 * d * m + 4 * d * d + 4 * s * d
  step = (cfg.depth * rows * t * layer + rows * t * 2 * d * d
          + b * t * 2 * d * cfg.codebook_size)
  return float(encoder + text + kv + cfg.sample_steps * step)


def _sampler(model, cond, scfg, rng):
  return sampling.sample.lower(model, rng, cond, cfg=scfg).compile()


def bench_sample(cfg: configs.BenchConfig, *, lowres_grid: int,
                 lowres_depth: int, device: str, repeats: int = 3,
                 forward_repeats: int = 2, warmup_steps: int = 1,
                 seed: int = 0) -> dict[str, Any]:
  """One record: our super-res sampler's images/s at `cfg`.

  The sampler is compiled ahead of time (`compile_s`); the excluded
  warm-up request (`first_call_s`) is the same model's sampler compiled
  for `warmup_steps` steps (the same program but for the loop's trip
  count; 0: the timed program itself), then `repeats` timed requests.
  """
  tcfg, lcfg = model_configs(cfg, lowres_grid, lowres_depth)
  model = make_model(tcfg, lcfg, seed)
  cond = condition(cfg, lowres_grid, cfg.batch, seed)
  scfg = sampling.SamplerConfig(num_steps=cfg.sample_steps,
                                guidance_scale=cfg.guidance_scale)
  rng = jax.random.key(seed)
  tag = f"[{IMPL}] {WHAT} {cfg.name} lowres_depth={lowres_depth}"
  timing.log(f"{tag}: compiling")
  t0 = time.perf_counter()
  compiled = _sampler(model, cond, scfg, rng)
  compile_s = time.perf_counter() - t0

  def request(program):
    out = jax.block_until_ready(program(model, rng, cond))
    assert out.shape == (cfg.batch, cfg.seq_len)
    return out

  warm_steps = warmup_steps or cfg.sample_steps
  warm = compiled
  if warm_steps != cfg.sample_steps:
    warm = _sampler(model, cond,
                    dataclasses.replace(scfg, num_steps=warm_steps), rng)
  timing.log(f"{tag}: {warm_steps}-step warm-up + {repeats} x "
             f"{cfg.sample_steps} steps")
  t0 = time.perf_counter()
  request(warm)
  first = time.perf_counter() - t0
  rest = timing.measure(lambda: request(compiled), repeats=repeats,
                        warmup=0)
  t = timing.Timing(first, rest.times_s)

  # The bare forwards of one step: features at 2B, head at B.
  guided = scfg.guided()
  b2 = 2 * cfg.batch if guided else cfg.batch
  kv_fn = jax.jit(lambda m, c: sampling.guidance_kv(m, scfg, c))
  kv = kv_fn(model, cond)
  tokens = jnp.full((b2, cfg.seq_len), tcfg.mask_token_id, jnp.int32)
  step = jax.jit(lambda m, x, kv: m.head_logits(
      m.features(x, kv)[:cfg.batch])).lower(model, tokens, kv).compile()
  timing.log(f"{tag}: bare forwards x {forward_repeats}")
  ft = timing.measure(lambda: jax.block_until_ready(step(model, tokens, kv)),
                      repeats=forward_repeats)
  flops = matmul_flops(cfg, lowres_grid, lowres_depth, guided)
  rec = dict(
      impl=IMPL, what=WHAT, config=cfg.name, batch=cfg.batch,
      steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
      grid_size=cfg.grid_size, lowres_grid=lowres_grid,
      lowres_depth=lowres_depth, context_len=cfg.text_len + lowres_grid**2,
      **t.fields(), warmup_steps=warm_steps,
      images_per_s=cfg.batch / t.median_s,
      tokens_per_s=cfg.batch * cfg.seq_len / t.median_s,
      compile_s=compile_s, flops_matmul=flops,
      flops_per_s=flops / t.median_s, forward_batch=b2,
      forward_median_s=ft.median_s,
      non_transformer_fraction=1.0 - cfg.sample_steps * ft.median_s
      / t.median_s,
      params=_params(model), model_impl=cfg.impl,
      **_memory(compiled), max_rss_bytes=timing.max_rss_bytes(),
      device=device, jax_version=jax.__version__,
      loadavg_1m=os.getloadavg()[0], config_detail=cfg.describe(),
      note="sampling.sample on a SuperResTransformer (random weights), "
           "random low-res ids and text embeddings, token ids only (no VQ "
           "decode); forward_median_s: features at 2B + head at B; "
           "flops_matmul analytic (benchmarks.superres.matmul_flops)")
  return rec


def bench_context(cfg: configs.BenchConfig, *, lowres_grid: int,
                  lowres_depth: int, device: str, repeats: int = 3,
                  seed: int = 0) -> dict[str, Any]:
  """One record: the once-per-request part of our super-res sampler (the
  low-res encoder, the text projection and every layer's context
  keys/values of the guidance pair), jitted, at `lowres_depth`."""
  tcfg, lcfg = model_configs(cfg, lowres_grid, lowres_depth)
  model = make_model(tcfg, lcfg, seed)
  cond = condition(cfg, lowres_grid, cfg.batch, seed)
  scfg = sampling.SamplerConfig(num_steps=cfg.sample_steps,
                                guidance_scale=cfg.guidance_scale)
  kv = jax.jit(lambda m, c: sampling.guidance_kv(m, scfg, c)).lower(
      model, cond).compile()
  timing.log(f"[{IMPL}] context {cfg.name} lowres_depth={lowres_depth}: "
             f"warm-up + {repeats}")
  t = timing.measure(lambda: jax.block_until_ready(kv(model, cond)),
                     repeats=repeats)
  return dict(impl=IMPL, what="context", config=cfg.name, batch=cfg.batch,
              lowres_grid=lowres_grid, lowres_depth=lowres_depth,
              **t.fields(), params=_params(model), device=device,
              note="guidance_kv: low-res encoder + text projection + every "
                   "layer's cross-attention keys/values of the 2B rows; "
                   "runs once per sampling request")


def bench_attention(cfg: configs.BenchConfig, *, lowres_grid: int,
                    self_attention: str, window: int, device: str,
                    repeats: int = 3, sample_memory: bool = True,
                    seed: int = 0) -> dict[str, Any]:
  """One record: one guided decoding step at `cfg` (batch = images): its
  time, the process's peak resident memory while it runs, and XLA's
  compiled memory; optionally the whole sampler's compiled memory.

  `step_peak_rss_increase_bytes` is the peak resident size during the
  step's calls (VmHWM, reset before them) minus the resident size before:
  what one step needs beyond the model and its context. XLA:CPU's
  `memory_analysis()` does not account the temporaries its runtime
  allocates (it reports temp 0 for a lone [16, 4096, 4096] softmax
  attention), so on the CPU the `*_xla_*` figures are not the memory a
  step needs; they are kept for backends where they are.
  """
  tcfg, lcfg = model_configs(cfg, lowres_grid, 1,
                             self_attention=self_attention, window=window)
  model = make_model(tcfg, lcfg, seed)
  cond = condition(cfg, lowres_grid, cfg.batch, seed)
  scfg = sampling.SamplerConfig(num_steps=cfg.sample_steps,
                                guidance_scale=cfg.guidance_scale)
  b2 = 2 * cfg.batch
  kv = jax.jit(lambda m, c: sampling.guidance_kv(m, scfg, c))(model, cond)
  tokens = jnp.full((b2, cfg.seq_len), tcfg.mask_token_id, jnp.int32)

  def step_fn(m, x, kv):
    cond_f, uncond_f = jnp.split(m.features(x, kv).astype(jnp.float32), 2)
    return m.head_logits((1.0 + scfg.guidance_scale) * cond_f
                         - scfg.guidance_scale * uncond_f)

  tag = f"[{IMPL}] {WHAT_ATTENTION} {cfg.name} {self_attention}"
  timing.log(f"{tag}: compiling")
  t0 = time.perf_counter()
  step = jax.jit(step_fn).lower(model, tokens, kv).compile()
  compile_s = time.perf_counter() - t0
  timing.log(f"{tag}: warm-up + {repeats} repeats")
  rss_before = _proc_status_bytes("VmRSS")
  reset = _reset_peak_rss()
  t = timing.measure(lambda: jax.block_until_ready(step(model, tokens, kv)),
                     repeats=repeats)
  peak = _proc_status_bytes("VmHWM") if reset else None
  heads, seq = cfg.num_heads, cfg.seq_len
  keys_per_query = window**2 if self_attention == "multi_axis" else seq
  rec = dict(
      impl=IMPL, what=WHAT_ATTENTION, config=cfg.name, batch=cfg.batch,
      forward_batch=b2, self_attention=self_attention,
      attention_window=window if self_attention == "multi_axis" else None,
      grid_size=cfg.grid_size, lowres_grid=lowres_grid,
      width=cfg.width, depth=cfg.depth, num_heads=heads,
      **t.fields(), compile_s=compile_s,
      step_rss_before_bytes=rss_before, step_peak_rss_bytes=peak,
      step_peak_rss_increase_bytes=(
          peak - rss_before if peak is not None and rss_before is not None
          else None),
      self_attention_keys_per_query=keys_per_query,
      score_bytes_per_layer=b2 * heads * seq * keys_per_query * 4,
      **_memory(step, "step_xla_"), params=_params(model),
      model_impl=cfg.impl, device=device, jax_version=jax.__version__,
      loadavg_1m=os.getloadavg()[0], config_detail=cfg.describe(),
      note="one guided decoding step: features of the guidance pair "
           "(2 x batch rows), guided, projected onto the codebook at batch "
           "rows; context keys/values precomputed; score_bytes_per_layer: "
           "float32 self-attention scores of one layer (analytic); "
           "step_peak_rss_increase_bytes: peak resident memory of the "
           "step's calls minus the resident memory before them; XLA:CPU's "
           "memory_analysis does not count its runtime's temporaries")
  if sample_memory:
    timing.log(f"{tag}: compiling the {cfg.sample_steps}-step sampler "
               "(memory only)")
    rng = jax.random.key(seed)
    t0 = time.perf_counter()
    compiled = sampling.sample.lower(model, rng, cond, cfg=scfg).compile()
    rec.update(_memory(compiled, "sample_xla_"),
               sample_steps=cfg.sample_steps,
               sample_compile_s=time.perf_counter() - t0)
  rec["max_rss_bytes"] = timing.max_rss_bytes()
  return rec


def ratio_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """ours / peer images/s per low-res depth; full / multi-axis time and
  memory."""
  out = []
  samples = [r for r in records if r.get("what") == WHAT
             and "images_per_s" in r]
  peer = next((r for r in samples if r["impl"] != IMPL), None)
  if peer is not None:
    for r in samples:
      if r["impl"] != IMPL:
        continue
      ratio = r["images_per_s"] / peer["images_per_s"]
      out.append(dict(kind="ratio", what=WHAT, config=r["config"],
                      ours=IMPL, peer=peer["impl"],
                      lowres_depth=r["lowres_depth"], ratio=ratio,
                      target=TARGET_RATIO, met=ratio >= TARGET_RATIO))
    # Depths whose whole sampler was not run: its time estimated as the
    # measured sampler's plus the difference of the once-per-request
    # context (the encoder runs once; every step is the same).
    ours_by_depth = {r["lowres_depth"]: r for r in samples
                     if r["impl"] == IMPL}
    ctx = {r["lowres_depth"]: r for r in records
           if r.get("what") == "context" and "median_s" in r}
    for depth, c in sorted(ctx.items()):
      base = next((ours_by_depth[d] for d in sorted(ours_by_depth)
                   if d in ctx), None)
      if depth in ours_by_depth or base is None:
        continue
      est = base["median_s"] + c["median_s"] - ctx[
          base["lowres_depth"]]["median_s"]
      ratio = base["batch"] / est / peer["images_per_s"]
      out.append(dict(kind="ratio", what=WHAT, config=base["config"],
                      ours=IMPL, peer=peer["impl"], lowres_depth=depth,
                      ratio=ratio, target=TARGET_RATIO,
                      met=ratio >= TARGET_RATIO, estimated=True,
                      estimated_median_s=est,
                      from_lowres_depth=base["lowres_depth"],
                      note="sampler time = the measured sampler at "
                           "from_lowres_depth + the context program's "
                           "time at lowres_depth - at from_lowres_depth"))
  attn = {r["self_attention"]: r for r in records
          if r.get("what") == WHAT_ATTENTION and "median_s" in r}
  if "full" in attn and "multi_axis" in attn:
    full, ma = attn["full"], attn["multi_axis"]
    rec = dict(kind="ratio", what=WHAT_ATTENTION, config=full["config"],
               numerator="full", denominator="multi_axis",
               time_ratio=full["median_s"] / ma["median_s"])
    for key in ("step_peak_rss_increase_bytes", "score_bytes_per_layer",
                "step_xla_temp_bytes", "sample_xla_temp_bytes"):
      if full.get(key) is not None and ma.get(key):
        rec[key.replace("_bytes", "") + "_ratio"] = full[key] / ma[key]
    out.append(rec)
  return out


def run_peer(peers_python: str, cfg: configs.BenchConfig, lowres_grid: int,
             repeats: int, forward_repeats: int, warmup_steps: int,
             flash: bool, emit) -> None:
  if not os.path.exists(peers_python):
    raise FileNotFoundError(
        f"{peers_python} not found: create the peers' venv "
        "(`make bench-superres` does) or pass --peers_python")
  cmd = [peers_python, "-m", PEER_MODULE,
         f"--config_json={json.dumps(dataclasses.asdict(cfg))}",
         f"--lowres_grid={lowres_grid}", f"--repeats={repeats}",
         f"--forward_repeats={forward_repeats}",
         f"--warmup_steps={warmup_steps}", f"--flash={int(flash)}"]
  timing.run_peer(cmd, emit, "lucidrains")


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  t_start = time.perf_counter()
  emit = timing.Recorder(f.out)
  records = emit.records

  cfg = dataclasses.replace(SR, batch=f.batch, sample_steps=f.steps,
                            guidance_scale=f.guidance_scale)
  depths = [int(d) for d in f.lowres_depths]
  context_depths = [int(d) for d in f.context_depths]
  device = f"cpu: {timing.cpu_name()}"
  load = os.getloadavg()[0]
  if load > 0.5:
    timing.log(f"warning: 1-minute load average is {load:.2f}; other work "
               "on this machine skews the timings")
  attn_cfg = dataclasses.replace(
      cfg, name=f"SR-{f.attn_grid}", grid_size=f.attn_grid,
      width=f.attn_width, mlp_dim=4 * f.attn_width, depth=f.attn_depth,
      batch=f.attn_batch)
  emit(dict(what="meta", impl="bench-superres", loadavg_1m=load,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            device=device, python=sys.version.split()[0],
            command=" ".join(sys.argv), config=cfg.describe(),
            lowres_grid=LOWRES_GRID, lowres_depths=depths,
            context_depths=context_depths, warmup_steps=f.warmup_steps,
            attention_config=attn_cfg.describe(),
            attention_lowres_grid=f.attn_lowres_grid,
            attention_window=f.attn_window, jax_version=jax.__version__))
  emit(dict(impl=IMPL, what="peak", device=device,
            **peak_lib.peak_matmul_flops(2048, repeats=5)))
  if f.ours:
    for depth in depths:
      emit(bench_sample(cfg, lowres_grid=LOWRES_GRID, lowres_depth=depth,
                        device=device, repeats=f.repeats,
                        forward_repeats=f.forward_repeats,
                        warmup_steps=f.warmup_steps))
    for depth in context_depths:
      emit(bench_context(cfg, lowres_grid=LOWRES_GRID, lowres_depth=depth,
                         device=device))
  if f.peers:
    run_peer(f.peers_python, cfg, LOWRES_GRID, f.peer_repeats,
             f.forward_repeats, f.warmup_steps, f.lucid_flash, emit)
  if f.attention:
    for kind in ("multi_axis", "full"):
      emit(bench_attention(attn_cfg, lowres_grid=f.attn_lowres_grid,
                           self_attention=kind, window=f.attn_window,
                           device=device, repeats=f.attn_repeats,
                           sample_memory=f.attn_sample_memory))
  emit(dict(impl=IMPL, what="peak", device=device,
            **peak_lib.peak_matmul_flops(2048, repeats=5)))
  for rec in ratio_records(records):
    emit(rec)
  emit(dict(what="done", impl="bench-superres",
            wall_s=time.perf_counter() - t_start,
            loadavg_1m=os.getloadavg()[0]))
  emit.close()


if __name__ == "__main__":
  # Flags only when run as the program (tests import this module).
  flags.DEFINE_string("out", "", "also write the JSON lines here")
  flags.DEFINE_integer("batch", SR.batch, "images per sampling request")
  flags.DEFINE_integer("steps", SR.sample_steps, "decoding steps")
  flags.DEFINE_float("guidance_scale", SR.guidance_scale,
                     "classifier-free guidance scale (> 0: CFG)")
  flags.DEFINE_list("lowres_depths", ["1"],
                    "our low-res encoder depths whose whole sampler is "
                    "timed (1: the matched comparison)")
  flags.DEFINE_list("context_depths", ["1", "16"],
                    "low-res encoder depths whose once-per-request context "
                    "is timed (16 is the paper's; its sampler time is "
                    "estimated from it, see ratio_records)")
  flags.DEFINE_integer("warmup_steps", 1,
                       "steps of the excluded warm-up request (0: a full "
                       "request)")
  flags.DEFINE_integer("repeats", 1, "our timed sampling requests (median)")
  flags.DEFINE_integer("peer_repeats", 1,
                       "lucidrains' timed sampling requests (median)")
  flags.DEFINE_integer("forward_repeats", 1, "timed bare forwards")
  flags.DEFINE_bool("ours", True, "run ours")
  flags.DEFINE_bool("peers", True, "run lucidrains (peers' venv)")
  flags.DEFINE_string("peers_python", ".venv-peers/bin/python",
                      "the peers' interpreter")
  flags.DEFINE_bool("lucid_flash", True,
                    "lucidrains' flash=True (its default)")
  flags.DEFINE_bool("attention", True, "multi-axis vs full attention")
  flags.DEFINE_integer("attn_grid", 64, "high-res tokens per side")
  flags.DEFINE_integer("attn_lowres_grid", LOWRES_GRID,
                       "low-res tokens per side")
  flags.DEFINE_integer("attn_width", SR.width, "width (MLP 4x)")
  flags.DEFINE_integer("attn_depth", SR.depth, "layers")
  flags.DEFINE_integer("attn_batch", 1, "images (forward rows: 2x)")
  flags.DEFINE_integer("attn_window", 8, "multi-axis window")
  flags.DEFINE_integer("attn_repeats", 2, "timed decoding steps (median)")
  flags.DEFINE_bool("attn_sample_memory", False,
                    "also compile the whole sampler for XLA's memory "
                    "analysis (not meaningful on XLA:CPU)")
  app.run(main)
