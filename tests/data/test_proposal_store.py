"""Tests of stored proposals (frcnn_jax/data/proposal_store.py, dump_proposals.py), the transforms
that carry them, the RPN-only / head-only losses and the per-part trainable mask."""

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax import dump_proposals
from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.data import proposal_store
from frcnn_jax.data import transforms
from frcnn_jax.detection import detector
from frcnn_jax.models import faster_rcnn
from frcnn_jax.runtime import parallel
from tests.evaluation.tiny_run import STEP
from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = os.path.join(ROOT, "experiments", "shapes.py")
TINY = {
    "data.shapes.num_train": 6, "data.shapes.num_test": 5, "data.shapes.image_size": 64,
    "data.min_size": 64, "data.max_size": 64, "data.pad_hw": (64, 64), "data.max_gt": 8,
    "data.num_workers": 0, "data.prefetch": 1, "data.flip": False,
    "model.vgg16.width": 0.125, "model.vgg16.convs_per_block": (1, 1, 1, 1, 1), "model.fc.dim": 32,
    "anchors.sizes": (16, 32), "anchors.ratios": (1.0,),
    "rpn.pre_nms_top_n_train": 64, "rpn.post_nms_top_n_train": 16,
    "rpn.pre_nms_top_n_test": 64, "rpn.post_nms_top_n_test": 8, "rpn.batch_size_per_image": 32,
    "roi.batch_size_per_image": 16, "train.batch_size": 2, "eval.batch_size": 2,
    "train.compilation_cache_dir": "",
}


def tiny_config(**overrides):
  return config_flags.load_config(SHAPES, {**TINY, **{k.replace("__", "."): v
                                                      for k, v in overrides.items()}})


class FakeSource:
  """A source of annotations only (recall and WithProposals read nothing else)."""

  def __init__(self, anns):
    self.anns = anns
    self.classes = ("a",)
    self.name = "fake"

  def __len__(self):
    return len(self.anns)

  def annotation(self, i):
    return self.anns[i]

  def __getitem__(self, i):
    return {"image": np.zeros((*self.anns[i]["orig_hw"], 3), np.uint8), **self.anns[i],
            "image_id": np.int64(i)}


def _ann(boxes, difficult, name, hw=(100, 100)):
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  return {"boxes": boxes, "labels": np.ones(len(boxes), np.int32),
          "difficult": np.asarray(difficult, bool), "name": name,
          "orig_hw": np.asarray(hw, np.int32)}


def _set(boxes, valid, names, hw=(100, 100)):
  boxes = np.asarray(boxes, np.float32)
  n, r = boxes.shape[:2]
  scores = np.tile(np.linspace(1, 0, r, dtype=np.float32), (n, 1))
  return proposal_store.ProposalSet(boxes=boxes, scores=scores, valid=np.asarray(valid, bool),
                                    names=np.array(names), orig_hw=np.tile(hw, (n, 1)),
                                    meta={"num_proposals": r})


