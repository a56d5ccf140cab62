"""Our sampler and training step at a benchmark config (muse_jax, JAX).

Sampling: the library's jitted `muse_jax.sampling.sample` (one program:
the context's keys/values once, a `fori_loop` over steps, guidance batched
into one forward over the context's guidance pair) on random text
embeddings, compiled ahead of time so compile time is reported on its own.
The bare transformer forwards (`model.features` at batch 2B with the
context keys/values given, cross-attention for the B rows with text, then
`model.head_logits` at B, as the sampler runs them) are timed separately;
`non_transformer_fraction = 1 - steps * forward / sample` is the share of
sampling time spent outside them.

Training: the training loop's jitted step (`muse_jax.training.loop
.make_step`) with the masked-transformer task and AdamW (OptimizerConfig
defaults), state created sharded on a one-axis data mesh, random tokens and
text embeddings, timed step by step.

Both run the model's XLA:CPU implementation (`attention_impl` /
`matmul_impl="xla_cpu"`, the fused loss) unless the config says
otherwise (`BenchConfig.impl`); tests hold it equal to the plain path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Iterator

from flax import nnx
from flax.core import spmd as flax_spmd
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs
from benchmarks import flops as flops_lib
from benchmarks import timing
from muse_jax import sampling
from muse_jax import sharding
from muse_jax.models import conditioning
from muse_jax.models.transformer import MaskedTransformer, TransformerConfig
from muse_jax.tasks.masked_transformer import (MaskedTransformerTask,
                                               ObjectiveConfig)
from muse_jax.training import loop as loop_lib
from muse_jax.training.optimizer import OptimizerConfig

IMPL = "muse_jax"


# What the training step recomputes in the backward pass, per config: the
# fastest policy measured on the 2-core CPU (2026-11-29, the Xeon: S 2.56 s
# with dots_no_batch, 2.68 s full, 3.02 s none; S-bf16 with the attention
# core's own backward 1.17-1.24 s dots_no_batch, 1.17-1.27 s full (within
# the machine's drift), 2.06 s none; the demo recipe's own choice is full).
TRAIN_REMAT = {"S": "dots_no_batch", "S-bf16": "dots_no_batch",
               "demo": "full"}


def transformer_config(cfg: configs.BenchConfig, scan_layers: bool = True,
                       remat_policy: str = "none") -> TransformerConfig:
  return TransformerConfig(
      codebook_size=cfg.codebook_size, grid_size=cfg.grid_size,
      text_dim=cfg.text_dim, width=cfg.width, depth=cfg.depth,
      num_heads=cfg.num_heads, mlp_dim=cfg.mlp_dim, scan_layers=scan_layers,
      remat_policy=remat_policy, dtype=cfg.dtype, attention_impl=cfg.impl,
      matmul_impl=cfg.impl)


def _loss_impl(cfg: configs.BenchConfig) -> str:
  return "fused" if cfg.impl == "xla_cpu" else "plain"


def _mesh_and_rules():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1), ("tensor", 1)])
  return mesh, sharding.validate_rules(sharding.DEFAULT_RULES, mesh)


def _text(cfg: configs.BenchConfig, batch: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  emb = rng.standard_normal((batch, cfg.text_len, cfg.text_dim), np.float32)
  return emb, np.ones((batch, cfg.text_len), bool)


def _memory(compiled) -> dict[str, Any]:
  out: dict[str, Any] = {}
  try:
    mem = compiled.memory_analysis()
    out["xla_temp_bytes"] = int(mem.temp_size_in_bytes)
    out["xla_argument_bytes"] = int(mem.argument_size_in_bytes)
    out["xla_output_bytes"] = int(mem.output_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    pass  # Not every backend implements memory_analysis.
  stats = jax.devices()[0].memory_stats()
  out["peak_memory_bytes"] = (int(stats["peak_bytes_in_use"])
                              if stats and "peak_bytes_in_use" in stats
                              else None)
  out["max_rss_bytes"] = timing.max_rss_bytes()
  return out


@dataclasses.dataclass
class Program:
  """A compiled benchmark program and what its callers need around it."""

  compiled: Any
  compile_s: float
  run: Callable[[], Any]  # One call, blocked until ready.
  parts: dict[str, Any]  # What built it (model, batch, state maker, ...).


def sample_program(cfg: configs.BenchConfig, seed: int = 0) -> Program:
  """The library's sampler at `cfg`, compiled, on random text embeddings."""
  mesh, rules = _mesh_and_rules()
  tcfg = transformer_config(cfg)
  make = lambda: MaskedTransformer(tcfg, rngs=nnx.Rngs(seed))
  model = sharding.create_sharded(make, mesh, rules)
  emb, mask = (jnp.asarray(a) for a in _text(cfg, cfg.batch, seed))
  text = conditioning.Text(emb, mask)
  scfg = sampling.SamplerConfig(num_steps=cfg.sample_steps,
                                guidance_scale=cfg.guidance_scale)
  rng = jax.random.key(seed)
  timing.log(f"[{IMPL}] sample {cfg.name}: compiling")
  t0 = time.perf_counter()
  compiled = sampling.sample.lower(model, rng, text, cfg=scfg).compile()
  compile_s = time.perf_counter() - t0
  run = lambda: jax.block_until_ready(compiled(model, rng, text))
  return Program(compiled, compile_s, run,
                 dict(mesh=mesh, rules=rules, tcfg=tcfg, model=model,
                      text=text, scfg=scfg))


