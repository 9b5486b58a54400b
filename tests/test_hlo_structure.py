"""The compiled training step and `predict` hold nothing that stalls an accelerator's host.

XLA:GPU runs a `while` loop whose trip count it cannot prove at compile time by copying the
loop condition to the host after every trip (a device-to-host sync each time), and host
callbacks, infeed/outfeed and send/recv leave the device program as well. These tests compile
(on CPU; no accelerator needed) the real training step (`train_step.make_train_step`) and
`detector.predict` for a tiny width-reduced model (on Batches resized on the host and on the
device), read XLA's optimized HLO, and require that
every `while` carries a `known_trip_count` (XLA's WhileLoopTripCountAnnotator records it in
the loop's backend_config) and that none of the host-bound instructions appears.

NMS picks its schedule when lowering (ops/nms.py): on CPU the compiled step holds the CPU
schedule, whose `lax.cond`s skip finished work (free where the host is the device). The
accelerator schedule that GPUs and TPUs run is compiled here directly, at the detector's
default sizes, and must hold no conditional either.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from frcnn_jax.detection import detector
from frcnn_jax.ops import nms as nms_ops
from frcnn_jax.training import step as train_step
from tests.models import tiny

SIZE = 64
SETTINGS = tiny.settings(
    anchor_sizes=(16.0, 32.0), rpn_pre_nms_top_n_train=120, rpn_post_nms_top_n_train=40,
    rpn_pre_nms_top_n_test=60, rpn_post_nms_top_n_test=20, rpn_min_size=0.0,
    rpn_batch_size_per_image=32, roi_batch_size_per_image=16, test_detections_per_image=10)
MODEL = tiny.model()

# `%name = TYPE OPCODE(`: TYPE may be a tuple "(s32[], f32[3]{0})".
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")
_HOST_OPCODES = {"infeed", "outfeed", "send", "send-done", "recv", "recv-done"}
_CALLBACK_TARGET = re.compile(r'custom_call_target="([^"]*(?:callback|host)[^"]*)"', re.I)


def _batch(resize_on: str) -> dict:
  """Two 64x64-canvas images; the second is 48x56 and has no ground truth.

  With `resize_on="device"` the Batch carries the decoded 40x48 images for the step to resize
  (`frcnn_jax.ops.images.batch_images`), as the pipeline ships them to accelerators.
  """
  rng = np.random.default_rng(0)
  gt_boxes = np.zeros((2, 3, 4), np.float32)
  gt_boxes[0, :2] = [[4, 6, 30, 40], [30, 20, 60, 50]]
  if resize_on == "device":
    pixels = {"source_image": rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8),
              "source_hw": np.asarray([[40, 40], [30, 35]], np.int32),
              "flip": np.asarray([False, True]),
              "canvas": np.zeros((2, SIZE, SIZE, 0), np.uint8)}
  else:
    pixels = {"image": rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)}
  return {
      **pixels,
      "image_hw": np.asarray([[64, 64], [48, 56]], np.int32),
      "scale": np.ones(2, np.float32),
      "gt_boxes": gt_boxes,
      "gt_labels": np.asarray([[1, 2, 0], [0, 0, 0]], np.int32),
      "gt_valid": np.asarray([[True, True, False], [False, False, False]]),
      "valid": np.asarray([True, True]),
  }


def host_stalls(hlo_text: str) -> list[str]:
  """The instructions of an optimized HLO module that would stop for the host.

  Args:
    hlo_text: `jax.jit(f).lower(...).compile().as_text()`.

  Returns:
    One line per offending instruction: a `while` without `known_trip_count`, a host
    callback custom-call, or infeed / outfeed / send / recv.
  """
  found = []
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    opcode = match.group(1)
    name = line.split("=", 1)[0].strip()
    if opcode == "while" and '"known_trip_count"' not in line:
      found.append(f"{name}: while without a compile-time trip count ({_op_name(line)})")
    elif opcode in _HOST_OPCODES:
      found.append(f"{name}: {opcode} ({_op_name(line)})")
    elif opcode == "custom-call" and _CALLBACK_TARGET.search(line):
      found.append(f"{name}: host callback {_CALLBACK_TARGET.search(line).group(1)}")
  return found


def _op_name(line: str) -> str:
  match = re.search(r'op_name="([^"]*)"', line)
  return match.group(1) if match else "no op_name"


def _count(hlo_text: str, opcode: str) -> int:
  return sum(1 for line in hlo_text.splitlines()
             if (m := _INSTRUCTION.match(line)) and m.group(1) == opcode)


def test_host_stalls_finds_data_dependent_loops_and_callbacks():
  """The checker itself: a data-dependent while loop and a host callback are caught, a
  fori_loop with static bounds is not."""
  def dynamic(x):
    return jax.lax.while_loop(lambda c: c[0] < c[1], lambda c: (c[0] + 1, c[1] * 2.0),
                              (jnp.int32(0), x))[1]

  def static(x):
    return jax.lax.fori_loop(0, 7, lambda i, c: c * 2.0 + i, x)

  def callback(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

  x = jnp.float32(3.0)
  dynamic_hlo = jax.jit(dynamic).lower(x).compile().as_text()
  assert _count(dynamic_hlo, "while") == 1
  assert len(host_stalls(dynamic_hlo)) == 1 and "trip count" in host_stalls(dynamic_hlo)[0]
  static_hlo = jax.jit(static).lower(jnp.zeros(3)).compile().as_text()
  assert host_stalls(static_hlo) == []
  assert any("host callback" in s for s in host_stalls(jax.jit(callback).lower(x).compile()
                                                       .as_text()))


@pytest.fixture(scope="module", params=["host", "device"])
def train_step_hlo(request) -> str:
  params = tiny.numpy_params(MODEL)
  lr_fn = optax.constant_schedule(0.01)
  tx = optax.sgd(lr_fn, momentum=0.9)
  state = train_step.TrainState(params=params, opt_state=tx.init(params), step=jnp.int32(0),
                           rng=jax.random.PRNGKey(0), nonfinite_skips=jnp.int32(0))
  step = jax.jit(train_step.make_train_step(MODEL, SETTINGS, tx, lr_fn))
  return step.lower(state, _batch(request.param)).compile().as_text()


@pytest.fixture(scope="module", params=["host", "device"])
def predict_hlo(request) -> str:
  predict = jax.jit(functools.partial(detector.predict, model=MODEL, settings=SETTINGS))
  return predict.lower(tiny.numpy_params(MODEL), _batch(request.param)).compile().as_text()


def test_train_step_has_no_host_stalls(train_step_hlo):
  assert host_stalls(train_step_hlo) == []


def test_predict_has_no_host_stalls(predict_hlo):
  assert host_stalls(predict_hlo) == []


@pytest.mark.parametrize("schedule", ["cpu", "accelerator"])
@pytest.mark.parametrize("n,max_output_size,classes", [
    (12000, 2000, False),    # training proposals
    (6000, 300, False),      # test proposals
    (6000, 100, True),       # per-class NMS of the detections
])
def test_nms_schedules_at_default_sizes(n, max_output_size, classes, schedule):
  """Both NMS schedules at the default sizes, batched as the detector calls them. The
  accelerator schedule, which GPUs and TPUs run but `nms` does not lower to on CPU, has no
  conditional either: XLA:GPU copies a conditional's predicate to the host as it does a
  loop condition."""
  boxes = jax.ShapeDtypeStruct((2, n, 4), jnp.float32)
  scores = jax.ShapeDtypeStruct((2, n), jnp.float32)
  labels = jax.ShapeDtypeStruct((2, n), jnp.int32) if classes else None
  valid = jax.ShapeDtypeStruct((2, n), jnp.bool_)

  def one(b, s, c, v):
    return nms_ops._tiled_nms(b, s, c, jnp.float32(0.5), v, max_output_size=max_output_size,
                              tile_size=nms_ops.DEFAULT_TILE_SIZE, schedule=schedule)

  hlo = jax.jit(jax.vmap(one)).lower(boxes, scores, labels, valid).compile().as_text()
  assert host_stalls(hlo) == []
  assert _count(hlo, "while") >= 1
  if schedule == "accelerator":
    assert _count(hlo, "conditional") == 0