def test_recall_golden_case():
  # Object A (0,0,10,10): proposal 0 IoU 0.5, proposal 2 IoU 1 (rank 3). Object B is difficult
  # (excluded). Object C (50,50,60,60): proposal 1 IoU 0.81 (9x9 inside). An invalid
  # proposal equal to C does not count.
  anns = [_ann([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [False, True, False], "x")]
  props = [[[0, 0, 5, 10], [50, 50, 59, 59], [0, 0, 10, 10], [50, 50, 60, 60]]]
  store = _set(props, [[True, True, True, False]], ["x"])
  out = proposal_store.recall(store, FakeSource(anns), top_ns=(1, 2, 3), iou_thresholds=(0.5, 0.7,
                                                                                        0.9))
  r = out["recall"]
  assert out["num_objects"] == 2 and out["num_images"] == 1 and out["mean_proposals"] == 3
  assert r["top1_iou0.5"] == 0.5 and r["top1_iou0.7"] == 0.0
  assert r["top2_iou0.5"] == 1.0 and r["top2_iou0.7"] == 0.5 and r["top2_iou0.9"] == 0.0
  assert r["top3_iou0.9"] == 0.5


def _reference_recall(boxes, valid, anns, n, t):
  covered = total = 0
  for i, ann in enumerate(anns):
    kept = [b for b, v in zip(boxes[i], valid[i]) if v][:n]
    for g, d in zip(ann["boxes"], ann["difficult"]):
      if d:
        continue
      total += 1
      best = 0.0
      for p in kept:
        iw = max(min(g[2], p[2]) - max(g[0], p[0]), 0.0)
        ih = max(min(g[3], p[3]) - max(g[1], p[1]), 0.0)
        union = (g[2] - g[0]) * (g[3] - g[1]) + (p[2] - p[0]) * (p[3] - p[1]) - iw * ih
        best = max(best, iw * ih / union if union > 0 else 0.0)
      covered += best >= t
  return covered / total


def test_recall_matches_a_loop_reference_on_random_sets():
  rng = np.random.default_rng(0)

  def boxes(k):
    xy = rng.uniform(0, 80, (k, 2))
    return np.concatenate([xy, xy + rng.uniform(2, 30, (k, 2))], 1).astype(np.float32)

  anns = [_ann(boxes(g), rng.random(g) < 0.2, f"im{i}")
          for i, g in enumerate(rng.integers(1, 6, 7))]
  props = np.stack([boxes(40) for _ in anns])
  valid = rng.random((len(anns), 40)) < 0.8
  store = _set(props, valid, [a["name"] for a in anns])
  out = proposal_store.recall(store, FakeSource(anns), top_ns=(5, 20, 40),
                              iou_thresholds=(0.3, 0.5, 0.7))
  for n in (5, 20, 40):
    for t in (0.3, 0.5, 0.7):
      assert out["recall"][f"top{n}_iou{t:g}"] == pytest.approx(
          _reference_recall(props, valid, anns, n, t), abs=1e-12)


def test_save_load_round_trip_and_errors(tmp_path):
  store = _set(np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4),
               [[True, False, True], [True, True, True]], ["a", "b"])
  store.meta.update(step=7)
  path = str(tmp_path / "p" / "train.npz")
  proposal_store.save(path, store)
  back = proposal_store.load(path)
  for field in ("boxes", "scores", "valid", "names", "orig_hw"):
    np.testing.assert_array_equal(getattr(back, field), getattr(store, field))
  assert back.meta == {"num_proposals": 3, "step": 7} and os.listdir(tmp_path / "p") == [
      "train.npz"]
  with pytest.raises(FileNotFoundError, match="dump_proposals"):
    proposal_store.load(str(tmp_path / "missing.npz"))
  np.savez(tmp_path / "bad.npz", boxes=np.zeros((2, 3, 4)))
  with pytest.raises(ValueError, match="not a proposal file"):
    proposal_store.load(str(tmp_path / "bad.npz"))


def test_loaded_sets_map_the_file_and_pickle_as_it(tmp_path):
  rng = np.random.default_rng(0)
  store = _set(rng.random((40, 500, 4), np.float32) * 100, rng.random((40, 500)) > 0.2,
               [f"im{i}" for i in range(40)])
  path = str(tmp_path / "train.npz")
  proposal_store.save(path, store)
  back = proposal_store.load(path)
  assert all(isinstance(getattr(back, f), np.memmap) for f in ("boxes", "scores", "valid"))
  assert not back.boxes.flags.writeable
  wrapped = proposal_store.WithProposals(FakeSource([_ann([[0, 0, 9, 9]], [False], f"im{i}")
                                                     for i in range(40)]), back, 300)
  sent = pickle.dumps(wrapped)   # what a spawned data worker receives
  assert len(sent) < 20_000 < store.boxes.nbytes
  received = pickle.loads(sent)
  for i in (0, 17, 39):
    for key in ("proposals", "proposals_valid"):
      np.testing.assert_array_equal(received[i][key], wrapped[i][key])
    np.testing.assert_array_equal(received[i]["proposals"], store.boxes[i, :300])
  # A file replaced after loading is refused in the worker, not read as the old proposals.
  proposal_store.save(path, _set(store.boxes + 1, store.valid, store.names))
  with pytest.raises(ValueError, match="replaced or removed while the run"):
    pickle.loads(sent)
  # A compressed file (np.savez_compressed) is read into memory and pickles whole.
  compressed = str(tmp_path / "compressed.npz")
  np.savez_compressed(compressed, boxes=store.boxes, scores=store.scores, valid=store.valid,
                      names=store.names, orig_hw=store.orig_hw, meta=np.asarray("{}"))
  back = proposal_store.load(compressed)
  assert back.mapped_from is None and not isinstance(back.boxes, np.memmap)
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(back)).boxes, store.boxes)


