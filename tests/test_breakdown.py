"""benchmarks.breakdown: HLO classification and an end-to-end profile."""

import pytest

from benchmarks import breakdown

_HLO = """\
HloModule jit_step_fn, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0.1: f32[4,8], param_1.1: f32[8,2]) -> f32[4,2] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  %param_1.1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_computation.2 (param_0.2: f32[4,8]) -> f32[8,4] {
  %param_0.2 = f32[4,8]{1,0} parameter(0)
  %multiply.2 = f32[4,8]{1,0} multiply(%param_0.2, %param_0.2)
  %copy.2 = f32[4,8]{0,1} copy(%multiply.2)
  ROOT %bitcast.2 = f32[8,4]{1,0} bitcast(%copy.2)
}

%fused_computation.3 (param_0.3: f32[4,8]) -> f32[4,8] {
  %param_0.3 = f32[4,8]{1,0} parameter(0)
  ROOT %exponential.3 = f32[4,8]{1,0} exponential(%param_0.3)
}

%fused_computation.4 (param_0.4: f32[4,8]) -> bf16[4,8] {
  %param_0.4 = f32[4,8]{1,0} parameter(0)
  %tanh.4 = f32[4,8]{1,0} tanh(%param_0.4), metadata={op_name="jit(step_fn)/jvp()/while/body/tanh"}
  ROOT %convert.4 = bf16[4,8]{1,0} convert(%tanh.4)
}

ENTRY %main.9 (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %ynn_fusion = f32[4,2]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%fused_computation.1, metadata={op_name="jit(step_fn)/jvp()/while/body/btd,de->bte/dot_general"}
  %copy_bitcast_fusion = f32[8,4]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.2, metadata={op_name="jit(step_fn)/transpose(jvp())/while/body/add_any"}
  %exponential_fusion = f32[4,8]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.3, metadata={op_name="jit(step_fn)/transpose(jvp())/checkpoint/rematted_computation/exp"}
  %convert_fusion = bf16[4,8]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.4
  %dot.7 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step_fn)/mul"}
  %while.8 = (s32[], f32[4,8]{1,0}) while(%tuple.1), condition=%cond, body=%body, metadata={op_name="jit(step_fn)/jvp()/while"}
  ROOT %add.9 = f32[4,2]{1,0} add(%ynn_fusion, %dot.7), metadata={op_name="jit(step_fn)/add"}
}
"""


def test_parse_hlo_classifies_kind_and_pass():
  ops = breakdown.parse_hlo(_HLO)
  got = {n: (ops[n].kind, ops[n].phase) for n in (
      "ynn_fusion", "copy_bitcast_fusion", "exponential_fusion",
      "convert_fusion", "dot.7", "while.8", "add.9")}
  assert got == {
      "ynn_fusion": ("matmul", "forward"),
      "copy_bitcast_fusion": ("copy", "backward"),
      "exponential_fusion": ("elementwise", "recompute"),
      "convert_fusion": ("elementwise", "forward"),  # from the op inside
      "dot.7": ("matmul", "other"),
      "while.8": ("control", "forward"),
      "add.9": ("elementwise", "other"),
  }
  assert ops["while.8"].shape == "(s32[], f32[4,8]{1,0})"
  # Instructions inside fused computations are parsed too (kind by opcode).
  assert ops["copy.2"].kind == "copy"


def test_breakdown_sums_per_call_per_device_and_skips_loops():
  ops = breakdown.parse_hlo(_HLO)
  durations = {  # microseconds over 2 calls on 2 devices
      "ynn_fusion": (4000.0, 4), "copy_bitcast_fusion": (2000.0, 4),
      "exponential_fusion": (1000.0, 4), "dot.7": (1000.0, 4),
      "while.8": (9e6, 4), "ThunkExecutor::Execute": (9e6, 40)}
  recs = breakdown.breakdown(ops, durations, calls=2, devices=2,
                             wall_s=0.002, top=2)
  summary = recs[0]
  assert summary["kind"] == "summary"
  assert summary["op_ms"] == pytest.approx(2.0)  # 8000 us / 4
  assert summary["overlap_ms"] == pytest.approx(0.0)
  cats = {(r["phase"], r["op_kind"]): r["ms"] for r in recs
          if r["kind"] == "category"}
  assert cats == pytest.approx({
      ("forward", "matmul"): 1.0, ("backward", "copy"): 0.5,
      ("recompute", "elementwise"): 0.25, ("other", "matmul"): 0.25})
  top = [r["op"] for r in recs if r["kind"] == "top"]
  assert top == ["ynn_fusion", "copy_bitcast_fusion"]


# The tests' 8 fake devices split the batch: the demo config's 16 divide.
@pytest.mark.parametrize("config,what", [("demo", "train"),
                                         ("tiny", "sample")])
def test_profile_of_our_programs(config, what):
  recs = breakdown.run(config, what, steps=1, top=5)
  summary = recs[0]
  assert summary["kind"] == "summary" and summary["op_ms"] > 0
  assert summary["ops_timed"] > 10
  cats = {(r["phase"], r["op_kind"]): r for r in recs
          if r["kind"] == "category"}
  assert sum(r["share"] for r in cats.values()) == pytest.approx(1.0)
  if what == "train":
    # The model's products run in both passes; the optimizer is "other".
    assert cats[("forward", "matmul")]["ms"] > 0
    assert cats[("backward", "matmul")]["ms"] > 0
    assert cats[("other", "elementwise")]["ms"] > 0
  else:  # Nothing is differentiated: every op is "other".
    assert {p for p, _ in cats} == {"other"}
    assert cats[("other", "matmul")]["ms"] > 0
  tops = [r for r in recs if r["kind"] == "top"]
  assert len(tops) == 5 and all(r["ms"] > 0 for r in tops)
  assert [r["ms"] for r in tops] == sorted((r["ms"] for r in tops),
                                           reverse=True)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="--what='eval'"):
    breakdown.run("tiny", "eval", steps=1, top=1)
  with pytest.raises(ValueError, match="--steps=0"):
    breakdown.run("tiny", "train", steps=0, top=1)
  with pytest.raises(ValueError, match="nope"):
    breakdown.run("nope", "train", steps=1, top=1)
