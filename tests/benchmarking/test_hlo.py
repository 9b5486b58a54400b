"""frcnn_jax.benchmarking.hlo: scopes, stages and matmuls of a compiled program's HLO."""

import pytest

from frcnn_jax.benchmarking import hlo

HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_computation.1 (param_0: f32[4,4], param_1: f32[4,4]) -> f32[4,4] {
  %param_0 = f32[4,4]{1,0} parameter(0)
  %param_1 = f32[4,4]{1,0} parameter(1)
  ROOT %dot.3 = f32[4,4]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/jvp(loss)/trunk/conv1_1/dot_general"}
}

%fused_computation.2 (param_0.1: f32[4,4]) -> f32[4,4] {
  %param_0.1 = f32[4,4]{1,0} parameter(0)
  ROOT %exp.1 = f32[4,4]{1,0} exponential(%param_0.1), metadata={op_name="jit(step)/jvp(loss)/proposals/exp"}
}

%body.3 (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]{1,0}) parameter(0)
  %gte.1 = f32[4,4]{1,0} get-tuple-element(%p), index=1
  %sort.2 = f32[4,4]{1,0} sort(%gte.1), dimensions={1}, to_apply=%cmp, metadata={op_name="jit(step)/transpose(jvp(loss))/roi_sampling/sort"}
  ROOT %tuple.1 = (s32[], f32[4,4]{1,0}) tuple(%gte.1, %sort.2)
}

ENTRY %main.9 (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  %dot_fusion = f32[4,4]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_computation.1
  %exp_fusion = f32[4,4]{1,0} fusion(%dot_fusion), kind=kLoop, calls=%fused_computation.2
  %gemm.1 = (f32[4,4]{1,0}, s8[0]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(step)/FasterRCNN.roi_head/head/fc6/dot_general"}
  %while.4 = (s32[], f32[4,4]{1,0}) while(%t), condition=%cond.3, body=%body.3
  %conv.5 = f32[4,4]{1,0} convolution(%a, %b), window={size=1x1}, dim_labels=b01f_01io->b01f
  ROOT %add.6 = f32[4,4]{1,0} add(%exp_fusion, %a), metadata={op_name="jit(step)/optimizer/add"}
}
"""


def test_hlo_ops_finds_scopes_and_matmuls_through_fusions_and_custom_calls():
  ops = hlo.hlo_ops(HLO)
  assert ops["dot_fusion"]["matmul"] and "trunk" in ops["dot_fusion"]["op_name"]
  assert not ops["exp_fusion"]["matmul"]
  assert hlo.stage_of(ops["exp_fusion"]["op_name"]) == "proposals_nms"
  assert ops["gemm.1"]["matmul"] and hlo.stage_of(ops["gemm.1"]["op_name"]) == "roi_head"
  assert ops["conv.5"]["matmul"] and ops["conv.5"]["op_name"] == ""
  assert not ops["add.6"]["matmul"] and hlo.stage_of(ops["add.6"]["op_name"]) == "optimizer"
  assert hlo.stage_of(ops["sort.2"]["op_name"]) == "roi_sampling"
  assert ops["sort.2"]["computation"] == "body.3"


def test_op_stage_names_unscoped_matmuls():
  ops = hlo.hlo_ops(HLO)
  assert hlo.op_stage(ops["conv.5"]) == ("unscoped_matmul", True)
  assert hlo.op_stage(ops["dot_fusion"]) == ("trunk", True)
  assert hlo.op_stage(None) == ("other", False)


@pytest.mark.parametrize("op_name, stage", [
    ("jit(step_fn)/transpose(jvp(jit(loss_fn)))/FasterRCNN.features_and_rpn/trunk/conv2_1/rev",
     "trunk"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.features_and_rpn/rpn/conv/add", "rpn_head"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.roi_head/head/vmap(head._roi_features)/gather",
     "roi_ops"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.roi_head/head/vmap()/gather", "roi_ops"),
    ("jit(step_fn)/transpose(jvp(jit(loss_fn)))/FasterRCNN.roi_head/head/vmap(jit(clip))/max",
     "roi_ops"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.roi_head/head/roi_features/gather", "roi_ops"),
    ("jit(step_fn)/jvp(jit(loss_fn))/FasterRCNN.roi_head/head/fc7/dot_general", "roi_head"),
    ("jit(step_fn)/jvp(jit(loss_fn))/losses/vmap()/mul", "losses"),
    ("jit(step_fn)/jvp(jit(loss_fn))/proposals/vmap()/while/body/sort", "proposals_nms"),
    ("jit(step_fn)/jvp(jit(loss_fn))/rpn_targets/vmap()/max", "rpn_targets"),
    ("jit(step_fn)/transpose(jvp(jit(loss_fn)))/losses/vmap()/mul", "losses"),
    ("jit(step_fn)/optimizer/mul", "optimizer"),
    ("jit(step_fn)/jvp(jit(loss_fn))/input_resize/jit(resize_flip_pad)/vmap()/dot_general",
     "input_resize"),
    ("jit(step_fn)/jit(_where)/select_n", "other"),
    ("", "other"),
])
def test_stage_of(op_name, stage):
  assert hlo.stage_of(op_name) == stage