def test_spawned_workers_read_the_mapped_proposals(tmp_path, tiny):
  config, _, _, _, params = tiny
  path = str(tmp_path / "train.npz")
  mesh = parallel.make_mesh(jax.devices()[:1])
  proposal_store.save(path, dump_proposals.dump_for_config(
      config, params, "train", num_proposals=12, pre_nms_top_n=-1, mesh=mesh, meta={}))
  batches = []
  for workers in (0, 1):
    head = tiny_config(train__loss_mode="head", data__proposals=path, data__num_proposals=10,
                       data__num_workers=workers)
    source = builders.source_from_config(head, "train")
    assert isinstance(source.proposals.boxes, np.memmap)
    data = builders.train_data_from_config(head, source, mesh)
    batches.append(jax.device_get([next(data) for _ in range(3)]))
    data.close()
  for ours, theirs in zip(*batches):
    assert ours["proposals_valid"].any()
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def test_with_proposals_checks_the_source_and_adds_fields():
  anns = [_ann([[0, 0, 10, 10]], [False], "a"), _ann([[5, 5, 9, 9]], [False], "b")]
  store = _set(np.ones((2, 4, 4)) * [0, 0, 8, 8], np.ones((2, 4), bool), ["a", "b"])
  wrapped = proposal_store.WithProposals(FakeSource(anns), store, 3)
  example = wrapped[1]
  assert example["proposals"].shape == (3, 4) and example["proposals_valid"].shape == (3,)
  assert wrapped.annotation(1)["name"] == "b" and len(wrapped) == 2
  with pytest.raises(ValueError, match="data.num_proposals=5"):
    proposal_store.WithProposals(FakeSource(anns), store, 5)
  with pytest.raises(ValueError, match="'b' in the source but 'c'"):
    proposal_store.WithProposals(FakeSource(anns), _set(store.boxes, store.valid, ["a", "c"]), 2)
  with pytest.raises(ValueError, match="another split"):
    proposal_store.WithProposals(FakeSource(anns[:1]), store, 2)


@pytest.mark.parametrize("flip", [False, True])
def test_prepare_transforms_proposals_exactly_like_ground_truth(flip):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 255, (90, 120, 3), np.uint8)
  gt = np.array([[10, 20, 50, 70], [60, 5, 119.5, 89]], np.float32)
  props = np.concatenate([gt, [[0, 0, 0.2, 50], [30, 30, 40, 40]]]).astype(np.float32)
  example = {"image": image, **_ann(gt, [False, False], "x", (90, 120)), "image_id": 3,
             "proposals": props, "proposals_valid": np.array([True, True, True, False])}
  fields, _ = transforms.prepare(example, min_size=60, max_size=100, pad_hw=(96, 128),
                                 max_gt=4, training=True, flip=flip)
  np.testing.assert_array_equal(fields["proposals"][:2], fields["gt_boxes"][:2])
  # 0.2 px wide scales to 0.1 px: kept (positive width); the stored-invalid one stays invalid.
  np.testing.assert_array_equal(fields["proposals_valid"], [True, True, True, False])
  np.testing.assert_array_equal(fields["proposals"][3], 0.0)
  # A proposal left with no width after clipping is masked, never removed.
  out = transforms.proposal_fields(np.array([[130, 0, 140, 10]], np.float32), np.array([True]),
                                   1.0, (90, 120), flip)
  assert out["proposals"].shape == (1, 4) and not out["proposals_valid"][0]


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config()
  source = builders.source_from_config(config, "eval")
  model = builders.model_from_config(config, len(source.classes))
  settings = builders.detector_settings_from_config(config)
  params = faster_rcnn.init_params(model, jax.random.key(0))
  return config, source, model, settings, params


