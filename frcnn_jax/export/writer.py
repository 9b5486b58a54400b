r"""Exports the inference function with its parameters (jax.export, StableHLO) to one file.

Usage:

  python -m frcnn_jax.export --workdir runs/voc07 --output model.bin [--step N] \
      [--batch_size 1] [--platforms cpu,cuda] [--canvases 608x800,800x608] \
      [--config.test.score_threshold=0.3 ...]

The run's config (WORKDIR/config.json) is used; test-time keys may be overridden (recorded in
the file's description, see frcnn_jax/config/run.py). An existing --output is kept unless
--overwrite.

The file is a NumPy .npz archive holding one serialised `jax.export.Exported` program per
canvas (the config's `data.pad_hw` / `data.canvases`, or `data.num_canvases` canvases chosen
for common photo shapes (`builders.GENERIC_ASPECTS`), or `--canvases 608x800,800x608`) for a
fixed batch size, the parameter arrays they share (inputs of the programs, not constants baked
into them) and a JSON description (canvases, resize rule, class names). Each program is the
input pipeline's device-resize path (`data.resize_on=device`) followed by `detector.predict`:
it takes the decoded images unresized at the top-left of a zero *source canvas* whose size is
symbolic (any Hs x Ws; each size the caller uses compiles once), with their true sizes, resized
sizes and factors, and resizes them onto its canvas with `frcnn_jax.ops.images.batch_images`.
`load(path)` (frcnn_jax/export/loader.py, a file that imports only JAX and NumPy and can be
copied alone) needs no model code and no resampling code:

  from frcnn_jax.export import loader
  model = loader.load("model.bin")
  out = model.detect(image)               # one uint8 [h, w, 3] RGB image of any size
  out = model(**model.prepare(image))     # the program's inputs, all detection slots

`detect(image)` runs the program of the smallest canvas that holds the resized image (one that
fits none is scaled down onto the canvas where it shrinks least) and returns the valid
detections {"boxes" [K, 4] original pixels, "scores", "labels" (1..C)}.
"""

import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from frcnn_jax.config import build as builders
from frcnn_jax.config import flags as config_flags
from frcnn_jax.config import run as run_config
from frcnn_jax.export import loader
from frcnn_jax.runtime import atomic_io
from frcnn_jax.runtime import parallel
from frcnn_jax.training import restore


def export_predict(params: Any, *, model, settings, height: int, width: int,
                   batch_size: int = 1, platforms: Sequence[str] | None = None
                   ) -> tuple[jax.export.Exported, list[np.ndarray]]:
  """Exports the device resize and `detector.predict` for the canvas [height, width].

  The program's batch is the input pipeline's with `data.resize_on=device`
  (`frcnn_jax.ops.images.SOURCE_KEYS`, never flipped): the images are resized onto the canvas
  inside it, from a source canvas of symbolic size.

  Args:
    params: network parameters.
    model: the network.
    settings: detector settings.
    height: canvas height (the pipeline's pad_hw[0]).
    width: canvas width.
    batch_size: images per call.
    platforms: lowering platforms, e.g. ("cpu", "cuda"); default: the current backend.

  Returns:
    (exported, param_leaves): the program takes (param_leaves, source_image uint8
    [batch_size, Hs, Ws, 3] (any Hs, Ws), source_hw int32 [batch_size, 2], image_hw int32
    [batch_size, 2] (the resized sizes, at most the canvas), scale float32 [batch_size]).
  """
  from frcnn_jax.detection import detector  # pylint: disable=g-import-not-at-top  # `load` needs no model

  leaves, treedef = jax.tree.flatten(params)

  def infer(param_leaves, source_image, source_hw, image_hw, scale):
    batch = {"source_image": source_image, "source_hw": source_hw, "image_hw": image_hw,
             "scale": scale, "flip": jnp.zeros((batch_size,), bool),
             "canvas": jnp.zeros((batch_size, height, width, 0), jnp.uint8)}
    return detector.predict(jax.tree.unflatten(treedef, param_leaves), batch, model=model,
                            settings=settings)

  source_h, source_w = jax.export.symbolic_shape("source_h, source_w")
  specs = ([jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves],
           jax.ShapeDtypeStruct((batch_size, source_h, source_w, 3), np.uint8),
           jax.ShapeDtypeStruct((batch_size, 2), np.int32),
           jax.ShapeDtypeStruct((batch_size, 2), np.int32),
           jax.ShapeDtypeStruct((batch_size,), np.float32))
  exported = jax.export.export(jax.jit(infer), platforms=platforms)(*specs)
  return exported, [np.asarray(jax.device_get(x)) for x in leaves]


