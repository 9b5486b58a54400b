"""Sweeps: one training run per point of a config's sweep, and one table of their results.

A sweep file is a config file (`get_config()`) that also defines
`get_sweep() -> list[dict[str, Any]]`: one dict of dotted-key overrides per point, e.g.

  def get_sweep():
    return [{"model.roi_op": "roi_pool"}, {"model.roi_op": "roi_align"}]

Usage:

  python -m frcnn_jax.sweep --config experiments/ablations/roi_op.py --workdir runs/roi_op
  python -m frcnn_jax.sweep ... --print_only     # one train command per point, for a scheduler
  python -m frcnn_jax.sweep ... --gather_only    # only (re)build the table from finished runs

Each point trains in its own workdir `WORKDIR/<point name>` (its overrides are recorded in
`sweep_point.json` there) with `python -m frcnn_jax.train`, one after another; a point that was
interrupted resumes from its checkpoints when the sweep is run again. Extra `--config.k=v`
arguments apply to every point. The table `WORKDIR/results.{md,csv}` has one row per point: its
overrides, the last step, the final training losses and the final evaluation's mAP.
"""

import csv
import glob
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app
from absl import flags

from frcnn_jax import config_flags


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Sweep directory; one sub-directory per point.")
  flags.DEFINE_bool("print_only", False,
                    "Print one train command per point instead of running them.")
  flags.DEFINE_bool("gather_only", False,
                    "Only gather the results of finished points into the table.")


RESULT_COLUMNS = ("step", "map", "total", "rpn_cls", "rpn_box", "det_cls", "det_box")


def load_sweep(path: str) -> list[dict[str, Any]]:
  """Returns the override dicts of the sweep file at `path` (validated against its config).

  Raises:
    ValueError: the file has no `get_sweep`, it returns no points, or a point is invalid
      (unknown key or wrong type; the message names the point and the key).
  """
  module = config_flags.load_module(path.partition(":")[0])
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{path} defines no get_sweep(): not a sweep file")
  points = [dict(p) for p in module.get_sweep()]
  if not points:
    raise ValueError(f"{path}: get_sweep() returned no points")
  for i, point in enumerate(points):
    try:
      config_flags.load_config(path, point)
    except config_flags.ConfigError as e:
      raise ValueError(f"{path}: sweep point {i} {point}: {e}") from e
  return points


def point_name(index: int, point: Mapping[str, Any]) -> str:
  """A directory-safe name: `03-roi_op=roi_align`."""
  parts = [f"{key.rsplit('.', 1)[-1]}={_format(value)}" for key, value in point.items()]
  name = f"{index:02d}-" + "-".join(parts)
  return re.sub(r"[^A-Za-z0-9_.=,+-]", "", name)[:120]


def _format(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return ",".join(_format(v) for v in value)
  return str(value)


def _flag_value(value: Any) -> str:
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def point_command(config_path: str, workdir: str, point: Mapping[str, Any],
                  extra_args: Sequence[str] = ()) -> list[str]:
  """The `python -m frcnn_jax.train` argv of one point."""
  command = [sys.executable, "-m", "frcnn_jax.train", "--config", config_path,
             "--workdir", workdir]
  command += list(extra_args)
  command += [f"--config.{key}={_flag_value(value)}" for key, value in point.items()]
  return command


def read_result(run_dir: str) -> dict[str, Any]:
  """Final metrics of one run: the latest metrics.jsonl values and the newest eval/*.json."""
  result: dict[str, Any] = {}
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    for record in records:  # later records override earlier ones
      result.update(record)
  evals = []
  for path in glob.glob(os.path.join(run_dir, "eval", "*.json")):
    with open(path) as f:
      record = json.load(f)
    if "map" in record:
      evals.append(record)
  if evals:
    last = max(evals, key=lambda r: r.get("step", -1))
    result["map"] = last["map"]
    result["step"] = max(int(result.get("step", -1)), int(last.get("step", -1)))
  return result


def gather(workdir: str, points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Writes WORKDIR/results.md and results.csv; returns the rows."""
  keys = sorted({key for point in points for key in point})
  rows = []
  for i, point in enumerate(points):
    name = point_name(i, point)
    row: dict[str, Any] = {"point": name}
    row.update({key: _format(point[key]) if key in point else "" for key in keys})
    result = read_result(os.path.join(workdir, name))
    row.update({column: result.get(column, "") for column in RESULT_COLUMNS})
    rows.append(row)
  columns = ["point", *keys, *RESULT_COLUMNS]
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)

  def cell(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return rows


def run_sweep(config_path: str, workdir: str, *, extra_args: Sequence[str] = (),
              print_only: bool = False, gather_only: bool = False) -> list[dict[str, Any]]:
  """Runs (or prints) every point of the sweep, then gathers the table.

  Returns:
    The table rows (empty with `print_only`).

  Raises:
    RuntimeError: a point's training run failed (the message names the point and its log).
  """
  points = load_sweep(config_path)
  os.makedirs(workdir, exist_ok=True)
  for i, point in enumerate(points):
    run_dir = os.path.join(workdir, point_name(i, point))
    command = point_command(config_path, run_dir, point, extra_args)
    if print_only:
      print(shlex.join(command))
      continue
    if gather_only:
      continue
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "sweep_point.json"), "w") as f:
      json.dump({"index": i, "overrides": point, "command": command}, f, indent=2)
    print(f"[sweep] point {i + 1}/{len(points)}: {shlex.join(command)}", flush=True)
    log_path = os.path.join(run_dir, "train.log")
    with open(log_path, "a") as log:
      code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
      raise RuntimeError(f"sweep point {i} ({point}) failed with exit code {code}; see {log_path}")
  if print_only:
    return []
  rows = gather(workdir, points)
  with open(os.path.join(workdir, "results.md")) as f:
    print(f.read(), end="")
  return rows


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir:
    raise app.UsageError("--workdir is required")
  config_path = config_flags.get_config_path(f["config"])
  extra = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
  run_sweep(config_path, f.workdir, extra_args=extra, print_only=f.print_only,
            gather_only=f.gather_only)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