def test_dump_equals_the_rpn_proposals_in_original_pixels(tiny):
  config, source, model, settings, params = tiny
  mesh = parallel.make_mesh(jax.devices()[:1])
  store = dump_proposals.dump_for_config(config, params, "eval", num_proposals=12,
                                         pre_nms_top_n=-1, mesh=mesh, meta={"step": 0})
  assert store.boxes.shape == (5, 12, 4) and store.meta["pre_nms_top_n"] == -1
  assert [str(n) for n in store.names] == [source.annotation(i)["name"] for i in range(5)]
  expected_settings = proposal_store.dump_settings(settings, 12, -1)
  assert expected_settings.rpn.pre_nms_top_n_test >= 8 * 8 * 2   # every anchor enters NMS
  batches = builders.eval_data_from_config(config, source)
  for batch in batches:
    out = jax.device_get(detector.proposals(
        params, {k: jnp.asarray(batch[k]) for k in ("image", "image_hw", "scale", "valid")},
        model=model, settings=expected_settings))
    for b in np.flatnonzero(batch["valid"]):
      i = int(batch["image_id"][b])
      keep = out["valid"][b]
      np.testing.assert_array_equal(store.valid[i], keep)
      np.testing.assert_allclose(store.boxes[i][keep],
                                 np.clip(out["boxes"][b][keep], 0, 64), rtol=0, atol=1e-5)
      assert np.all(np.diff(store.scores[i][keep]) <= 0)
  assert store.valid.any()


def test_dump_with_the_device_resizing_equals_the_host_dump(tiny):
  _, _, _, _, params = tiny
  mesh = parallel.make_mesh(jax.devices()[:1])
  stores = {}
  for where in ("host", "device"):
    config = tiny_config(data__min_size=96, data__max_size=96, data__pad_hw=(96, 96),
                         data__resize_on=where)
    stores[where] = dump_proposals.dump_for_config(config, params, "eval", num_proposals=12,
                                                   pre_nms_top_n=-1, mesh=mesh, meta={})
  host, device = stores["host"], stores["device"]
  assert host.valid.any()
  np.testing.assert_array_equal(device.valid, host.valid)
  np.testing.assert_allclose(device.boxes, host.boxes, rtol=0, atol=1e-4)
  np.testing.assert_allclose(device.scores, host.scores, rtol=1e-5, atol=1e-6)