def export_canvases(params: Any, canvases: Sequence[Sequence[int]], *, model, settings,
                    batch_size: int = 1, platforms: Sequence[str] | None = None
                    ) -> tuple[list[jax.export.Exported], list[np.ndarray]]:
  """`export_predict` for each canvas (h, w): (programs in canvas order, parameter leaves)."""
  programs, leaves = [], []
  for height, width in canvases:
    exported, leaves = export_predict(params, model=model, settings=settings,
                                      height=int(height), width=int(width),
                                      batch_size=batch_size, platforms=platforms)
    programs.append(exported)
  return programs, leaves


def parse_canvases(values: Sequence[str]) -> tuple[tuple[int, int], ...]:
  """["600x800", "800x600"] -> ((600, 800), (800, 600)).

  Raises:
    ValueError: an item not of the form HxW with positive integers.
  """
  out = []
  for value in values:
    try:
      h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
      raise ValueError(f"--canvases items must be HxW (e.g. 608x800), got {value!r}") from None
    if h <= 0 or w <= 0:
      raise ValueError(f"--canvases items must be positive, got {value!r}")
    out.append((h, w))
  return tuple(out)


def save(path: str | os.PathLike, exported: Sequence[jax.export.Exported],
         param_leaves: Sequence[np.ndarray], meta: dict[str, Any]) -> None:
  """Writes the programs (one per canvas of `meta["canvases"]`, in that order), their shared
  parameters and `meta` (JSON-able) to one .npz file."""
  if len(exported) != len(meta["canvases"]):
    raise ValueError(f"{len(exported)} programs for {len(meta['canvases'])} canvases")
  arrays = {f"param_{i:05d}": np.asarray(x) for i, x in enumerate(param_leaves)}
  for i, program in enumerate(exported):
    arrays[f"program_{i:03d}"] = np.frombuffer(bytes(program.serialize()), np.uint8)
  arrays["meta"] = np.frombuffer(json.dumps({"format": loader.FORMAT, **meta}).encode(), np.uint8)
  with atomic_io.replacing(path, "wb") as f:
    np.savez(f, **arrays)


def define_flags() -> None:
  """Defines the command's flags."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Training run directory (reads checkpoints/ and "
                      "config.json).")
  flags.DEFINE_string("output", None, "File to write, e.g. model.bin (its folder is created).")
  flags.DEFINE_integer("step", -1, "Checkpoint step; -1: the newest.")
  flags.DEFINE_integer("batch_size", 1, "Images per call of the exported program.")
  flags.DEFINE_list("platforms", [], "Platforms to lower for (cpu, cuda, rocm, tpu); default: "
                    "the current backend.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --output file.")
  flags.DEFINE_list("canvases", [], "Canvases HxW to export a program for (e.g. "
                    "608x800,800x608); default: the config's data.pad_hw / data.canvases, else "
                    "data.num_canvases chosen for common photo shapes.")


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for name in ("workdir", "output"):
    if f[name].value is None:
      raise app.UsageError(f"--{name} is required")
  if os.path.exists(f.output) and not f.overwrite:
    sys.exit(f"error: {f.output} exists: choose another --output, or pass --overwrite")
  try:
    resolved = run_config.from_flags(f.workdir)
    for note in resolved.notes:
      logging.warning("%s", note)
    config = resolved.config
    class_names = builders.class_names(config)
    mesh = parallel.make_mesh(jax.local_devices()[:1])
    params, step = restore.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  try:
    canvases = (parse_canvases(f.canvases) if f.canvases
                else builders.canvases_from_config(config))
  except ValueError as e:
    sys.exit(f"error: {e}")
  exported, leaves = export_canvases(
      params, canvases, model=builders.model_from_config(config, len(class_names)),
      settings=builders.detector_settings_from_config(config), batch_size=f.batch_size,
      platforms=f.platforms or None)
  os.makedirs(os.path.dirname(os.path.abspath(f.output)), exist_ok=True)
  save(f.output, exported, leaves, {
      "class_names": list(class_names), "canvases": [list(c) for c in canvases],
      "min_size": int(config.data.min_size), "max_size": int(config.data.max_size),
      "batch_size": int(f.batch_size), "step": step, "platforms": list(exported[0].platforms),
      "overrides": {k: list(v) if isinstance(v, tuple) else v
                    for k, v in resolved.overrides.items()}})
  size = os.path.getsize(f.output) / 2**20
  shapes = ", ".join(f"{h}x{w}" for h, w in canvases)
  print(f"wrote {f.output} ({size:.1f} MiB): step {step}, {len(canvases)} program(s), input "
        f"uint8 [{f.batch_size}, Hs, Ws, 3] images of any size resized inside onto canvases "
        f"(HxW) {shapes}, platforms {', '.join(exported[0].platforms)}")

