"""Tests of frcnn_jax/runtime/atomic_io.py: file modes of the atomically written files."""

import os
import stat

import pytest

from frcnn_jax.runtime import atomic_io


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_mode_a_new_file_would(tmp_path, mask):
  old = os.umask(mask)
  try:
    assert atomic_io.umask() == mask
    path = tmp_path / "config.json"
    atomic_io.write_json(path, {"a": 1})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    with atomic_io.replacing(tmp_path / "model.bin", "wb") as f:
      f.write(b"x")
    assert stat.S_IMODE((tmp_path / "model.bin").stat().st_mode) == 0o666 & ~mask
    path.chmod(0o600)                       # replaced: the umask decides again
    atomic_io.write_text(path, "{}\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    (tmp_path / "plain.txt").write_text("x")   # what open() gives a new file
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(
        (tmp_path / "plain.txt").stat().st_mode)
  finally:
    os.umask(old)
