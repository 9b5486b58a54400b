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
`sweep_point.json` there) with `python -m frcnn_jax.train`, one after another; its output goes
to `train.log` there, and its progress and evaluation lines to the console too, after
`[<point name>]`. A point that was interrupted resumes from its checkpoints when the sweep is
run again. Extra `--config.k=v` arguments apply to every point. The table
`WORKDIR/results.{md,csv}` has one row per point: its overrides, the last step, the final
training losses and the final evaluation's mAP.

A sweep whose points change only test-time keys (declared with role "test", e.g. the number
of test proposals) trains one model in `WORKDIR/train` and evaluates it at each point
(`eval/test-<step>-<overrides>.json` there): the points would train identical models.
`--print_only` creates no folder; `--gather_only` says so when nothing has run yet.
"""

import csv
import glob
import io
import json
import os
import re
import selectors
import shlex
import subprocess
import sys
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import TextIO

from absl import app
from absl import flags

from frcnn_jax.config import flags as config_flags
from frcnn_jax.config import run as run_config
from frcnn_jax.runtime import atomic_io


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.define_config_flag()
  flags.DEFINE_string("workdir", None, "Sweep directory; one sub-directory per point.")
  flags.DEFINE_bool("print_only", False,
                    "Print one train command per point instead of running them.")
  flags.DEFINE_bool("gather_only", False,
                    "Only gather the results of finished points into the table.")


RESULT_COLUMNS = ("step", "map", "total", "rpn_cls", "rpn_box", "det_cls", "det_box")
TRAIN_DIR = "train"   # the one run of a test-time sweep


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


def _evaluations(run_dir: str) -> list[dict[str, Any]]:
  """The reports in `run_dir/eval/*.json` (with "map"); "overrides" is {} when absent."""
  reports = []
  for path in sorted(glob.glob(os.path.join(run_dir, "eval", "*.json"))):
    with open(path) as f:
      record = json.load(f)
    if "map" in record:
      record.setdefault("overrides", {})
      reports.append(record)
  return reports


def read_result(run_dir: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Final metrics of one run: the latest metrics.jsonl values and the newest evaluation made
  with the given test-time overrides (default: the run's own settings)."""
  result: dict[str, Any] = {}
  metrics_path = os.path.join(run_dir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    for record in records:  # later records override earlier ones
      result.update(record)
  wanted = _jsonable(overrides or {})
  evals = [r for r in _evaluations(run_dir) if r["overrides"] == wanted]
  if evals:
    last = max(evals, key=lambda r: r.get("step", -1))
    result["map"] = last["map"]
    result["step"] = max(int(result.get("step", -1)), int(last.get("step", -1)))
  return result


def _jsonable(overrides: Mapping[str, Any]) -> dict[str, Any]:
  return json.loads(json.dumps(dict(overrides)))


def is_test_time(points: Sequence[Mapping[str, Any]]) -> bool:
  """Whether every point changes only test-time keys (declared with role "test"): then one
  trained model is evaluated at each point instead of training one model per point."""
  return all(run_config.kind_of(key) == "test" for point in points for key in point)


def evaluate_command(run_dir: str, point: Mapping[str, Any]) -> list[str]:
  """The `python -m frcnn_jax.evaluate` argv that evaluates `run_dir` at one point."""
  return [sys.executable, "-m", "frcnn_jax.evaluate", "--workdir", run_dir,
          *[f"--config.{key}={_flag_value(value)}" for key, value in point.items()]]


# Child output lines shown on the sweep's console (all of it goes to the log): training
# progress, evaluation progress and results, the run's completion or preemption, errors.
FORWARDED = re.compile(r"^(step \d+/\d+ |eval |mAP\s|error: |the run in .* is complete|"
                       r".*: preempted at step )")


def run_child(command: Sequence[str], log: TextIO, prefix: str,
              stream: TextIO | None = None) -> int:
  """Runs `command` to its end; returns its exit code.

  Every line of its stdout and stderr is appended to `log` as it arrives; the lines matching
  `FORWARDED` are also printed to `stream` (stdout by default) after `prefix`, so the sweep's
  console shows which point runs and how far it got.
  """
  stream = stream or sys.stdout
  proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  pending = {proc.stdout: b"", proc.stderr: b""}

  def emit(raw: bytes) -> None:
    line = raw.decode("utf-8", errors="replace").rstrip("\r")
    line = line.rsplit("\r", 1)[-1]   # a terminal-style rewritten line: its last state
    log.write(line + "\n")
    log.flush()
    if FORWARDED.match(line):
      print(prefix + line, file=stream, flush=True)

  try:
    with selectors.DefaultSelector() as selector:
      for pipe in pending:
        selector.register(pipe, selectors.EVENT_READ)
      while selector.get_map():
        for key, _ in selector.select():
          pipe = key.fileobj
          chunk = os.read(pipe.fileno(), 1 << 16)
          if not chunk:
            selector.unregister(pipe)
            if pending[pipe]:
              emit(pending[pipe])
            continue
          *lines, pending[pipe] = (pending[pipe] + chunk).split(b"\n")
          for raw in lines:
            emit(raw)
  except BaseException:   # e.g. Ctrl-C: as subprocess.call, the child does not outlive us
    proc.kill()
    proc.wait()
    raise
  finally:
    proc.stdout.close()
    proc.stderr.close()
  return proc.wait()


def _run_logged(command: Sequence[str], log_path: str, what: str, name: str) -> None:
  """Runs `command` with `run_child` (console prefix "[name] "), appending to `log_path`.

  Raises:
    RuntimeError: the command failed (naming `what` and the log).
  """
  with open(log_path, "a", encoding="utf-8") as log:
    code = run_child(command, log, f"[{name}] ")
  if code != 0:
    raise RuntimeError(f"{what} failed with exit code {code}; see {log_path}")


def _point_overrides(run_dir: str, point: Mapping[str, Any]) -> dict[str, Any]:
  """The keys of `point` whose value differs from the trained run's config (what evaluate
  records as overrides)."""
  run = run_config.read(run_dir)
  if run is None:
    return dict(point)
  values = run_config.flatten(run)
  return {k: v for k, v in point.items() if run_config.as_tuple(v) != values.get(k)}


def gather(workdir: str, points: Sequence[Mapping[str, Any]], *,
           test_time: bool = False) -> list[dict[str, Any]]:
  """Writes WORKDIR/results.md and results.csv; returns the rows.

  With `test_time`, every point is an evaluation of the one run in WORKDIR/TRAIN_DIR.
  """
  keys = sorted({key for point in points for key in point})
  rows = []
  for i, point in enumerate(points):
    name = point_name(i, point)
    row: dict[str, Any] = {"point": name}
    row.update({key: _format(point[key]) if key in point else "" for key in keys})
    if test_time:
      run_dir = os.path.join(workdir, TRAIN_DIR)
      result = read_result(run_dir, _point_overrides(run_dir, point))
    else:
      result = read_result(os.path.join(workdir, name))
    row.update({column: result.get(column, "") for column in RESULT_COLUMNS})
    rows.append(row)
  columns = ["point", *keys, *RESULT_COLUMNS]
  table = io.StringIO()
  writer = csv.DictWriter(table, fieldnames=columns)
  writer.writeheader()
  writer.writerows(rows)
  atomic_io.write_text(os.path.join(workdir, "results.csv"), table.getvalue())

  def cell(value):
    return f"{value:.4f}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
  atomic_io.write_text(os.path.join(workdir, "results.md"), "\n".join(lines) + "\n")
  return rows


def run_sweep(config_path: str, workdir: str, *, extra_args: Sequence[str] = (),
              print_only: bool = False, gather_only: bool = False) -> list[dict[str, Any]]:
  """Runs (or prints) every point of the sweep, then gathers the table.

  A sweep over test-time keys only (`is_test_time`) trains once, in WORKDIR/TRAIN_DIR, and
  evaluates that model at each point (`python -m frcnn_jax.evaluate --config.key=value`); an
  evaluation already made with a point's settings is not repeated. Otherwise each point trains
  in its own folder.

  Returns:
    The table rows (empty with `print_only`).

  Raises:
    RuntimeError: a training run or evaluation failed (the message names it and its log), or
      `gather_only` found no finished point.
  """
  points = load_sweep(config_path)
  if is_test_time(points):
    return _run_test_time_sweep(config_path, workdir, points, extra_args=extra_args,
                                print_only=print_only, gather_only=gather_only)
  commands = [point_command(config_path, os.path.join(workdir, point_name(i, point)), point,
                            extra_args) for i, point in enumerate(points)]
  if print_only:
    for command in commands:
      print(shlex.join(command))
    return []
  if gather_only:
    _check_something_ran(workdir, [point_name(i, p) for i, p in enumerate(points)])
  else:
    for i, (point, command) in enumerate(zip(points, commands)):
      run_dir = os.path.join(workdir, point_name(i, point))
      os.makedirs(run_dir, exist_ok=True)
      atomic_io.write_json(os.path.join(run_dir, "sweep_point.json"),
                           {"index": i, "overrides": point, "command": command})
      print(f"[sweep] point {i + 1}/{len(points)}: {shlex.join(command)}", flush=True)
      _run_logged(command, os.path.join(run_dir, "train.log"), f"sweep point {i} ({point})",
                  point_name(i, point))
  return _gather_and_print(workdir, points, test_time=False)


def _run_test_time_sweep(config_path: str, workdir: str, points: Sequence[Mapping[str, Any]],
                         *, extra_args: Sequence[str], print_only: bool,
                         gather_only: bool) -> list[dict[str, Any]]:
  """One training run, then one evaluation per point (see `run_sweep`)."""
  run_dir = os.path.join(workdir, TRAIN_DIR)
  train = point_command(config_path, run_dir, {}, extra_args)
  if print_only:
    print("# test-time sweep: train once, then evaluate at each point (after training ends)")
    print(shlex.join(train))
    for point in points:
      print(shlex.join(evaluate_command(run_dir, point)))
    return []
  if gather_only:
    _check_something_ran(workdir, [TRAIN_DIR])
  else:
    os.makedirs(run_dir, exist_ok=True)
    atomic_io.write_json(os.path.join(run_dir, "sweep_point.json"),
                         {"points": [dict(p) for p in points], "command": train})
    print(f"[sweep] train once: {shlex.join(train)}", flush=True)
    log_path = os.path.join(run_dir, "train.log")
    _run_logged(train, log_path, "the sweep's training run", TRAIN_DIR)
    for i, point in enumerate(points):
      overrides = _jsonable(_point_overrides(run_dir, point))
      if any(r["overrides"] == overrides for r in _evaluations(run_dir)):
        print(f"[sweep] point {i + 1}/{len(points)}: evaluated already", flush=True)
        continue
      command = evaluate_command(run_dir, point)
      print(f"[sweep] point {i + 1}/{len(points)}: {shlex.join(command)}", flush=True)
      _run_logged(command, log_path, f"the evaluation of sweep point {i} ({point})",
                  point_name(i, point))
  return _gather_and_print(workdir, points, test_time=True)


def _check_something_ran(workdir: str, run_names: Sequence[str]) -> None:
  """Raises RuntimeError when no run folder under `workdir` has metrics or evaluations."""
  for name in run_names:
    run_dir = os.path.join(workdir, name)
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or _evaluations(run_dir):
      return
  raise RuntimeError(f"nothing to gather: no point of the sweep has run under {workdir} yet "
                     "(run the sweep without --gather_only, or the commands of --print_only)")


def _gather_and_print(workdir: str, points: Sequence[Mapping[str, Any]], *,
                      test_time: bool) -> list[dict[str, Any]]:
  rows = gather(workdir, points, test_time=test_time)
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
  try:
    run_sweep(config_path, f.workdir, extra_args=extra, print_only=f.print_only,
              gather_only=f.gather_only)
  except (RuntimeError, ValueError, OSError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=config_flags.parse_flags)
