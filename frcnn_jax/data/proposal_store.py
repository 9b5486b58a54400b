"""Precomputed RPN proposals as a dataset of their own: dump, read, recall, train a head on them.

The paper's 4-step alternating training (`frcnn_jax.alt_opt`) trains Fast R-CNN on proposals
an earlier RPN stage computed for the whole training set, as py-faster-rcnn's
`rpn/generate.py` does; the same files serve ablations (proposal recall of any checkpoint,
a head trained on any stored proposals).

File: one `.npz` per split and stage, static shapes, N records of the source in index order:
  "boxes" float32 [N, R, 4] xyxy in original-image pixels (clipped to the image),
  "scores" float32 [N, R] the RPN's ranking score, descending (0 where invalid),
  "valid" bool [N, R], "names" str [N] (the source's record names, checked on reading),
  "orig_hw" int32 [N, 2], and metadata "num_proposals" (R), "pre_nms_top_n", "checkpoint",
  "step". Records the pipeline could not read have no valid proposal.

The command `python -m frcnn_jax.dump_proposals` dumps a run's proposals and prints recall.
"""

import dataclasses
import functools
import json
import logging
import os
import struct
import zipfile
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from frcnn_jax.detection import detector
from frcnn_jax.evaluation import voc as voc_eval
from frcnn_jax.ops import images as image_ops
from frcnn_jax.runtime import atomic_io
from frcnn_jax.runtime import parallel

RECALL_TOP_NS = (300, 1000, 2000)
RECALL_IOUS = (0.5, 0.7)
_ID_KEYS = ("image_id", "orig_hw", "valid")


@dataclasses.dataclass
class ProposalSet:
  """The proposals of every record of a source (see the module docstring for the fields).

  Attributes:
    boxes: float32 [N, R, 4] original-image pixels.
    scores: float32 [N, R].
    valid: bool [N, R].
    names: str [N] record names.
    orig_hw: int32 [N, 2].
    meta: {"num_proposals", "pre_nms_top_n", "checkpoint", "step"}.
    mapped_from: the file that boxes, scores and valid are read-only memory maps of (`load`);
      None for arrays in memory.
  """
  boxes: np.ndarray
  scores: np.ndarray
  valid: np.ndarray
  names: np.ndarray
  orig_hw: np.ndarray
  meta: dict[str, Any]
  mapped_from: "_MappedFile | None" = None

  def __len__(self) -> int:
    return len(self.boxes)

  def __reduce__(self):
    """A set mapped from its file pickles as that file's identity: spawned data workers map the
    same pages instead of receiving a copy each (GBs for COCO-sized sets)."""
    if self.mapped_from is None:
      return super().__reduce__()
    return _reopen, (self.mapped_from,)

  @property
  def num_proposals(self) -> int:
    return int(self.boxes.shape[1])


def save(path: str | os.PathLike[str], proposals: ProposalSet) -> None:
  """Writes a ProposalSet to `path` (.npz) atomically: readers never see a partial file."""
  with atomic_io.replacing(path, "wb") as f:
    np.savez(f, boxes=proposals.boxes.astype(np.float32),
             scores=proposals.scores.astype(np.float32), valid=proposals.valid.astype(bool),
             names=np.asarray(proposals.names, str), orig_hw=proposals.orig_hw.astype(np.int32),
             meta=np.asarray(json.dumps(proposals.meta)))


