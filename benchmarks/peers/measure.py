"""torch-side measurement: threads, peak matmul FLOP/s, FLOP counting, rates.

FLOPs of the peers are *counted*, not estimated: torch's FlopCounterMode
sees every matmul-class op the run dispatches (mm, addmm, bmm, convolution,
and the attention kernels; forward and backward). On the CPU,
`scaled_dot_product_attention` dispatches to a kernel FlopCounterMode has no
formula for, so we register torch's own SDPA formulas for it. Element-wise
work is not counted (as in our `flops_matmul`).
"""

from __future__ import annotations

from collections.abc import Callable
import contextlib
import os
import time
from typing import Any

import torch
from torch.utils import flop_counter

from benchmarks import timing


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None,
                **kwargs) -> int:
  del args, out_shape, kwargs
  return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward_flops(grad_out_shape, query_shape, key_shape,
                         value_shape, *args, out_shape=None, **kwargs) -> int:
  del args, out_shape, kwargs
  return flop_counter.sdpa_backward_flop_count(
      grad_out_shape, query_shape, key_shape, value_shape)


_aten = torch.ops.aten
_CPU_SDPA = {}
for _name, _formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flops),
    ("_scaled_dot_product_flash_attention_for_cpu_backward",
     _sdpa_backward_flops)):
  if hasattr(_aten, _name):
    _CPU_SDPA[getattr(_aten, _name)] = _formula


def setup() -> None:
  """Uses every core (torch.set_num_threads(os.cpu_count())), seed 0."""
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)


def device_name() -> str:
  return f"cpu: {timing.cpu_name()}"


def peak_matmul_flops(n: int = 2048, repeats: int = 10,
                      dtype: str = "float32") -> dict[str, Any]:
  """n x n x n torch.mm in `dtype`, warm-up excluded, median of repeats."""
  a, b = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
  t = timing.measure(lambda: torch.mm(a, b), repeats=repeats, warmup=2)
  flops = 2.0 * n**3
  return dict(n=n, dtype=dtype, flops=flops,
              peak_flops_per_s=flops / t.median_s,
              best_flops_per_s=flops / min(t.times_s), **t.fields())


def counted_then_timed(fn: Callable[[], Any], repeats: int
                       ) -> tuple[float, timing.Timing]:
  """(FLOPs of one call, timing): the warm-up call is the counted one.

  Counting slows that call a little; it is excluded from the median anyway
  and reported as `first_call_s`.
  """
  with flop_counter.FlopCounterMode(display=False,
                                    custom_mapping=_CPU_SDPA) as counter:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
  rest = timing.measure(fn, repeats=repeats, warmup=0)
  return float(counter.get_total_flops()), timing.Timing(first, rest.times_s)


def precision(cfg):
  """The context a peer runs `cfg` under: bf16 autocast or nothing."""
  if cfg.dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast("cpu", dtype=getattr(torch, cfg.dtype))


def rates(record: dict[str, Any], peak: float) -> dict[str, Any]:
  out = timing.rates(record, peak)
  out["max_rss_bytes"] = timing.max_rss_bytes()
  out["peak_memory_bytes"] = None  # torch reports no CPU allocator peak.
  return out


def sample_record(impl: str, cfg, flops: float, t: timing.Timing, *,
                  peak: float, forward_batch: int, forward_s: float,
                  **extra) -> dict[str, Any]:
  """The JSON record of one peer's sampler (same fields as ours)."""
  rec = timing.throughput_record(impl, "sample", cfg, t)
  rec.update(
      compile_s=None, flops=flops, flops_matmul=flops, forward_batch=forward_batch,
      forward_median_s=forward_s,
      non_transformer_fraction=1.0 - cfg.sample_steps * forward_s
      / t.median_s,
      device=device_name(), torch_version=torch.__version__, **extra)
  rec.update(rates(rec, peak))
  return rec


def train_record(impl: str, cfg, flops: float, t: timing.Timing, *,
                 peak: float, **extra) -> dict[str, Any]:
  """The JSON record of one peer's training step (same fields as ours)."""
  rec = timing.throughput_record(impl, "train", cfg, t)
  rec.update(
      compile_s=None, flops=flops, flops_matmul=flops, device=device_name(),
      torch_version=torch.__version__, **extra)
  rec.update(rates(rec, peak))
  return rec


def optimizer_step(loss: torch.Tensor, params, opt) -> float:
  """backward, global-norm clipping at 1 (as ours), step; returns the loss."""
  loss.backward()
  torch.nn.utils.clip_grad_norm_(params, 1.0)
  opt.step()
  opt.zero_grad(set_to_none=True)
  return loss.detach().item()


def adamw(params) -> torch.optim.Optimizer:
  """AdamW with our OptimizerConfig's defaults (lr, betas, weight decay)."""
  return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.96),
                           weight_decay=0.045)
