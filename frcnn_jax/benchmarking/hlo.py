"""HLO instructions of a compiled program: their scope paths, stages and matrix products.

The step's stages carry `jax.named_scope`s (detector.py: "proposals", "rpn_targets",
"roi_sampling", "losses", "postprocess"; the training step: "optimizer"; ops/images.py:
"input_resize", the device's resize of the input; Flax's module scopes give "trunk", "rpn" and
"head"). The RoI op is a "roi_features" scope where a RoI head names one, else what the RoI
head maps over the images (a `vmap` directly inside its "head" scope). XLA keeps them in each instruction's
`metadata={op_name="..."}`; `hlo_ops` reads them from the compiled program's text
(`compiled.as_text()`), also through fusions and called computations, and `stage_of` maps a
scope path to a stage.
"""

import collections
import re
from typing import Any

# Stage of an HLO op: the innermost token of its scope path that names one.
SCOPE_STAGES = {
    "trunk": "trunk", "rpn": "rpn_head", "head": "roi_head",
    "roi_features": "roi_ops", "_roi_features": "roi_ops", "head._roi_features": "roi_ops",
    "proposals": "proposals_nms", "rpn_targets": "rpn_targets", "roi_sampling": "roi_sampling",
    "losses": "losses", "optimizer": "optimizer", "postprocess": "postprocess",
    "input_resize": "input_resize",
}
_MATMUL_TARGET = re.compile(r"gemm|matmul|conv|cublas|cudnn", re.IGNORECASE)


def _instruction(line: str) -> tuple[str, str, str] | None:
  """(name, opcode, rest) of an HLO instruction line, or None."""
  m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
  if not m:
    return None
  op = re.search(r"(?:^|[\s)\]}])([a-z][a-z0-9\-]*)\(", m.group(2))
  if not op:
    return None
  return m.group(1), op.group(1), m.group(2)


def _called(rest: str) -> list[str]:
  """The computations an instruction calls (fusions, maps, loops, custom calls)."""
  names = []
  for m in re.finditer(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rest):
    names.append(m.group(1))
  for m in re.finditer(r"called_computations=\{([^}]*)\}", rest):
    names += [n.strip().lstrip("%") for n in m.group(1).split(",") if n.strip()]
  return names


def _is_matmul_instruction(opcode: str, rest: str) -> bool:
  if opcode in ("convolution", "dot"):
    return True
  if opcode == "custom-call":
    m = re.search(r'custom_call_target="([^"]*)"', rest)
    return bool(m and _MATMUL_TARGET.search(m.group(1)))
  return False


def _own_op_name(rest: str) -> str:
  m = re.search(r'op_name="([^"]*)"', rest)
  return m.group(1) if m else ""


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Every instruction of a compiled module's text.

  Args:
    hlo_text: `compiled.as_text()` of a `jax.stages.Compiled`.

  Returns:
    {instruction name: {"op_name": scope path ("" when none is known), "opcode", "matmul",
     "computation": the computation holding it}}. "matmul" is True for convolutions and dot
    products, cuBLAS/cuDNN-style custom calls, and fusions (or calls) whose computation holds
    one of those, transitively. An instruction without metadata of its own (or a fusion
    holding a matmul) takes the scope of the computation it calls: its matmul's, else its
    most common.
  """
  computations: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)
  current = ""
  for line in hlo_text.splitlines():
    header = re.match(r"\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*(?:->\s*.*)?\{\s*$", line)
    if header and " = " not in line:
      current = header.group(1)
      continue
    parsed = _instruction(line)
    if parsed:
      computations[current].append(parsed)

  direct: dict[str, bool] = {}
  calls: dict[str, list[str]] = {}
  for comp, instructions in computations.items():
    direct[comp] = any(_is_matmul_instruction(op, rest) for _, op, rest in instructions)
    calls[comp] = [c for _, _, rest in instructions for c in _called(rest)]

  memo: dict[str, bool] = {}

  def holds_matmul(comp: str, seen: frozenset = frozenset()) -> bool:
    if comp not in memo:
      memo[comp] = direct.get(comp, False) or any(
          holds_matmul(c, seen | {comp}) for c in calls.get(comp, ()) if c not in seen)
    return memo[comp]

  def inner_op_name(comp: str, seen: frozenset = frozenset()) -> str:
    """The scope of a computation: its matmul's, else its most common (XLA's fusions and
    layout copies often carry no metadata of their own)."""
    names = [(_own_op_name(rest), _is_matmul_instruction(op, rest))
             for _, op, rest in computations.get(comp, ())]
    for name, matmul in names:
      if name and matmul:
        return name
    common = collections.Counter(n for n, _ in names if n).most_common(1)
    if common:
      return common[0][0]
    for c in calls.get(comp, ()):
      if c not in seen and (found := inner_op_name(c, seen | {comp})):
        return found
    return ""

  result = {}
  for comp, instructions in computations.items():
    for name, op, rest in instructions:
      called = _called(rest)
      matmul = _is_matmul_instruction(op, rest) or (
          op in ("fusion", "call", "custom-call") and any(holds_matmul(c) for c in called))
      op_name = _own_op_name(rest)
      if not op_name or (matmul and not _is_matmul_instruction(op, rest)):
        op_name = next((n for c in called if (n := inner_op_name(c))), op_name)
      result[name] = {"op_name": op_name, "opcode": op, "matmul": matmul, "computation": comp}
  return result


def stage_of(op_name: str) -> str:
  """The stage of an op from its scope path: the innermost token in SCOPE_STAGES, where a
  `vmap` directly inside the RoI head's "head" scope is the RoI op ("roi_ops"); "other" when
  no token matches."""
  stage, previous = "other", ""
  for token in re.findall(r"[A-Za-z_][\w.]*", op_name):
    if token in SCOPE_STAGES:
      stage = SCOPE_STAGES[token]
    elif token.endswith("._roi_features") or (token == "vmap" and previous == "head"):
      stage = "roi_ops"
    previous = token
  return stage


def op_stage(info: dict[str, Any] | None) -> tuple[str, bool]:
  """(stage, is matmul) of an `hlo_ops` entry ("other", False for None).

  Matmuls without a scope are "unscoped_matmul" (XLA:CPU's weight-gradient convolutions lose
  their metadata).
  """
  if info is None:
    return "other", False
  stage = stage_of(info["op_name"])
  if stage == "other" and info["matmul"]:
    stage = "unscoped_matmul"
  return stage, info["matmul"]
