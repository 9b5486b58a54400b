r"""The paper's 4-step alternating training (Section 3.2; py-faster-rcnn's `alt_opt`).

Usage (one command runs every stage; run it again to resume: finished stages are skipped,
the unfinished one resumes from its newest checkpoint; --evaluate_again evaluates the finished
stages again):

  python -m frcnn_jax.alt_opt --config experiments/voc_alt_opt.py --workdir runs/voc_alt_opt \
      [--evaluate_again] [--config.key=value ...]

Stages (`STAGES`), each an ordinary training run (`train.train_and_evaluate`) in its own
folder WORKDIR/<stage> with its own checkpoints, metrics and final evaluation:

  1. stage1_rpn: the RPN (and the trunk) from ImageNet weights (`train.loss_mode` "rpn"; the
     detection head is neither updated nor decayed).
  2. stage2_fast_rcnn: Fast R-CNN (trunk and head) from ImageNet weights on stage 1's
     proposals for the training set (loss_mode "head", `data.proposals`).
  3. stage3_rpn: the RPN alone, initialised from stage 2, the shared convs frozen
     (the backbone's `all_frozen` settings).
  4. stage4_fast_rcnn: the head alone on stage 3's proposals, initialised from stage 3, shared
     convs frozen. Its checkpoint is the final detector (trunk of stage 2, RPN of stage 3, head
     of stage 4); evaluate / detect / export it with --workdir WORKDIR/stage4_fast_rcnn.

Proposals (`frcnn_jax.data.proposal_store` files) go to WORKDIR/proposals/<stage>-<split>.npz:
the training split's (what the next Fast R-CNN stage trains on, `alt_opt.num_proposals` per
image, `alt_opt.pre_nms_top_n` boxes entering NMS) and the eval split's, whose recall at the
top 300 / 1000 / 2000 proposals and IoU 0.5 / 0.7 is written next to it (-recall.json).
WORKDIR/alt_opt.json summarises the stages (final eval mAP, proposal recall).

Per-stage numbers come from `alt_opt.*` (steps, learning-rate boundaries, images per step,
RoIs per image of the Fast R-CNN stages); everything else from the config as usual.
"""

import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils

