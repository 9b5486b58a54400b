"""The train command's run lifecycle end to end: SIGTERM during start-up, Ctrl-C mid-run, a
data position that does not fit, another worker count, a finished run started again, evaluated
again."""

import json
import os
import signal
import subprocess

import pytest

from tests import test_train
from tests import test_train_resume

# Six runs of the command, three of them compiling (about two minutes on 2 busy cores).
pytestmark = pytest.mark.slow

RUN = {**test_train.TINY, "train.num_steps": 8, "train.checkpoint_every": 100}


def _start(workdir, overrides, env, *flags):
  return subprocess.Popen(test_train_resume._command(workdir, overrides) + list(flags), env=env,
                          cwd=test_train.ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)


def _finish(process, timeout=300):
  out = process.communicate(timeout=timeout)[0]
  return process.returncode, out


def _listing(directory):
  return sorted(os.path.relpath(os.path.join(root, name), directory)
                for root, _, names in os.walk(directory) for name in names)


def test_signals_unfit_checkpoint_and_finished_runs(tmp_path, tmp_path_factory):
  env = test_train_resume._env(str(tmp_path_factory.getbasetemp() / "jax_cache"))
  workdir = str(tmp_path / "run")
  checkpoints = os.path.join(workdir, "checkpoints")

  # SIGTERM while the model is being built: exit 0 with a message, nothing saved.
  process = _start(workdir, RUN, env)
  test_train_resume._wait_for(lambda: os.path.exists(os.path.join(workdir, "train.lock")),
                              process)
  process.send_signal(signal.SIGTERM)
  code, out = _finish(process)
  assert code == 0, out[-3000:]
  assert "SIGTERM during start-up" in out
  assert not os.path.isdir(checkpoints) or not [s for s in os.listdir(checkpoints)
                                                if s.isdigit()]

  # Ctrl-C (SIGINT to the process group, as a terminal sends it) mid-run: a checkpoint of that
  # step, one line, exit 0.
  process = _start(workdir, RUN, env)
  lines = []
  while not lines or not lines[-1].startswith("step 2/"):
    line = process.stdout.readline()
    assert line, "".join(lines[-50:])
    lines.append(line)
  os.killpg(process.pid, signal.SIGINT)
  code, out = _finish(process)
  out = "".join(lines) + out
  assert code == 0, out[-3000:]
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
  stopped = [line for line in out.splitlines() if "preempted at step" in line]
  assert len(stopped) == 1 and stopped[0].startswith("SIGINT"), out[-3000:]
  saved = sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit())
  assert len(saved) == 1 and 2 <= saved[0] < 8

  # A data position the input pipeline refuses (another seed): stopped before anything is
  # moved, naming the key and the flag ...
  before = _listing(checkpoints)
  code, out = _finish(_start(workdir, {**RUN, "seed": 1}, env))
  assert code != 0 and "does not fit this run" in out and "seed: 0 -> 1" in out, out[-3000:]
  assert "--restart_data_iterator" in out and "Traceback" not in out, out[-3000:]
  assert _listing(checkpoints) == before and not os.path.exists(checkpoints + ".corrupt")
  # ... while another worker count fits: the run continues where it stopped.
  other = {**RUN, "data.num_workers": 1}
  code, out = _finish(_start(workdir, other, env))
  assert code == 0, out[-3000:]
  assert f"step {saved[0] + 1}/8" in out and "step 1/8" not in out
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, 9)) + [8]

  # The finished run started again: says so, exit 0, no new line or event file.
  files = lambda: [f for f in _listing(workdir) if f != "console.log"]
  before = files(), test_train._read(metrics)
  code, out = _finish(_start(workdir, other, env))
  assert code == 0 and "is complete" in out, out[-3000:]
  assert (files(), test_train._read(metrics)) == before

  # Asked to evaluate again (with another seed, so the data iterator must restart): one
  # evaluation record for the step, replaced.
  code, out = _finish(_start(workdir, {**other, "seed": 1}, env, "--evaluate_again",
                             "--restart_data_iterator"))
  assert code == 0 and "eval step 8:" in out and "data iterator restarted" in out, out[-3000:]
  with open(metrics) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(1, 9)) + [8]
  with open(os.path.join(workdir, "console.log")) as f:
    log = f.read()
  for text in ("SIGTERM during start-up", "SIGINT: preempted at step", "step 8/8",
               "eval step 8:", "is complete", "error: CheckpointMismatchError"):
    assert text in log, text
