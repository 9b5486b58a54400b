"""A copy of the tiny run's workdir that holds `config.json`, as `train` writes it."""

import pathlib
import shutil


def run_folder(tiny_run, root: pathlib.Path) -> pathlib.Path:
  """Copies the tiny run's checkpoints to `root/run` and writes the run's config.json."""
  workdir = root / "run"
  shutil.copytree(tiny_run.workdir / "checkpoints", workdir / "checkpoints")
  (workdir / "config.json").write_text(tiny_run.config.to_json_best_effort())
  return workdir
