"""Measured peak matmul FLOP/s of the current JAX device.

A large `jnp.dot` (default 2048^3, 2 n^3 FLOPs), jitted, warm-up excluded,
median of repeats; float32, or bfloat16 operands accumulated into a
float32 result (the product the bf16 models run). This is the roof the benchmarks' utilisation is
measured against: what a single well-shaped matrix product reaches on this
machine through XLA, not a datasheet number. (The peers' runner measures the
same product through torch; `bench.py` reports both and uses the larger.)

  python -m benchmarks.peak [--n=2048] [--repeats=10]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks import timing


def peak_matmul_flops(n: int = 2048, repeats: int = 10,
                      dtype=jnp.float32) -> dict:
  """{'peak_flops_per_s', 'median_s', ...} of an n x n x n matmul."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  dot = jax.jit(lambda x, y: jnp.dot(x, y,
                                     preferred_element_type=jnp.float32))
  t = timing.measure(lambda: jax.block_until_ready(dot(a, b)),
                     repeats=repeats, warmup=2)
  flops = 2.0 * n**3
  return dict(n=n, dtype=jnp.dtype(dtype).name, flops=flops,
              peak_flops_per_s=flops / t.median_s,
              best_flops_per_s=flops / min(t.times_s), **t.fields())


# CPU flags of the bf16 matrix instructions torch and XLA use (x86: AVX-512
# BF16, AMX; Arm: BF16 dot products).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, str]:
  """(whether the device multiplies bf16 natively, the evidence).

  Accelerators do; a CPU does when /proc/cpuinfo lists one of
  `BF16_CPU_FLAGS`. Without them bf16 products are emulated: torch's bf16
  2048^3 matmul measured 0.34 GFLOP/s on an AMD Zen 3 (135 in float32), so
  the peers' bf16 benchmarks would take hours.
  """
  if jax.devices()[0].platform != "cpu":
    return True, f"{jax.devices()[0].platform} device"
  try:
    with open(cpuinfo) as f:
      flags = {w for line in f if line.startswith(("flags", "Features"))
               for w in line.split(":", 1)[1].split()}
  except OSError:
    return True, f"no {cpuinfo}; assuming native bf16"
  found = sorted(f for f in BF16_CPU_FLAGS if f in flags)
  if found:
    return True, "CPU flags " + ", ".join(found)
  return False, ("the CPU lists none of the bf16 matrix flags "
                 f"{', '.join(BF16_CPU_FLAGS)} in {cpuinfo}")


def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"cpu: {timing.cpu_name()}"
  return f"{dev.platform}: {dev.device_kind}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=2048)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--dtype", default="float32")
  args = parser.parse_args()
  rec = dict(impl="muse_jax", what="peak", device=device_name(),
             **peak_matmul_flops(args.n, args.repeats, jnp.dtype(args.dtype)))
  timing.emit(rec)


if __name__ == "__main__":
  main()