@dataclasses.dataclass(frozen=True)
class _MappedFile:
  """Which file a set was mapped from: the path and what identifies its contents."""
  path: str
  inode: int
  size: int
  mtime_ns: int

  @classmethod
  def of(cls, path: str | os.PathLike[str], f: Any) -> "_MappedFile":
    """The identity of `path`, opened as the binary file `f`."""
    stat = os.fstat(f.fileno())
    return cls(os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _reopen(mapped: _MappedFile) -> ProposalSet:
  """`load` in another process, refusing a file replaced since the first `load`."""
  try:
    proposals = load(mapped.path)
  except FileNotFoundError:
    proposals = None
  if proposals is None or proposals.mapped_from != mapped:
    raise ValueError(f"the proposal file {mapped.path} was replaced or removed while the run "
                     "was reading it; start the run again")
  return proposals


def _mapped_members(f: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
  """Read-only memory maps of the .npz members `names` that are stored uncompressed.

  `np.savez` stores each array as an uncompressed .npy member, so its data is a contiguous
  byte range of the file; compressed members (`np.savez_compressed`) are left out.

  Args:
    f: the .npz file, open for binary reading (the maps outlive it).
  """
  out = {}
  with zipfile.ZipFile(f) as archive:
    for info in archive.infolist():
      name = info.filename.removesuffix(".npy")
      if name not in names or info.compress_type != zipfile.ZIP_STORED:
        continue
      f.seek(info.header_offset)
      local = f.read(30)   # the member's local header: its name and extra field follow
      if local[:4] != b"PK\x03\x04":
        continue
      name_length, extra_length = struct.unpack("<HH", local[26:30])
      f.seek(info.header_offset + 30 + name_length + extra_length)
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        continue
      if dtype.hasobject:
        continue
      out[name] = np.memmap(f, dtype=dtype, mode="r", offset=f.tell(), shape=shape,
                            order="F" if fortran else "C")
  return out


def load(path: str | os.PathLike[str]) -> ProposalSet:
  """Reads a file written by `save`, mapping the large arrays instead of reading them.

  boxes, scores and valid are read-only memory maps of the file (read into memory instead
  when the file was written compressed), so the data workers that receive the set share the
  file's pages.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file lacks a field or its shapes disagree.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no proposal file {path} (python -m frcnn_jax.dump_proposals "
                            "--config ... --workdir ... --output FILE writes one)")
  with open(path, "rb") as f, np.load(f) as data:   # one descriptor: one version of the file
    missing = {"boxes", "scores", "valid", "names", "orig_hw", "meta"} - set(data.files)
    if missing:
      raise ValueError(f"{path} is not a proposal file: no {sorted(missing)}")
    large, mapped_from = _mapped_members(f, ("boxes", "scores", "valid")), _MappedFile.of(path, f)
    if len(large) < 3:
      large, mapped_from = {name: data[name] for name in ("boxes", "scores", "valid")}, None
    out = ProposalSet(**large, names=data["names"], orig_hw=data["orig_hw"],
                      meta=json.loads(str(data["meta"])), mapped_from=mapped_from)
  n, r = out.boxes.shape[:2]
  if (out.boxes.shape != (n, r, 4) or out.scores.shape != (n, r) or out.valid.shape != (n, r)
      or out.names.shape != (n,) or out.orig_hw.shape != (n, 2)):
    raise ValueError(f"{path}: inconsistent shapes boxes {out.boxes.shape}, scores "
                     f"{out.scores.shape}, valid {out.valid.shape}, names {out.names.shape}, "
                     f"orig_hw {out.orig_hw.shape}")
  return out


def dump_settings(settings: detector.DetectorSettings, num_proposals: int,
                  pre_nms_top_n: int) -> detector.DetectorSettings:
  """The test-time settings that generate the stored proposals.

  py-faster-rcnn's alt-opt `rpn_generate` sets RPN_PRE_NMS_TOP_N = -1 (every anchor enters
  NMS) and RPN_POST_NMS_TOP_N = 2000.

  Args:
    settings: the run's settings (NMS threshold, min size, anchors).
    num_proposals: R kept after NMS.
    pre_nms_top_n: boxes entering NMS; <= 0: every anchor.
  """
  if num_proposals < 1:
    raise ValueError(f"num_proposals must be >= 1, got {num_proposals}")
  rpn = dataclasses.replace(settings.rpn, post_nms_top_n_test=int(num_proposals),
                            pre_nms_top_n_test=int(pre_nms_top_n) if pre_nms_top_n > 0
                            else 2**31 - 1)
  return dataclasses.replace(settings, rpn=rpn, loss_mode="joint")   # one program per stage


@functools.lru_cache(maxsize=8)
def _gathered_proposals(model, settings: detector.DetectorSettings, mesh: jax.sharding.Mesh):
  """jit(proposals + the batch's ids), outputs replicated on every device (the gather)."""

  def step(params, batch):
    out = detector.proposals(params, batch, model=model, settings=settings)
    return out, {k: batch[k] for k in _ID_KEYS}

  return jax.jit(step, out_shardings=parallel.replicated(mesh))


def dump(params: Any, batches: Iterable[Mapping[str, Any]], *, source, model,
         settings: detector.DetectorSettings, mesh: jax.sharding.Mesh, num_proposals: int,
         pre_nms_top_n: int, meta: Mapping[str, Any] | None = None) -> ProposalSet:
  """Runs the RPN over one pass of `batches` and collects every record's proposals.

  Args:
    params: network parameters (replicated on `mesh`, or host arrays).
    batches: eval Batches of `source` (each record once, no flip): this process's numpy
      slices or global arrays.
    source: the dataset source; "image_id" of a batch example is its index in `source`.
    model: the network (static).
    settings: detector settings; the dump uses `dump_settings(settings, num_proposals,
      pre_nms_top_n)`.
    mesh: the data mesh.
    num_proposals: R per image.
    pre_nms_top_n: boxes entering NMS (<= 0: all anchors).
    meta: extra metadata stored with the file (checkpoint, step).

  Returns:
    A ProposalSet of len(source) records (records never seen have no valid proposal).

  Raises:
    ValueError: an image id appears twice, or a size disagrees with the source's annotation.
  """
  step = _gathered_proposals(model, dump_settings(settings, num_proposals, pre_nms_top_n),
                             mesh)
  n = len(source)
  boxes = np.zeros((n, num_proposals, 4), np.float32)
  scores = np.zeros((n, num_proposals), np.float32)
  valid = np.zeros((n, num_proposals), bool)
  seen = np.zeros((n,), bool)
  names = np.array([str(source.annotation(i)["name"]) for i in range(n)])
  orig_hw = np.stack([source.annotation(i)["orig_hw"] for i in range(n)]).astype(np.int32) \
      if n else np.zeros((0, 2), np.int32)

  def record(outputs) -> None:
    out, ids = jax.device_get(outputs)
    for b in np.flatnonzero(ids["valid"]):
      i = int(ids["image_id"][b])
      if seen[i]:
        raise ValueError(f"image id {i} appears twice in the batches")
      if not np.array_equal(orig_hw[i], ids["orig_hw"][b]):
        raise ValueError(f"image id {i} ({names[i]}) is {ids['orig_hw'][b].tolist()} (HxW) in "
                         f"the batches but {orig_hw[i].tolist()} in the source")
      seen[i] = True
      keep = np.asarray(out["valid"][b], bool)
      h, w = orig_hw[i]
      clipped = np.clip(out["boxes"][b], 0.0, np.array([w, h, w, h], np.float32))
      boxes[i] = np.where(keep[:, None], clipped, 0.0)
      scores[i] = np.where(keep, out["scores"][b], 0.0)
      valid[i] = keep

  pending = None
  for batch in batches:
    batch = {k: batch[k] for k in image_ops.input_keys(batch) + _ID_KEYS}
    if not all(isinstance(v, jax.Array) for v in batch.values()):
      batch = parallel.host_batch_to_global(batch, mesh)
    outputs = step(params, batch)
    if pending is not None:
      record(pending)
    pending = outputs
  if pending is not None:
    record(pending)
  if not seen.all():
    logging.warning("%d of %d records were not readable and have no proposals",
                    int((~seen).sum()), n)
  info = {"num_proposals": int(num_proposals), "pre_nms_top_n": int(pre_nms_top_n),
          **dict(meta or {})}
  return ProposalSet(boxes=boxes, scores=scores, valid=valid, names=names, orig_hw=orig_hw,
                     meta=info)


def recall(proposals: ProposalSet, source, *, top_ns: Sequence[int] = RECALL_TOP_NS,
           iou_thresholds: Sequence[float] = RECALL_IOUS) -> dict[str, Any]:
  """Proposal recall: the fraction of ground-truth objects covered by a top-N proposal.

  An object (not difficult; `source.annotation(i)`) is recalled at (N, t) when one of the
  image's first N valid proposals (by descending score) has IoU >= t with it.

  Args:
    proposals: one entry per record of `source` (names must match).
    source: the dataset source.
    top_ns: the N's (a file with fewer proposals per image uses all it has).
    iou_thresholds: the t's.

  Returns:
    {"recall": {"top300_iou0.5": float, ...}, "num_objects": int, "num_images": int,
     "mean_proposals": mean valid proposals per image}.

  Raises:
    ValueError: the file does not belong to `source` (length or names differ).
  """
  check_matches(proposals, source)
  best = {n: [] for n in top_ns}
  num_valid = []
  for i in range(len(proposals)):
    ann = source.annotation(i)
    gt = np.asarray(ann["boxes"], np.float32).reshape(-1, 4)[~np.asarray(ann["difficult"], bool)]
    boxes = proposals.boxes[i][proposals.valid[i]]   # stored by descending score
    num_valid.append(len(boxes))
    iou = (voc_eval.pairwise_iou(gt.astype(np.float64), boxes.astype(np.float64))
           if len(boxes) else np.zeros((len(gt), 0)))
    for n in top_ns:
      best[n].append(iou[:, :n].max(axis=1) if iou.shape[1] else np.zeros(len(gt)))
  table = {}
  for n in top_ns:
    overlaps = np.concatenate(best[n]) if best[n] else np.zeros(0)
    for t in iou_thresholds:
      table[f"top{n}_iou{t:g}"] = float((overlaps >= t).mean()) if overlaps.size else 0.0
  num_objects = int(sum(len(b) for b in best[top_ns[0]])) if top_ns else 0
  return {"recall": table, "num_objects": num_objects, "num_images": len(proposals),
          "mean_proposals": float(np.mean(num_valid)) if num_valid else 0.0}


def check_matches(proposals: ProposalSet, source) -> None:
  """Raises ValueError unless `proposals` has one entry per record of `source`, same names."""
  if len(proposals) != len(source):
    raise ValueError(f"the proposal file has {len(proposals)} records but the source "
                     f"{getattr(source, 'name', '')} has {len(source)}: it was dumped for "
                     "another split or dataset")
  for i in range(len(source)):
    name = str(source.annotation(i)["name"])
    if name != str(proposals.names[i]):
      raise ValueError(f"record {i} is {name!r} in the source but "
                       f"{str(proposals.names[i])!r} in the proposal file: it was dumped for "
                       "another split or dataset")


class WithProposals:
  """A source whose Examples carry stored proposals: "proposals" [R, 4], "proposals_valid" [R].

  The pipeline's transforms resize, flip and pad them exactly like the ground truth
  (`transforms.proposal_fields`); `detector.loss_fn` with loss_mode "head" trains on them.

  Attributes:
    source: the wrapped source.
    proposals: the ProposalSet (one entry per record, names checked).
    num_proposals: R, the first R stored proposals of each image (the best R).
    classes, name, bad_input_log: those of `source`.
  """

  def __init__(self, source, proposals: ProposalSet, num_proposals: int):
    """Raises ValueError: the set does not match the source, or R is not in [1, stored R]."""
    check_matches(proposals, source)
    if not 1 <= num_proposals <= proposals.num_proposals:
      raise ValueError(f"data.num_proposals={num_proposals} must be in [1, "
                       f"{proposals.num_proposals}] (the proposals stored per image)")
    self.source = source
    self.proposals = proposals
    self.num_proposals = int(num_proposals)
    self.classes = source.classes
    self.name = source.name
    self.bad_input_log = getattr(source, "bad_input_log", None)

  def __len__(self) -> int:
    return len(self.source)

  def annotation(self, index: int) -> dict[str, Any]:
    return self.source.annotation(index)

  def __getitem__(self, index: int) -> dict[str, Any] | None:
    example = self.source[index]
    if example is None:
      return None
    r = self.num_proposals
    return {**example, "proposals": self.proposals.boxes[index, :r],
            "proposals_valid": self.proposals.valid[index, :r]}

  def __repr__(self) -> str:
    return f"WithProposals({self.source!r}, R={self.num_proposals})"
