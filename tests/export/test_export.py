"""Tests for frcnn_jax/export/writer.py: the exported program equals the live model."""

import ast
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from frcnn_jax import detect
from frcnn_jax.data import canvases as canvas_lib
from frcnn_jax.data import transforms
from frcnn_jax.detection import detector
from frcnn_jax.evaluation import runner as eval_runner
from frcnn_jax.export import writer as export
from frcnn_jax.ops import images as image_ops
from tests.evaluation.tiny_run import STEP
from tests.evaluation.tiny_run import tiny_run  # noqa: F401  pylint: disable=unused-import

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Loads and runs an export in a fresh interpreter, then lists the frcnn_jax modules it imported.
_LOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from frcnn_jax.export import loader
    model = loader.load(sys.argv[1])
    image = np.load(sys.argv[2])
    out = model.detect(image)
    print(json.dumps({"boxes": out["boxes"].tolist(), "scores": out["scores"].tolist(),
                      "labels": out["labels"].tolist(), "class_names": model.class_names,
                      "modules": sorted(m for m in sys.modules if m.startswith("frcnn_jax"))}))
    """)


@pytest.fixture(scope="module")
def exported_file(tiny_run, tmp_path_factory):
  path = tmp_path_factory.mktemp("export") / "model.bin"
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.export", "--config", str(tiny_run.config_path),
       "--workdir", str(tiny_run.workdir), "--output", str(path)],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"step {STEP}" in proc.stdout
  return path


@pytest.fixture(scope="module")
def loaded(exported_file):
  """The one-canvas export, loaded once (its programs compile once per source canvas)."""
  return export.loader.load(exported_file)


def live_device_batch(tiny_run, image, canvases=None):
  """One image as the input pipeline ships it when the device resizes (`data.resize_on=device`):
  the canvas `detect.prepare` picks, the pipeline's source canvas for this size
  (`canvases.source_canvases`) and `transforms.prepare`'s fields, a batch of one."""
  d = tiny_run.config.data
  canvases = canvases or (tuple(d.pad_hw),)
  size = canvas_lib.resized_hw(image.shape[:2], d.min_size, d.max_size)
  pad_hw = tuple(canvases[int(canvas_lib.place_canvases([size], canvases)[0])])
  source = canvas_lib.source_canvases(np.array([image.shape[:2]]), np.zeros(1, int), 1)[0]
  example = {"image": image, "boxes": np.zeros((0, 4), np.float32),
             "labels": np.zeros(0, np.int32), "difficult": np.zeros(0, bool), "image_id": 0}
  fields, _ = transforms.prepare(example, min_size=d.min_size, max_size=d.max_size,
                                 pad_hw=pad_hw, max_gt=d.max_gt, training=False,
                                 source_canvas=source)
  return {k: fields[k][None] for k in image_ops.input_keys(fields)}


def live_predict(tiny_run, batch):
  out = detector.predict(tiny_run.params, batch, model=tiny_run.model,
                         settings=tiny_run.settings)
  return {k: np.asarray(v) for k, v in out.items()}


# Smaller than the 64x64 canvas (enlarged), taller (scaled down), larger both ways (scaled down
# from a source canvas of 4 canvases), and long (scaled down 6x).
@pytest.mark.parametrize("hw", [(30, 40), (130, 20), (200, 150), (150, 400)])
def test_exported_program_equals_the_live_device_resize_path(tiny_run, loaded, hw):
  assert loaded.meta["step"] == STEP and loaded.meta["batch_size"] == 1
  image = np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8)
  inputs = loaded.prepare(image)
  batch = live_device_batch(tiny_run, image)
  assert inputs["canvas_hw"] == image_ops.canvas_hw(batch) == (64, 64)
  for key in ("source_hw", "image_hw", "scale"):
    np.testing.assert_array_equal(inputs[key], batch[key], err_msg=key)
  src = inputs["source_image"]
  assert src.shape[1:3] == export.loader.source_canvas(hw, (64, 64))
  np.testing.assert_array_equal(src[0, :hw[0], :hw[1]], image)
  assert not src[0, hw[0]:].any() and not src[0, :, hw[1]:].any()
  got = loaded(**inputs)
  want = live_predict(tiny_run, batch)
  assert got["valid"].any()
  np.testing.assert_array_equal(got["valid"], want["valid"])
  np.testing.assert_array_equal(got["labels"], want["labels"])
  np.testing.assert_allclose(got["boxes"], want["boxes"], atol=1e-4)
  np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-6)


def test_source_canvas_rounds_up_to_multiples_of_the_canvas():
  assert export.loader.source_canvas((30, 40), (64, 64)) == (64, 64)
  assert export.loader.source_canvas((64, 64), (64, 64)) == (64, 64)
  assert export.loader.source_canvas((65, 300), (48, 64)) == (96, 320)


