"""Evaluates a trained detector on the eval split: per-class AP table, JSON report, PR plots.

Usage:

  python -m frcnn_jax.evaluate --workdir runs/voc07 [--step N] [--config.test.nms_threshold=0.4]

The run's config (WORKDIR/config.json) is used; test-time keys may be overridden, and the
report's name and contents record them (frcnn_jax/config/run.py). An earlier report is never
replaced: a second evaluation of the same step and settings is written as `<name>.2.json`.

Restores the newest checkpoint of `WORKDIR/checkpoints` (or step N), runs the jitted `predict`
data-parallel over every device of every process (the batch sharded on the mesh's `data`
axis), gathers the detections and image ids of all processes, and computes the metric of
`config.eval.metric` (voc07: 11-point AP; voc12: area under the PR envelope; coco: AP@[.5:.95]
through pycocotools). Process 0 prints the table and writes `WORKDIR/eval/<split>-<step>.json`
and one precision-recall PNG per class in `WORKDIR/eval/<split>-<step>/`.

The evaluation itself is `frcnn_jax.evaluation.runner`.
"""

import logging
import os
import pathlib
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
from absl import app
from absl import flags

from frcnn_jax.config import flags as config_flags
from frcnn_jax.config import run as run_config
from frcnn_jax.evaluation import runner
from frcnn_jax.runtime import parallel
from frcnn_jax.training import restore


def define_flags() -> None:
  """Defines the command's flags."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Training run directory (reads checkpoints/, writes "
                      "eval/).")
  flags.DEFINE_integer("step", -1, "Checkpoint step to evaluate; -1: the newest.")
  flags.DEFINE_bool("also_coco", False, "Also compute COCO AP@[.5:.95], AP50, AP75, APs/m/l "
                    "for a VOC metric.")
  config_flags.define_distributed_flags()


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)
  mesh = parallel.make_mesh()
  try:
    resolved = run_config.from_flags(f.workdir)
    for note in resolved.notes:
      logging.warning("%s", note)
    params, step = restore.restore_params(f.workdir, mesh, None if f.step < 0 else f.step)
    result = runner.run_evaluation(resolved.config, params, step=step, mesh=mesh, progress=True,
                            also_coco=f.also_coco)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  if jax.process_index() == 0:
    print(runner.format_table(result))
    print(f"wrote {write_command_report(result, resolved, f.workdir, runner.split_name(resolved.config))}")


def write_command_report(result: Mapping[str, Any], resolved: "run_config.CommandConfig",
                         workdir: str | os.PathLike, split: str) -> pathlib.Path:
  """Writes the command's report without replacing an earlier one.

  The name is `eval/<split>-<step>[-<override tag>].json` (the tag names the test-time keys that
  differ from the run's config, e.g. `test-1800-test.nms_threshold=0.4.json`); when that file
  (or its plot folder) exists, `.2`, `.3` ... is added and a line says so. The report records
  "overrides" ({key: value}) and "config" (where the config came from).
  """
  out_dir = pathlib.Path(workdir) / "eval"
  step = result["step"]
  tag = run_config.override_tag(resolved.overrides)
  wanted = f"{split}-{step}" + (f"-{tag}" if tag else "")
  stem = run_config.free_stem(out_dir, wanted)
  if stem != wanted:
    print(f"{out_dir / wanted}.json exists (an earlier evaluation): keeping it, writing "
          f"{stem}.json", flush=True)
  extra = {"overrides": {k: list(v) if isinstance(v, tuple) else v
                         for k, v in resolved.overrides.items()},
           "config": resolved.source}
  return runner.write_report(result, out_dir, split=split, step=step,
                      class_names=list(result["ap"]), stem=stem, extra=extra)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
