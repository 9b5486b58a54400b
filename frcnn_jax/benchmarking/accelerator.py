"""The one-shot accelerator check's items, each run within a `budget.Run`.

Every item records its figures (or why it was skipped or failed) in the run's result and
rewrites the outputs; `scripts/accelerator_check.py` orders them. Rows are
`rows.measure_case` with MFU against the matmul peak and content MFU
(`mfu.add_content_mfu`); torchvision is `peer.run_peer`; the profile is
`stage_profile.profile_train_step`; the determinism flags' cost is the profiled row measured
again in a child process of the check's own command (`--child_case`).
"""

import json
import os
import subprocess
import sys
import time
from concurrent import futures
from typing import Any

import jax
import ml_collections

from frcnn_jax.benchmarking import accelerator_report
from frcnn_jax.benchmarking import budget
from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import mfu
from frcnn_jax.benchmarking import peer as peer_lib
from frcnn_jax.benchmarking import report
from frcnn_jax.benchmarking import rows
from frcnn_jax.benchmarking import stage_profile
from frcnn_jax.runtime import parallel

DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops=true",
                     "--xla_gpu_exclude_nondeterministic_ops=true")
FIRST_ITEM_GUESS_S = {"cpu": 0.0, "other": 60.0}   # cost guess before an item of a kind ran
PEER_GUESS_S = 30.0
CHILD_PREFIX = "CHILD_ROW "


def guess() -> float:
  """The cost guess for the first item of a kind on this backend."""
  return FIRST_ITEM_GUESS_S["cpu" if machine.on_cpu() else "other"]


def new_run(output: str, budget_s: float, argv: list[str], start: float | None = None
            ) -> budget.Run:
  """A `budget.Run` with the check's result entries and summary (`accelerator_report`)."""
  initial = {"rows": [], "peer": {"available": False, "error": "not run", "results": {}},
             "profile": None, "determinism": [], "matmul_peak": {}, "targets": {}}
  return budget.Run(output, budget_s, argv, start=start, initial=initial,
                    summarise=accelerator_report.summarise)


def precompile(run: budget.Run, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
               rows_to_compile: list[cases.Case], num_gt: int, threads: int) -> None:
  """Compiles the rows' programs as `rows.measure_case` builds them, in `threads` threads, into
  the persistent compilation cache (the rows then load them). Before any timing, so that
  compiling (GPU autotuning included) never overlaps a measurement. Nothing without threads,
  rows or a compilation cache."""
  if threads < 1 or not rows_to_compile or not jax.config.jax_compilation_cache_dir:
    return
  if not run.fits("precompile", f"precompiling {len(rows_to_compile)} rows", guess()):
    return

  def one(case: cases.Case) -> None:
    programs, state = cases.build(config, case, mesh)
    batch = programs.global_batch(programs.host_batch(case.batch, case.height, case.width,
                                                      num_gt))
    programs.train.lower(state, batch).compile()
    programs.predict.lower(state.params, batch).compile()

  start = time.monotonic()
  with futures.ThreadPoolExecutor(threads) as pool:
    for case, error in zip(rows_to_compile, pool.map(budget.exception_of(one), rows_to_compile)):
      if error:
        run.error(f"precompile {case}: {error}"[:600])
  seconds = time.monotonic() - start
  run.took("precompile", seconds)
  with run.lock:
    run.result["precompile"] = {"rows": len(rows_to_compile), "threads": threads,
                                "seconds": seconds}
  print(f"precompiled {len(rows_to_compile)} rows in {seconds:.0f} s ({threads} threads)",
        flush=True)


def measure(run: budget.Run, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
            case: cases.Case, steps: int, num_gt: int, peaks: dict[str, Any]
            ) -> dict[str, Any] | None:
  """One row (`rows.measure_case`) with MFU and content MFU, added to the run.

  Returns:
    The row, or None when skipped for the budget or failed (e.g. out of memory; recorded).
  """
  what = f"{case.dtype} {case.height}x{case.width} batch {case.batch}"
  if not run.fits(f"row:{case.dtype}", what, guess()):
    return None
  start = time.monotonic()
  try:
    row = rows.measure_case(config, case, mesh, steps, num_gt)
  except Exception as e:  # pylint: disable=broad-except   # e.g. out of memory: keep going
    run.error(f"{what}: {type(e).__name__}: {str(e)[:500]}")
    print(f"row {what} failed: {e}", flush=True)
    run.took(f"row:{case.dtype}", time.monotonic() - start)
    return None
  run.took(f"row:{case.dtype}", time.monotonic() - start)
  if case.dtype in peaks:
    mfu.add_mfu(row, peaks[case.dtype])
  mfu.add_content_mfu(row, int(config.data.min_size))
  with run.lock:
    run.result["rows"].append(row)
    peer_lib.add_peer(row, run.result["peer"])
  fmt = report.fmt
  print(f"row {what}: train {fmt(row['train_images_per_s'], '.1f')} im/s, infer "
        f"{fmt(row['infer_images_per_s'], '.1f')} im/s, compile "
        f"{row['compile_s']:.1f} s, content MFU train "
        f"{report.pct(row.get('train_mfu_content'))} ({time.monotonic() - start:.0f} s)",
        flush=True)
  run.write()
  return row


