r"""Dumps the RPN proposals of a training run for a split and prints their recall.

Usage (the proposals of the run's newest checkpoint; or only the recall of an existing file
with --proposals):

  python -m frcnn_jax.dump_proposals --config experiments/voc.py --workdir runs/voc \
      [--split eval|train] [--output FILE.npz] [--num_proposals 2000] [--pre_nms_top_n -1]
  python -m frcnn_jax.dump_proposals --config experiments/voc.py --proposals FILE.npz \
      [--split eval|train]

Writes FILE.npz (default WORKDIR/proposals/<split>-<step>.npz; format: proposal_store.py) and
FILE-recall.json: recall at the top 300 / 1000 / 2000 proposals and IoU 0.5 / 0.7 against the
split's ground truth, difficult objects excluded. The last line printed is that JSON.
"""

import json
import os
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app
from absl import flags

from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.data import proposal_store
from frcnn_jax.runtime import atomic_io
from frcnn_jax.runtime import parallel
from frcnn_jax.training import restore


def split_source(config: ml_collections.ConfigDict, split: str):
  """The source of "train" (records as training sees them, without stored proposals) or
  "eval"."""
  if split == "train":
    config = config.copy_and_resolve_references()
    config.data.proposals = ""
    config.train.loss_mode = "joint"
  return builders.source_from_config(config, split)


def dump_for_config(config: ml_collections.ConfigDict, params: Any, split: str, *,
                    num_proposals: int, pre_nms_top_n: int, mesh: jax.sharding.Mesh,
                    meta: Mapping[str, Any] | None = None) -> proposal_store.ProposalSet:
  """`proposal_store.dump` of the config's "train" or "eval" split (each record once, no
  flip, the eval pipeline's resizing)."""
  source = split_source(config, split)
  model = builders.model_from_config(config, len(source.classes))
  settings = builders.detector_settings_from_config(config)
  eval_config = config.copy_and_resolve_references()
  devices = mesh.devices.size
  eval_config.eval.batch_size = -(-config.eval.batch_size // devices) * devices
  batches = builders.eval_data_from_config(eval_config, source, mesh)
  try:
    return proposal_store.dump(params, batches, source=source, model=model, settings=settings,
                               mesh=mesh, num_proposals=num_proposals,
                               pre_nms_top_n=pre_nms_top_n, meta=meta)
  finally:
    batches.close()


def format_recall(table: Mapping[str, float]) -> str:
  """The recall table: one row per top-N, one column per IoU threshold."""
  rows: dict[str, dict[str, float]] = {}
  for key, value in table.items():
    top, iou = key.split("_")
    rows.setdefault(top, {})[iou] = value
  ious = sorted({iou for row in rows.values() for iou in row})
  lines = ["proposals  " + "  ".join(f"{'recall@' + iou[3:]:>11}" for iou in ious)]
  for top, row in rows.items():
    lines.append(f"{top[3:]:>9}  " + "  ".join(f"{row[iou]:>11.4f}" for iou in ious))
  return "\n".join(lines)


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Training run whose checkpoint's RPN is dumped.")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
  flags.DEFINE_enum("split", "eval", ["train", "eval"], "Which split of the config.")
  flags.DEFINE_string("output", "", "Proposal file to write (default: "
                      "WORKDIR/proposals/<split>-<step>.npz).")
  flags.DEFINE_string("proposals", "", "Evaluate this existing proposal file instead of "
                      "dumping.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing proposal file (otherwise an "
                    "existing --output is an error).")
  flags.DEFINE_integer("num_proposals", 2000, "Proposals kept per image after NMS.")
  flags.DEFINE_integer("pre_nms_top_n", -1, "Boxes entering NMS (<= 0: every anchor, as "
                       "py-faster-rcnn's alt-opt rpn_generate).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  config = f.config
  try:
    if f.proposals:
      path = f.proposals
      proposals = proposal_store.load(path)
    else:
      if not f.workdir:
        raise app.UsageError("--workdir (or --proposals) is required")
      builders.compilation_cache_from_config(config)
      mesh = parallel.make_mesh()
      params, step = restore.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
      path = f.output or os.path.join(f.workdir, "proposals", f"{f.split}-{step}.npz")
      if os.path.exists(path) and not f.overwrite:
        raise FileExistsError(f"{path} exists: evaluate it with --proposals={path}, or pass "
                              "--overwrite to dump again")
      proposals = dump_for_config(config, params, f.split, num_proposals=f.num_proposals,
                                  pre_nms_top_n=f.pre_nms_top_n, mesh=mesh,
                                  meta={"checkpoint": os.path.abspath(f.workdir), "step": step})
      if jax.process_index() == 0:
        proposal_store.save(path, proposals)
    result = proposal_store.recall(proposals, split_source(config, f.split))
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    result = {"proposals": os.path.abspath(path), **result}
    atomic_io.write_json(os.path.splitext(path)[0] + "-recall.json", result)
    print(format_recall(result["recall"]))
    print(json.dumps(result))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