def test_loss_modes_train_only_their_part(tiny):
  config, source, model, settings, params = tiny
  batch = next(iter(builders.eval_data_from_config(config, source)))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  key = jax.random.key(3)
  joint = dataclasses.replace(settings, loss_mode="joint")
  # The joint loss's own training proposals, handed to the head-only loss as stored ones.
  *_, (props, _, props_valid) = detector._rpn_and_proposals(params, batch, model, joint,
                                                            train=True)
  stored = dict(batch, proposals=props, proposals_valid=props_valid)
  _, j = jax.device_get(detector.loss_fn(params, stored, key, model=model, settings=joint,
                                         train=False))
  results = {}
  for mode in ("rpn", "head"):
    s = dataclasses.replace(settings, loss_mode=mode)
    (total, terms), grads = jax.value_and_grad(
        lambda p: detector.loss_fn(p, stored, key, model=model, settings=s, train=False),
        has_aux=True)(params)
    results[mode] = (float(total), jax.device_get(terms), grads)
  r, h = results["rpn"][1], results["head"][1]
  assert results["rpn"][0] == pytest.approx(r["rpn_cls"] + r["rpn_box"], rel=1e-6)
  assert r["rpn_cls"] == j["rpn_cls"] and r["rpn_box"] == j["rpn_box"]
  assert r["det_cls"] == 0 and r["det_box"] == 0 and r["det_foreground"] == 0
  assert h["det_cls"] == j["det_cls"] and h["det_box"] == j["det_box"]
  assert h["rpn_cls"] == 0 and h["rpn_box"] == 0 and h["rpn_positives"] == 0
  norm = lambda tree: float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))
  assert norm(results["rpn"][2]["head"]) == 0 and norm(results["rpn"][2]["rpn"]) > 0
  assert norm(results["head"][2]["rpn"]) == 0 and norm(results["head"][2]["head"]) > 0
  with pytest.raises(ValueError, match="loss_mode"):
    detector.loss_fn(params, stored, key, model=model,
                     settings=dataclasses.replace(settings, loss_mode="both"))


def test_trainable_mask_by_part_and_frozen_trunk(tiny):
  _, _, model, _, params = tiny
  leaves = lambda tree: set(jax.tree.leaves(tree))
  mask = faster_rcnn.trainable_mask(model, params, ("trunk", "rpn"))
  assert leaves(mask["head"]) == {False} and leaves(mask["rpn"]) == {True}
  frozen = dataclasses.replace(model, trunk=dataclasses.replace(model.trunk, frozen_blocks=5))
  mask = faster_rcnn.trainable_mask(frozen, params, ("trunk", "head"))
  assert leaves(mask["trunk"]) == {False} and leaves(mask["rpn"]) == {False}
  assert leaves(mask["head"]) == {True}
  with pytest.raises(ValueError, match="parts"):
    faster_rcnn.trainable_mask(model, params, ("neck",))


def test_head_mode_needs_proposals_and_proposals_need_head_mode(tmp_path):
  with pytest.raises(ValueError, match="data.proposals"):
    builders.source_from_config(tiny_config(train__loss_mode="head"), "train")
  with pytest.raises(ValueError, match="data.proposals"):
    builders.source_from_config(tiny_config(data__proposals=str(tmp_path / "p.npz")), "train")
  with pytest.raises(ValueError, match="train.loss_mode"):
    builders.detector_settings_from_config(tiny_config(train__loss_mode="all"))


def test_dump_command_writes_refuses_to_overwrite_and_rereads(tiny_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run.workdir, workdir)

  def command(*args):
    return subprocess.run(
        [sys.executable, "-m", "frcnn_jax.dump_proposals", "--config",
         str(tiny_run.config_path), "--num_proposals=12", *args], capture_output=True,
        text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT, timeout=300, check=False)

  done = command(f"--workdir={workdir}", f"--step={STEP}")
  assert done.returncode == 0, done.stderr[-3000:]
  path = workdir / "proposals" / f"eval-{STEP}.npz"
  dumped = json.loads(done.stdout.splitlines()[-1])
  assert dumped["proposals"] == str(path) and "recall@0.5" in done.stdout
  assert json.loads(path.with_name(f"eval-{STEP}-recall.json").read_text()) == dumped
  store = proposal_store.load(path)
  assert store.boxes.shape == (len(tiny_run.source), 12, 4) and store.meta["step"] == STEP
  before = path.read_bytes()
  again = command(f"--workdir={workdir}")
  assert again.returncode == 1 and f"{path} exists" in again.stderr
  assert "--overwrite" in again.stderr and path.read_bytes() == before
  missing = command(f"--workdir={workdir}", "--step=7")
  assert missing.returncode == 1 and "no checkpoint for step 7" in missing.stderr
  reread = command(f"--proposals={path}")
  assert reread.returncode == 0, reread.stderr[-3000:]
  assert json.loads(reread.stdout.splitlines()[-1]) == dumped
