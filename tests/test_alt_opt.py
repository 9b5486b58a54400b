"""Tests of the 4-step alternating training driver (frcnn_jax/alt_opt.py)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from frcnn_jax import alt_opt
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.data import proposal_store
from frcnn_jax.runtime import parallel
from frcnn_jax.training import restore
from tests import test_train
from tests.models.backbones import test_resnet_fpn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {
    **test_train.TINY,
    "data.shapes.num_train": 8, "data.shapes.num_test": 2, "eval.batch_size": 2,
    "train.compilation_cache_dir": "",
    "alt_opt.num_steps": (2, 2, 2, 2), "alt_opt.lr_boundaries": ((), (), (), ()),
    "alt_opt.batch_size": (2, 2, 2, 2), "alt_opt.num_proposals": 16,
    "alt_opt.pre_nms_top_n": 64, "alt_opt.roi_batch_size_per_image": 8,
}


def tiny_config(**overrides):
  extra = {k.replace("__", "."): v for k, v in overrides.items()}
  return config_flags.load_config(os.path.join(ROOT, "experiments", "shapes_alt_opt.py"),
                                  {**TINY, **extra})


def test_stage_configs_follow_the_paper():
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "voc_alt_opt.py"))
  stages = [alt_opt.stage_config(config, "/run", i) for i in range(4)]
  assert [s.train.loss_mode for s in stages] == ["rpn", "head", "rpn", "head"]
  assert [s.train.num_steps for s in stages] == [80000, 40000, 80000, 40000]
  assert [s.train.lr_boundaries for s in stages] == [(60000,), (30000,), (60000,), (30000,)]
  assert [s.train.batch_size for s in stages] == [1, 2, 1, 2]
  assert [s.model.vgg16.frozen_blocks for s in stages] == [2, 2, 5, 5]
  assert [s.train.init_from for s in stages] == ["", "", "/run/stage2_fast_rcnn",
                                                 "/run/stage3_rpn"]
  assert stages[0].model.pretrained and stages[1].model.pretrained
  assert not stages[2].model.pretrained and not stages[3].model.pretrained
  assert [s.data.proposals for s in stages] == [
      "", "/run/proposals/stage1_rpn-train.npz", "", "/run/proposals/stage3_rpn-train.npz"]
  assert stages[1].roi.batch_size_per_image == 64 and stages[1].data.num_proposals == 2000
  with pytest.raises(ValueError, match="alt_opt.num_steps"):
    alt_opt.stage_config(tiny_config(alt_opt__num_steps=(2, 2)), "/run", 0)


def _params(workdir):
  params, step = restore.restore_params(workdir, parallel.make_mesh(jax.devices()[:1]))
  return jax.tree.map(np.asarray, params), step


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_four_stages_freeze_what_they_must_and_resume_by_skipping(tmp_path):
  config = tiny_config()
  workdir = str(tmp_path / "alt")
  summary = alt_opt.run(config, workdir)
  names = [s.name for s in alt_opt.STAGES]
  assert list(summary["stages"]) == names and not summary["preempted"]
  assert all(s["step"] == 2 and s["complete"] and not s["already_complete"]
             for s in summary["stages"].values())
  assert set(summary["recall"]) == {"stage1_rpn", "stage3_rpn"}
  with open(os.path.join(workdir, "alt_opt.json")) as f:
    written = json.load(f)
  assert all(s["complete"] for s in written["stages"].values())
  for stage in ("stage1_rpn", "stage3_rpn"):
    for split in ("train", "eval"):
      store = proposal_store.load(alt_opt.proposals_path(workdir, stage, split))
      assert store.boxes.shape[1:] == (16, 4) and store.meta["step"] == 2
      assert store.meta["checkpoint"] == os.path.join(workdir, stage)
  params = {name: _params(os.path.join(workdir, name))[0] for name in names}
  # Stage 1 trains the RPN and the trunk; the head keeps its initial values, bitwise.
  source = builders.source_from_config(alt_opt.stage_config(config, workdir, 1), "eval")
  model = builders.model_from_config(config, len(source.classes))
  init_key, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  initial = builders.init_params_from_config(alt_opt.stage_config(config, workdir, 0), model,
                                             init_key)
  assert _same(params["stage1_rpn"]["head"], initial["head"])
  assert not _same(params["stage1_rpn"]["rpn"], initial["rpn"])
  assert not _same(params["stage1_rpn"]["trunk"], initial["trunk"])
  # Stage 2 starts afresh (not from stage 1) and trains trunk and head, not the RPN.
  assert _same(params["stage2_fast_rcnn"]["rpn"], initial["rpn"])
  assert not _same(params["stage2_fast_rcnn"]["head"], initial["head"])
  # Stages 3 and 4: the shared convs are stage 2's, bitwise; each trains only its own part.
  for name in ("stage3_rpn", "stage4_fast_rcnn"):
    assert _same(params[name]["trunk"], params["stage2_fast_rcnn"]["trunk"])
  assert _same(params["stage3_rpn"]["head"], params["stage2_fast_rcnn"]["head"])
  assert not _same(params["stage3_rpn"]["rpn"], params["stage2_fast_rcnn"]["rpn"])
  assert _same(params["stage4_fast_rcnn"]["rpn"], params["stage3_rpn"]["rpn"])
  assert not _same(params["stage4_fast_rcnn"]["head"], params["stage3_rpn"]["head"])

  # Running the command again skips every finished stage and dumps nothing again.
  files = {p: os.stat(os.path.join(workdir, "proposals", p)).st_mtime_ns
           for p in os.listdir(os.path.join(workdir, "proposals")) if p.endswith(".npz")}
  again = alt_opt.run(config, workdir)
  assert all(s["complete"] and s["already_complete"] for s in again["stages"].values())
  assert again["recall"] == summary["recall"]
  assert files == {p: os.stat(os.path.join(workdir, "proposals", p)).st_mtime_ns
                   for p in files}
  for name in names:
    assert sorted(os.listdir(os.path.join(workdir, name, "checkpoints"))) == ["2"]

  # --evaluate_again (which a finished stage's message suggests) evaluates each stage again.
  evaluated = alt_opt.run(config, workdir, evaluate_again=True)
  assert all(s["complete"] and not s["already_complete"] and s["step"] == 2
             for s in evaluated["stages"].values())
  assert files == {p: os.stat(os.path.join(workdir, "proposals", p)).st_mtime_ns
                   for p in files}


@pytest.mark.slow
def test_four_stages_with_a_multi_level_backbone(tmp_path):
  """ResNet-FPN: per-level proposals are dumped and pooled by level; `all_frozen` keeps the
  trunk and the pyramid of stages 3 and 4 bitwise at stage 2's."""
  config = config_flags.load_config(os.path.join(ROOT, "experiments", "shapes_alt_opt.py"),
                                    {**TINY, **test_resnet_fpn.FPN_RUN,
                                     "alt_opt.num_steps": (1, 1, 1, 1)})
  workdir = str(tmp_path / "alt")
  summary = alt_opt.run(config, workdir)
  assert all(s["complete"] for s in summary["stages"].values())
  store = proposal_store.load(alt_opt.proposals_path(workdir, "stage3_rpn", "train"))
  assert store.boxes.shape[1:] == (16, 4)
  params = {s.name: _params(os.path.join(workdir, s.name))[0] for s in alt_opt.STAGES}
  assert "fpn" in params["stage2_fast_rcnn"]["trunk"]
  for name in ("stage3_rpn", "stage4_fast_rcnn"):
    assert _same(params[name]["trunk"], params["stage2_fast_rcnn"]["trunk"])
  assert not _same(params["stage3_rpn"]["rpn"], params["stage2_fast_rcnn"]["rpn"])
  assert not _same(params["stage4_fast_rcnn"]["head"], params["stage3_rpn"]["head"])


def test_the_command_takes_evaluate_again():
  proc = subprocess.run([sys.executable, "-m", "frcnn_jax.alt_opt", "--help"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "--evaluate_again" in proc.stdout, proc.stderr[-2000:]