def bench_sample(cfg: configs.BenchConfig, *, peak: float, device: str,
                 repeats: int = 3, forward_repeats: int = 3,
                 seed: int = 0) -> dict[str, Any]:
  """One JSON record: images/s of the full sampler, FLOPs, overhead share."""
  prog = sample_program(cfg, seed)
  compiled, compile_s = prog.compiled, prog.compile_s
  mesh, rules, tcfg, model, text, scfg = (
      prog.parts[k] for k in ("mesh", "rules", "tcfg", "model", "text",
                              "scfg"))
  timing.log(f"[{IMPL}] sample {cfg.name}: timing {repeats} repeats")
  t = timing.measure(prog.run, repeats=repeats)

  # The bare transformer forwards the sampler makes: the features at 2B,
  # the output layer on the guided features at B.
  guided = scfg.guided()
  b2 = 2 * cfg.batch if guided else cfg.batch
  kv_fn = lambda m, t: sampling.guidance_kv(m, scfg, t)
  kv = jax.jit(kv_fn)(model, text)
  tokens = jnp.full((b2, cfg.seq_len), tcfg.mask_token_id, jnp.int32)
  features_fn = lambda m, x, kv: m.features(x, kv)
  head_fn = lambda m, h: m.head_logits(h[:cfg.batch])
  feats_c = jax.jit(features_fn).lower(model, tokens, kv).compile()
  feats = feats_c(model, tokens, kv)
  head_c = jax.jit(head_fn).lower(model, feats).compile()
  timing.log(f"[{IMPL}] sample {cfg.name}: timing bare forwards")
  ft = timing.measure(
      lambda: jax.block_until_ready(
          head_c(model, feats_c(model, tokens, kv))),
      repeats=forward_repeats)
  forwards_s = cfg.sample_steps * ft.median_s

  # FLOPs without loops: unrolled layers, text k/v once + steps forwards.
  graphdef_u, abstract_u, _ = sharding.abstract_state(
      lambda: MaskedTransformer(transformer_config(cfg, scan_layers=False),
                                rngs=nnx.Rngs(seed)), mesh, rules)
  unrolled = lambda fn: jax.jit(
      lambda s, *a: fn(nnx.merge(graphdef_u, s), *a))
  kv_flops = flops_lib.xla_flops(unrolled(kv_fn).lower(abstract_u, text))
  fwd_flops = (
      flops_lib.xla_flops(unrolled(features_fn).lower(
          abstract_u, tokens, kv))
      + flops_lib.xla_flops(unrolled(head_fn).lower(abstract_u, feats)))
  rec = timing.throughput_record(IMPL, "sample", cfg, t)
  rec.update(
      compile_s=compile_s,
      flops=kv_flops + cfg.sample_steps * fwd_flops,
      xla_flops_raw=flops_lib.xla_flops(compiled),
      flops_matmul=flops_lib.ours_sample_matmul_flops(
          cfg, cfg.batch, cfg.sample_steps, guided),
      forward_batch=b2, forward_median_s=ft.median_s, model_impl=cfg.impl,
      forward_flops=fwd_flops,
      forward_flops_per_s=fwd_flops / ft.median_s,
      non_transformer_fraction=1.0 - forwards_s / t.median_s,
      device=device, jax_version=jax.__version__,
      note="token ids only (no VQ decode), random weights and text "
           "embeddings; flops = XLA cost analysis of text k/v + steps x "
           "forward with unrolled layers (scan bodies are counted once by "
           "XLA: see xla_flops_raw)")
  rec.update(timing.rates(rec, peak))
  rec["forward_utilisation"] = rec["forward_flops_per_s"] / peak
  rec.update(_memory(compiled))
  return rec


