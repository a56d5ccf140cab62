"""The benchmark harness's machine checks and result table (no timing)."""

from __future__ import annotations

from benchmarks import configs
from benchmarks import peak
from benchmarks import table

ZEN3_FLAGS = ("flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2 sha_ni "
              "clzero\n")
SPR_FLAGS = ("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")


def test_native_bf16_reads_the_cpu_flags(tmp_path):
  zen3, spr = tmp_path / "zen3", tmp_path / "spr"
  zen3.write_text(ZEN3_FLAGS * 2)
  spr.write_text(SPR_FLAGS)
  ok, why = peak.native_bf16(str(zen3))
  assert not ok and "avx512_bf16" in why and str(zen3) in why
  ok, why = peak.native_bf16(str(spr))
  assert ok and "amx_bf16" in why and "avx512_bf16" in why
  arm = tmp_path / "arm"
  arm.write_text("Features\t: fp asimd bf16 sve\n")
  assert peak.native_bf16(str(arm))[0]


def test_bf16_configs_are_skipped_with_a_reason():
  run, skipped = configs.runnable(["S", "S-bf16", "demo"], False,
                                 "no flags")
  assert run == ["S", "demo"]
  assert [r["config"] for r in skipped] == ["S-bf16"]
  assert "no native bf16" in skipped[0]["reason"]
  assert configs.runnable(["S", "S-bf16"], True, "")[0] == ["S", "S-bf16"]
  # The table says why instead of an empty target block.
  text = table.render(skipped + [dict(what="meta", impl="bench",
                                      device="cpu", date="d",
                                      git_commit="c", jax_version="j")])
  assert "Skipped config S-bf16: no native bf16" in text
  assert "Target (config S-bf16)" not in text