def test_loader_has_no_resampling_code():
  """The resize is the exported program's: the loader only pads (no filter, no weights)."""
  with open(os.path.join(REPO, "frcnn_jax", "export", "loader.py")) as f:
    tree = ast.parse(f.read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, ast.Name):
      names.add(node.id)
    elif isinstance(node, ast.Attribute):
      names.add(node.attr)
      if isinstance(node.value, ast.Name):
        names.add(f"{node.value.id}.{node.attr}")
    elif isinstance(node, ast.arg):
      names.add(node.arg)
    elif isinstance(node, ast.alias):
      names.add(node.name)
  found = sorted(n for n in names if any(
      w in n.lower() for w in ("resiz", "resampl", "bilinear", "interp", "coeff", "filter")))
  assert not found, found
  assert not names & {"jax.image", "take", "einsum", "matmul"}   # no resize op, gather, product


def test_loader_needs_no_model_code(tiny_run, exported_file, tmp_path):
  image = tiny_run.source[3]["image"]
  np.save(tmp_path / "image.npy", image)
  proc = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, str(exported_file),
                         str(tmp_path / "image.npy")],
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                        cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["modules"] == ["frcnn_jax", "frcnn_jax.export", "frcnn_jax.export.loader"]
  assert result["class_names"] == list(tiny_run.source.classes)
  out = detector.predict(tiny_run.params, detect.prepare(image, tiny_run.config),
                         model=tiny_run.model, settings=tiny_run.settings)
  keep = np.asarray(out["valid"][0])
  np.testing.assert_allclose(np.asarray(result["boxes"]).reshape(-1, 4),
                             eval_runner.clip_to_image(np.asarray(out["boxes"][0])[keep],
                                                    *image.shape[:2]), atol=1e-4)
  np.testing.assert_allclose(result["scores"], np.asarray(out["scores"][0])[keep], atol=1e-6)


def test_load_rejects_other_files(tmp_path):
  path = tmp_path / "other.npz"
  np.savez(path, meta=np.frombuffer(b'{"format": "x"}', np.uint8))
  with pytest.raises(ValueError, match=r"not a frcnn_jax.export/\d file"):
    export.loader.load(path)
  for old in ("frcnn_jax.export/1", "frcnn_jax.export/2"):   # canvases resized outside
    np.savez(path, meta=np.frombuffer(json.dumps({"format": old}).encode(), np.uint8))
    with pytest.raises(ValueError, match=f"older format '{old}'.*export it again"):
      export.loader.load(path)
  import pickle  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  others = {"notes.txt": b"just text\n", "empty.bin": b"",
            "object.pkl": pickle.dumps({"meta": 1}), "broken.npz": b"PK\x03\x04 cut short"}
  for name, content in others.items():
    (tmp_path / name).write_bytes(content)
  np.save(tmp_path / "array.npy", np.zeros(3))
  np.savez(tmp_path / "no_meta.npz", a=np.zeros(3))
  np.savez(tmp_path / "bad_meta.npz", meta=np.frombuffer(b"\xff not json", np.uint8))
  with zipfile.ZipFile(tmp_path / "plain.zip", "w") as z:
    z.writestr("meta.txt", "x")
  for name in [*others, "array.npy", "no_meta.npz", "bad_meta.npz", "plain.zip"]:
    with pytest.raises(ValueError, match=f"{name} is not a frcnn_jax export") as e:
      export.loader.load(tmp_path / name)
    assert "allow_pickle" not in str(e.value)
  with pytest.raises(FileNotFoundError):
    export.loader.load(tmp_path / "missing.bin")