def peer(run: budget.Run, config: ml_collections.ConfigDict, rows_to_run: list[cases.Case],
         steps: int, num_gt: int) -> None:
  """torchvision on each row not yet measured (`peer.run_peer`), merged into the run's
  "peer", and the speed-ups re-added to every row. Stops for good once the peer is
  unavailable (said once) or the budget is short."""
  for case in rows_to_run:
    key = (case.dtype, case.height, case.width, case.batch)
    if run.result["peer"].get("unavailable"):
      return
    if key in run.result["peer"]["results"]:
      continue
    if not run.fits("peer", f"torchvision {' '.join(map(str, key))}", PEER_GUESS_S):
      return
    start = time.monotonic()
    got = peer_lib.run_peer([case], config, steps, num_gt)
    run.took("peer", time.monotonic() - start)
    with run.lock:
      if not got["available"]:
        run.result["peer"] = {**got, "unavailable": True}
        return
      run.result["peer"].update(available=True, error=None)
      run.result["peer"]["results"].update(got["results"])
      for row in run.result["rows"]:
        peer_lib.add_peer(row, run.result["peer"])
    run.write()


def profile(run: budget.Run, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
            dtype: str, height: int, width: int, batch: int, steps: int, num_gt: int) -> None:
  """The per-stage profile (`stage_profile.profile_train_step`) into the run's "profile"; its
  trace goes to the run's output folder."""
  what = f"profile {dtype} {height}x{width} batch {batch}"
  # Its compile is a cache hit after the rows; a row's time bounds it from above.
  if not run.fits("profile", what, run.durations.get(f"row:{dtype}", 2 * guess())):
    return
  start = time.monotonic()
  result = stage_profile.profile_train_step(config, mesh, dtype, height, width, batch, steps,
                                            num_gt, run.output)
  run.took("profile", time.monotonic() - start)
  with run.lock:
    run.result["profile"] = result
  print(f"profile: {json.dumps(report.json_safe(stage_profile.brief(result)))}", flush=True)
  run.write()


def child_row(config: ml_collections.ConfigDict, spec: str, steps: int, num_gt: int) -> str:
  """Measures one "DTYPE:HxW:BATCH" row; returns the line a child prints for its parent."""
  dtype, size, batch = spec.split(":")
  height, width = cases.parse_size(size)
  case = cases.Case(dtype, height, width, int(batch), int(config.rpn.post_nms_top_n_test),
                    cases.PARTS)
  row = rows.measure_case(config, case, parallel.make_mesh(), steps, num_gt)
  return CHILD_PREFIX + json.dumps(report.json_safe(row))


def config_argv(argv: list[str]) -> list[str]:
  """The --config and --config.* arguments of a command line (argv[0] is the program)."""
  out, take_next = [], False
  for a in argv[1:]:
    if take_next:
      out.append(a)
      take_next = False
    elif a == "--config" or (a.startswith("--config.") and "=" not in a):
      out.append(a)
      take_next = True
    elif a.startswith("--config=") or a.startswith("--config."):
      out.append(a)
  return out


def determinism(run: budget.Run, script: str, argv_config: list[str], dtype: str, height: int,
                width: int, batch: int, steps: int, baseline: dict[str, Any] | None) -> None:
  """Measures the profiled row again in a child process per DETERMINISM_FLAGS entry.

  Args:
    run: the run (its watchdog kills a child still running at the budget).
    script: the check's own command (`python script ... --child_case=...` is the child).
    argv_config: the --config arguments passed on (`config_argv`).
    dtype: the row's dtype.
    height: its canvas height.
    width: its canvas width.
    batch: its images per device.
    steps: timed runs.
    baseline: the row measured without the flag, for the "*_vs_default" ratios.
  """
  for flag in DETERMINISM_FLAGS:
    what = f"determinism {flag}"
    if not run.fits("determinism", what, 2 * guess() + 20.0):
      return
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    cmd = [sys.executable, script, *argv_config,
           f"--child_case={dtype}:{height}x{width}:{batch}", f"--steps={steps}",
           "--compilation_cache="]
    start = time.monotonic()
    entry: dict[str, Any] = {"xla_flags": env["XLA_FLAGS"], "dtype": dtype, "height": height,
                             "width": width, "batch": batch}
    try:
      with run.lock:
        run.child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
      out, _ = run.child.communicate(timeout=max(run.left() - budget.RESERVE_S, 1.0))
      lines = [l for l in out.splitlines() if l.startswith(CHILD_PREFIX)]
      if run.child.returncode != 0 or not lines:
        entry["error"] = f"exit {run.child.returncode}: {out[-800:]}"
      else:
        row = json.loads(lines[-1][len(CHILD_PREFIX):])
        entry.update({k: row.get(k) for k in ("train_step_s", "infer_s", "compile_s",
                                              "train_finite")})
        if baseline:
          for k in ("train_step_s", "infer_s"):
            if entry.get(k) and baseline.get(k):
              entry[f"{k}_vs_default"] = entry[k] / baseline[k]
    except subprocess.TimeoutExpired:
      run.child.kill()
      entry["error"] = "timed out"
    run.took("determinism", time.monotonic() - start)
    with run.lock:
      run.child = None
      run.result["determinism"].append(entry)
    print(f"determinism: {entry}"[:1000], flush=True)
    run.write()