@contextlib.contextmanager
def train_program(cfg: configs.BenchConfig, seed: int = 0
                  ) -> Iterator[Program]:
  """Our training step at `cfg`, compiled, state created sharded.

  The mesh and logical-axis rules stay in effect inside the `with`, for
  callers that lower more programs (the FLOP count). Each `run()` takes one
  optimizer step from the previous one's state and returns its metrics.
  """
  mesh, rules = _mesh_and_rules()
  remat = TRAIN_REMAT.get(cfg.name, "none")

  def task_of(scan_layers: bool, remat_policy: str):
    return MaskedTransformerTask(
        transformer_config(cfg, scan_layers, remat_policy),
        OptimizerConfig(), ObjectiveConfig(loss_impl=_loss_impl(cfg)),
        num_steps=10_000, seed=seed)

  rng = np.random.default_rng(seed)
  emb, mask = _text(cfg, cfg.batch, seed)
  host_batch = dict(
      tokens=rng.integers(0, cfg.codebook_size, (cfg.batch, cfg.seq_len),
                          dtype=np.int32),
      text_emb=emb, text_mask=mask)
  task = task_of(True, remat)
  with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(rules):
    state = loop_lib.create_state(task, mesh, rules)
    batch = sharding.global_batch(host_batch, mesh, rules)
    step_fn = loop_lib.make_step(task, state, {}, seed)
    timing.log(f"[{IMPL}] train {cfg.name}: compiling")
    t0 = time.perf_counter()
    compiled = step_fn.lower(state.states, {}, batch,
                             jnp.asarray(0, jnp.int32)).compile()
    compile_s = time.perf_counter() - t0
    holder = dict(state=state.states, step=0)

    def one_step():
      new_state, metrics = compiled(
          holder["state"], {}, batch, jnp.asarray(holder["step"], jnp.int32))
      jax.block_until_ready((new_state, metrics))
      holder["state"] = new_state
      holder["step"] += 1
      return metrics

    yield Program(compiled, compile_s, one_step,
                  dict(mesh=mesh, rules=rules, batch=batch, remat=remat,
                       task_of=task_of))


def bench_train(cfg: configs.BenchConfig, *, peak: float, device: str,
                repeats: int = 5, seed: int = 0) -> dict[str, Any]:
  """One JSON record: training tokens/s and steps/s, FLOPs per step."""
  with train_program(cfg, seed) as prog:
    compiled, compile_s = prog.compiled, prog.compile_s
    remat = prog.parts["remat"]
    timing.log(f"[{IMPL}] train {cfg.name}: timing {repeats} steps")
    t = timing.measure(prog.run, repeats=repeats)
    loss = float(prog.run()["loss"])

    mesh, rules = prog.parts["mesh"], prog.parts["rules"]
    task_u = prog.parts["task_of"](False, "none")
    abstract_u = loop_lib.abstract_state(task_u, mesh, rules)
    step_u = loop_lib.make_step(task_u, abstract_u, {}, seed)
    flops = flops_lib.xla_flops(step_u.lower(
        abstract_u.states, {}, prog.parts["batch"],
        jnp.asarray(0, jnp.int32)))

  rec = timing.throughput_record(IMPL, "train", cfg, t)
  rec.update(
      compile_s=compile_s, flops=flops,
      xla_flops_raw=flops_lib.xla_flops(compiled),
      flops_matmul=flops_lib.ours_train_matmul_flops(cfg, cfg.batch),
      final_loss=loss, remat_policy=remat, model_impl=cfg.impl,
      device=device,
      jax_version=jax.__version__,
      note="AdamW (OptimizerConfig defaults, global-norm clipping), masked "
           "cross-entropy on random tokens; flops = XLA cost analysis of "
           "the step with unrolled layers and no rematerialisation (model "
           "FLOPs: the backward's recomputation is not counted)")
  rec.update(timing.rates(rec, peak))
  rec.update(_memory(compiled))
  return rec