# Runs the loader with everything but JAX and NumPy made unimportable.
_BLOCKED_LOAD_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = set(sys.argv[4].split(","))

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ImportError(f"{name} is blocked")
        return None

    sys.meta_path.insert(0, Block())
    for name in list(sys.modules):
      if name.split(".")[0] in BLOCKED:
        del sys.modules[name]
    import numpy as np
    if sys.argv[3] == "package":
      from frcnn_jax.export import loader
    else:
      sys.path.insert(0, sys.argv[3])
      import export_loader as loader
    model = loader.load(sys.argv[1])
    out = model.detect(np.load(sys.argv[2]))
    print(json.dumps({"boxes": out["boxes"].tolist(), "scores": out["scores"].tolist(),
                      "class_names": model.class_names}))
    """)
_OTHERS = "absl,PIL,ml_collections,flax,optax,orbax,grain,tensorflow,tensorflow_datasets,etils,chex"


@pytest.mark.parametrize("where", ["copied_file", "package"])
def test_loader_needs_only_jax_and_numpy(tiny_run, exported_file, tmp_path, where):
  import shutil  # pylint: disable=g-import-not-at-top
  image = tiny_run.source[4]["image"]
  np.save(tmp_path / "image.npy", image)
  blocked = _OTHERS
  if where == "copied_file":   # the loader file alone, next to an application
    shutil.copy(os.path.join(REPO, "frcnn_jax", "export", "loader.py"), tmp_path / "export_loader.py")
    blocked += ",frcnn_jax"
  proc = subprocess.run([sys.executable, "-c", _BLOCKED_LOAD_SCRIPT, str(exported_file),
                         str(tmp_path / "image.npy"),
                         str(tmp_path) if where == "copied_file" else "package", blocked],
                        capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO),
                        cwd=str(tmp_path), timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["class_names"] == list(tiny_run.source.classes)
  out = detector.predict(tiny_run.params, detect.prepare(image, tiny_run.config),
                         model=tiny_run.model, settings=tiny_run.settings)
  keep = np.asarray(out["valid"][0])
  np.testing.assert_allclose(np.asarray(result["scores"]), np.asarray(out["scores"][0])[keep],
                             atol=1e-6)


def test_cli_uses_the_run_config_and_keeps_an_existing_file(tiny_run, tmp_path):
  from tests.evaluation.run_folder import run_folder  # pylint: disable=g-import-not-at-top
  workdir = run_folder(tiny_run, tmp_path)
  path = tmp_path / "new" / "folder" / "model.bin"      # the folder does not exist yet

  def export_command(*extra):
    return subprocess.run(
        [sys.executable, "-m", "frcnn_jax.export", "--workdir", str(workdir), "--output",
         str(path), *extra], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO, timeout=300, check=False)

  proc = export_command("--config.test.score_threshold=0.3")
  assert proc.returncode == 0, proc.stderr[-3000:]
  loaded = export.loader.load(path)
  assert loaded.meta["overrides"] == {"test.score_threshold": 0.3}
  before = path.read_bytes()
  proc = export_command()
  assert proc.returncode != 0 and "--overwrite" in proc.stderr
  assert "Traceback" not in proc.stderr and path.read_bytes() == before
  proc = export_command("--overwrite", "--config.model.fc.dim=8")
  assert proc.returncode != 0 and "model.fc.dim" in proc.stderr


TWO_CANVASES = ((48, 64), (64, 48))   # landscape and portrait, multiples of the stride 16


@pytest.fixture(scope="module")
def two_canvas_file(tiny_run, tmp_path_factory):
  path = tmp_path_factory.mktemp("export2") / "model.bin"
  proc = subprocess.run(
      [sys.executable, "-m", "frcnn_jax.export", "--config", str(tiny_run.config_path),
       "--workdir", str(tiny_run.workdir), "--output", str(path), "--canvases",
       ",".join(f"{h}x{w}" for h, w in TWO_CANVASES)],
      capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 program(s)" in proc.stdout
  return path


@pytest.mark.parametrize("hw, canvas", [((45, 60), (48, 64)), ((60, 45), (64, 48)),
                                        ((96, 128), (48, 64)), ((30, 30), (48, 64))])
def test_export_picks_the_smallest_canvas_and_equals_predict(tiny_run, two_canvas_file, hw,
                                                             canvas):
  loaded = export.loader.load(two_canvas_file)
  assert loaded.canvases == list(TWO_CANVASES)
  image = np.random.default_rng(1).integers(0, 255, (*hw, 3), dtype=np.uint8)
  batch = live_device_batch(tiny_run, image, TWO_CANVASES)
  assert image_ops.canvas_hw(batch) == loaded.prepare(image)["canvas_hw"] == canvas
  out = live_predict(tiny_run, batch)
  keep = out["valid"][0]
  assert keep.any(), "the tiny model detects something at score >= 0"
  got = loaded.detect(image)
  np.testing.assert_allclose(got["scores"], out["scores"][0][keep], atol=1e-5)
  np.testing.assert_allclose(got["boxes"], eval_runner.clip_to_image(
      out["boxes"][0][keep], *hw), atol=1e-3)
  args = (np.zeros((1, 32, 32, 3), np.uint8), np.array([[32, 32]]), np.array([[32, 32]]),
          np.ones(1))
  with pytest.raises(ValueError, match="no exported program for canvas"):
    loaded(*args, canvas_hw=(32, 32))
  with pytest.raises(ValueError, match="no exported program for canvas None"):
    loaded(*args)   # two canvases: name one
  with pytest.raises(ValueError, match="exceeds the canvas"):
    loaded(*args[:2], np.array([[64, 64]]), args[3], canvas_hw=canvas)


def test_parse_canvases():
  assert export.parse_canvases(["608x800", "800X608"]) == ((608, 800), (800, 608))
  with pytest.raises(ValueError, match="HxW"):
    export.parse_canvases(["608"])