from frcnn_jax import dump_proposals
from frcnn_jax import train
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.data import proposal_store
from frcnn_jax.models.registry import BACKBONES
from frcnn_jax.runtime import atomic_io
from frcnn_jax.runtime import host_memory
from frcnn_jax.runtime import parallel
from frcnn_jax.runtime import workdir_lock
from frcnn_jax.training import restore
from frcnn_jax.training import step as train_step


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of alternating training.

  Attributes:
    name: its folder under the workdir.
    loss_mode: `train.loss_mode` ("rpn" or "head").
    init_from: the stage whose final parameters start this one ("": ImageNet weights).
    proposals_from: the RPN stage whose training-set proposals this one trains on ("": none).
    freeze_trunk: every trunk block frozen (the shared convs).
  """
  name: str
  loss_mode: str
  init_from: str = ""
  proposals_from: str = ""
  freeze_trunk: bool = False


STAGES = (
    Stage("stage1_rpn", "rpn"),
    Stage("stage2_fast_rcnn", "head", proposals_from="stage1_rpn"),
    Stage("stage3_rpn", "rpn", init_from="stage2_fast_rcnn", freeze_trunk=True),
    Stage("stage4_fast_rcnn", "head", init_from="stage3_rpn", proposals_from="stage3_rpn",
          freeze_trunk=True),
)


def proposals_path(workdir: str, stage: str, split: str) -> str:
  """WORKDIR/proposals/<stage>-<split>.npz."""
  return os.path.join(workdir, "proposals", f"{stage}-{split}.npz")


def _check_per_stage(config: ml_collections.ConfigDict) -> None:
  a = config.alt_opt
  for key in ("num_steps", "lr_boundaries", "batch_size"):
    if len(a[key]) != len(STAGES):
      raise ValueError(f"alt_opt.{key} needs one entry per stage ({len(STAGES)}), got "
                       f"{a[key]!r}")
  if a.num_proposals < 1 or a.roi_batch_size_per_image < 1:
    raise ValueError("alt_opt.num_proposals and alt_opt.roi_batch_size_per_image must be >= 1")


def stage_config(config: ml_collections.ConfigDict, workdir: str,
                 index: int) -> ml_collections.ConfigDict:
  """The training config of stage `index` (0-based) of the run in `workdir`."""
  _check_per_stage(config)
  stage = STAGES[index]
  a = config.alt_opt
  c = config.copy_and_resolve_references()
  c.train.loss_mode = stage.loss_mode
  c.train.num_steps = int(a.num_steps[index])
  c.train.lr_boundaries = tuple(int(b) for b in a.lr_boundaries[index])
  c.train.batch_size = int(a.batch_size[index])
  c.train.checkpoint_every = min(int(c.train.checkpoint_every), c.train.num_steps)
  if stage.init_from:
    c.train.init_from = os.path.join(workdir, stage.init_from)
    c.model.pretrained = ""
  if stage.freeze_trunk:
    backbone = BACKBONES.get(c.model.backbone)
    c.model[c.model.backbone].update(backbone.all_frozen)
  if stage.proposals_from:
    c.data.proposals = proposals_path(workdir, stage.proposals_from, "train")
    c.data.num_proposals = int(a.num_proposals)
    c.roi.batch_size_per_image = int(a.roi_batch_size_per_image)
  else:
    c.data.proposals = ""
  return c


def _dump(config: ml_collections.ConfigDict, stage_dir: str, split: str, path: str,
          num_steps: int, mesh: jax.sharding.Mesh) -> proposal_store.ProposalSet:
  """The proposals of `split` by the RPN of `stage_dir`'s final checkpoint (kept if present).

  Raises:
    ValueError: an existing file was dumped from another checkpoint step.
  """
  if os.path.exists(path):
    stored = proposal_store.load(path)
    if stored.meta.get("step") != num_steps:
      raise ValueError(f"{path} holds the proposals of step {stored.meta.get('step')}, not of "
                       f"the finished stage's step {num_steps}; move it away to dump again")
    return stored
  params, step = restore.restore_params(stage_dir, mesh, num_steps)
  a = config.alt_opt
  proposals = dump_proposals.dump_for_config(
      config, params, split, num_proposals=int(a.num_proposals),
      pre_nms_top_n=int(a.pre_nms_top_n), mesh=mesh,
      meta={"checkpoint": os.path.abspath(stage_dir), "step": step})
  if jax.process_index() == 0:
    proposal_store.save(path, proposals)
  if jax.process_count() > 1:   # the others read the file next
    multihost_utils.sync_global_devices(f"alt_opt proposals {path}")
  return proposals


def _recall(config: ml_collections.ConfigDict, proposals: proposal_store.ProposalSet,
            path: str) -> dict[str, Any]:
  """Recall of eval-split proposals, written to <path stem>-recall.json."""
  result = proposal_store.recall(proposals, dump_proposals.split_source(config, "eval"))
  if jax.process_index() == 0:
    atomic_io.write_json(os.path.splitext(path)[0] + "-recall.json", result)
  return result


def run(config: ml_collections.ConfigDict, workdir: str,
        stop: train._Preemption | None = None, *,
        evaluate_again: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the four stages in `workdir`.

  Args:
    config: the experiment config (with its `alt_opt` section).
    workdir: the alternating-training run directory.
    stop: the SIGTERM / SIGINT handler shared by the stages (None: one per stage).
    evaluate_again: evaluate stages that had finished before again (`train_and_evaluate`'s
      `evaluate_again`); their proposals are kept.

  Returns:
    {"stages": {name: {"map", "step", "complete" (the stage is finished: trained to its last
     step and evaluated), "already_complete" (it was finished before this call, which left it
     as it was), "preempted"}}, "recall": {rpn stage: eval-split recall table},
     "preempted": bool, "final": folder of the final detector}; also written to
     WORKDIR/alt_opt.json when every stage finished.

  Raises:
    ValueError / FileNotFoundError: bad config values, missing data or weights; a stage's
      errors (see `train.train_and_evaluate`).
  """
  _check_per_stage(config)
  mesh = parallel.make_mesh()
  summary: dict[str, Any] = {"stages": {}, "recall": {}, "preempted": False,
                             "final": os.path.join(workdir, STAGES[-1].name)}
  for index, stage in enumerate(STAGES):
    c = stage_config(config, workdir, index)
    stage_dir = os.path.join(workdir, stage.name)
    if stage.proposals_from:
      source_index = [s.name for s in STAGES].index(stage.proposals_from)
      source_dir = os.path.join(workdir, stage.proposals_from)
      _dump(c, source_dir, "train", c.data.proposals,
            int(config.alt_opt.num_steps[source_index]), mesh)
    absl_logging.info("alternating training: %s (%d of %d) in %s", stage.name, index + 1,
                      len(STAGES), stage_dir)
    result = train.train_and_evaluate(c, stage_dir, stop=stop, evaluate_again=evaluate_again)
    finished = not result["preempted"] and result["step"] == c.train.num_steps
    summary["stages"][stage.name] = {
        "map": result["eval"].get("map"), "step": result["step"], "complete": finished,
        "already_complete": result["complete"], "preempted": result["preempted"]}
    if result["preempted"]:
      summary["preempted"] = True
      return summary
    if stage.loss_mode == "rpn":
      path = proposals_path(workdir, stage.name, "eval")
      proposals = _dump(c, stage_dir, "eval", path, c.train.num_steps, mesh)
      summary["recall"][stage.name] = _recall(c, proposals, path)["recall"]
  if jax.process_index() == 0:
    atomic_io.write_json(os.path.join(workdir, "alt_opt.json"), summary)
  return summary


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Run directory: one folder per stage, proposals, "
                      "alt_opt.json.")
  flags.DEFINE_bool("evaluate_again", False, "Evaluate the finished stages again (otherwise "
                    "they are reported complete and left as they are).")
  config_flags.define_distributed_flags()


def main(argv: Sequence[str]) -> None:
  stop = train._Preemption()  # first: from here on SIGTERM and Ctrl-C are a clean exit
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  if host_memory.wanted(f.config.train.reuse_host_memory):
    host_memory.keep_freed_memory()
  parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  builders.compilation_cache_from_config(f.config)
  try:
    summary = run(f.config, f.workdir, stop=stop, evaluate_again=f.evaluate_again)
  except (train_step.NonFiniteLossError, ValueError, FileNotFoundError,
          workdir_lock.WorkdirLockedError) as e:
    sys.exit(f"error: {e}")
  finally:
    stop.restore()
  if jax.process_index() == 0:
    print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
