"""The documentation names only what exists.

README.md and docs/*.md: every relative link (and its #anchor), every repository path
(`frcnn_jax/...`, `scripts/...`, `experiments/...`, `docs/...`, `benchmarks/...`, `tests/...`),
every `python -m frcnn_jax.X` module, every `--config.a.b=...` key (in the default config or in
the experiment named on the same line) and every config key written alone in backticks
(`model.vgg16.width`). The `--help` of every documented command that `.ci/commands` does not
already run is run here, one subprocess each. Docstrings and comments of `frcnn_jax/`,
`scripts/` and `experiments/` cite only repository files that exist. The checkers are plain
functions of a string, tested on planted mistakes first.
"""

import ast
import io
import itertools
import os
import pathlib
import re
import subprocess
import sys
import tokenize

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SOURCES = sorted([*(ROOT / "frcnn_jax").rglob("*.py"), *(ROOT / "scripts").glob("*.py"),
                  *(ROOT / "experiments").rglob("*.py")])
SECTIONS = ("seed", "data", "model", "anchors", "rpn", "roi", "test", "loss", "train", "eval",
            "alt_opt")

_LINK = re.compile(r"\]\(([^)\s]+)\)")
_PREFIXES = r"(?:frcnn_jax|scripts|experiments|docs|benchmarks|tests|\.ci)"
# A repository path: a known top folder, then path characters; `{a,b}` alternatives allowed.
_PATH = re.compile(r"(?<![\w/.~$-])(" + _PREFIXES + r"/[\w./{},*-]*[\w}/*])")
_ROOT_FILE = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]*\.md)\b")
_MODULE = re.compile(r"python3? -m (frcnn_jax(?:\.\w+)*)(?![\w.<])")
_SCRIPT = re.compile(r"(?<![\w/.-])(scripts/\w+\.py)")
_CONFIG_FLAG = re.compile(r"--config\.(\w[\w.]*)=")
# A line that selects a part by name (`--config.model.backbone=my_net`) may set that part's keys.
_PART_CHOICE = re.compile(r"--config\.(model\.backbone|model\.roi_head|data\.name)=(\w+)")
_EXPERIMENT = re.compile(r"(?<![\w/.-])(experiments/[\w/]+\.py)")
_KEY_IN_BACKTICKS = re.compile(r"`((?:" + "|".join(SECTIONS) + r")(?:\.\w+)+)(?:=[^`]*)?`")
_FILE_SUFFIXES = {"lock", "log", "json", "jsonl", "md", "py", "csv", "npz", "png", "txt"}
_DOCSTRING_SUFFIXES = {".py", ".md", ".txt", ".toml", ".sh"}


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces -> '-'."""
  text = re.sub(r"`|\*\*|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
  """The anchors of a markdown text's headings (repeats get -1, -2, ... as on GitHub)."""
  seen, out = {}, set()
  in_code = False
  for line in markdown.splitlines():
    if line.startswith("```"):
      in_code = not in_code
    m = None if in_code else re.match(r"#{1,6} (.+)", line)
    if m:
      base = github_anchor(m.group(1))
      n = seen.get(base, 0)
      seen[base] = n + 1
      out.add(base if n == 0 else f"{base}-{n}")
  return out


def expand(path: str) -> list[str]:
  """`a/{b,c}.py` -> [`a/b.py`, `a/c.py`]."""
  parts = re.split(r"\{([^{}]*)\}", path)
  choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
  return ["".join(c) for c in itertools.product(*choices)]


def _placeholder(path: str) -> bool:
  """`experiments/X.py`, `frcnn_jax/**/*.py`, `runs/<name>`, or a file of the docs' example
  plug-ins (`my_net`, `scripts/convert_my_net.py`): not one real file."""
  stems = [pathlib.PurePosixPath(p).stem for p in path.split("/") if p]
  return "*" in path or "..." in path or "<" in path or any(
      re.fullmatch(r"[A-Z]", s) or re.search(r"(?:^|_)my_", s) for s in stems)


def missing_paths(text: str, root: pathlib.Path, *, base: pathlib.Path | None = None,
                  suffixes: set[str] | None = None) -> list[str]:
  """Repository paths and relative links named in `text` that do not exist under `root`.

  Args:
    text: markdown or a docstring.
    root: the repository root (paths like `frcnn_jax/x.py` are relative to it).
    base: the folder relative links are relative to (None: `text` is no markdown file, its
      links are not checked).
    suffixes: check only paths with one of these file suffixes (or ending in "/"); None: all.
  """
  bad = []
  for match in _PATH.finditer(text):
    for path in expand(match.group(1).rstrip(".,")):
      if _placeholder(path):
        continue
      if suffixes is not None and not (path.endswith("/")
                                       or pathlib.PurePosixPath(path).suffix in suffixes):
        continue
      if not (root / path).exists():
        bad.append(path)
  for match in _ROOT_FILE.finditer(text):   # a bare `NAME.md`: at the root or one folder down
    name = match.group(1)
    if not ((root / name).exists() or any(root.glob(f"*/{name}"))):
      bad.append(name)
  if base is not None:
    for match in _LINK.finditer(text):
      target = match.group(1)
      if re.match(r"[a-z]+:", target):
        continue
      file, _, anchor = target.partition("#")
      path = (base / file).resolve() if file else None
      if path is not None and not path.exists():
        bad.append(target)
      elif anchor and (path is None or path.suffix == ".md"):
        text_of = path.read_text() if path is not None else text
        if anchor not in anchors(text_of):
          bad.append(target)
  return sorted(set(bad))


def modules_named(text: str) -> set[str]:
  """The `python -m frcnn_jax...` modules of `text`, placeholders (`frcnn_jax.X`) left out."""
  return {m for m in _MODULE.findall(text) if not re.fullmatch(r"[A-Z]", m.rsplit(".", 1)[-1])}


def missing_modules(text: str, root: pathlib.Path) -> list[str]:
  """`python -m frcnn_jax.X` modules named in `text` with no file to run."""
  bad = []
  for name in modules_named(text):
    path = root / name.replace(".", "/")
    if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
      bad.append(name)
  return sorted(bad)


def _joined_lines(text: str) -> list[str]:
  """Lines with shell continuations (backslash-newline) joined."""
  return re.sub(r"\\\n\s*", " ", text).splitlines()


def config_keys(path: str | None) -> set[str]:
  """Every dotted key of the default config, or of the experiment file `path`."""
  from frcnn_jax.config import defaults  # pylint: disable=g-import-not-at-top
  from frcnn_jax.config import flags as config_flags  # pylint: disable=g-import-not-at-top
  from frcnn_jax.config import run  # pylint: disable=g-import-not-at-top
  config = (defaults.get_config() if path is None
            else config_flags.load_module(str(ROOT / path)).get_config())
  return set(run.flatten(config))


def unknown_config_flags(text: str, keys_of) -> list[str]:
  """`--config.a.b=...` keys in `text` that neither the default config nor the experiment named
  on their line has (a line that selects a part, `--config.model.backbone=my_net`, may set
  that part's `model.my_net.*`). `keys_of(None | experiment path)` gives a config's keys."""
  bad = []
  for line in _joined_lines(text):
    keys = set(keys_of(None))
    for experiment in _EXPERIMENT.findall(line):
      if not _placeholder(experiment):
        keys |= keys_of(experiment)
    parts = tuple(f"{section.split('.')[0]}.{name}."
                  for section, name in _PART_CHOICE.findall(line))
    bad += [k for k in _CONFIG_FLAG.findall(line)
            if k not in keys and not (parts and k.startswith(parts))]
  return bad


def unknown_backticked_keys(text: str, keys: set[str]) -> list[str]:
  """Config keys (or sections) written alone in backticks, `model.vgg16.width`, that do not
  exist. File names like `train.log` are not keys; a paragraph about the legacy key names
  (one that says "legacy") may name them."""
  bad = []
  paragraphs = re.split(r"\n\s*\n", text)
  for key in itertools.chain.from_iterable(
      _KEY_IN_BACKTICKS.findall(p) for p in paragraphs if "legacy" not in p):
    if key.rsplit(".", 1)[-1] in _FILE_SUFFIXES:
      continue
    if key not in keys and not any(k.startswith(key + ".") for k in keys):
      bad.append(key)
  return bad


def docstrings_and_comments(source: str) -> str:
  """The docstrings and comments of a Python file, joined."""
  texts = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=False)
      if doc:
        texts.append(doc)
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      texts.append(token.string)
  return "\n".join(texts)


# --- The checkers on planted mistakes. ---


def test_checkers_catch_planted_mistakes(tmp_path):
  (tmp_path / "docs").mkdir()
  (tmp_path / "frcnn_jax").mkdir()
  (tmp_path / "frcnn_jax" / "train.py").write_text("")
  (tmp_path / "docs" / "a.md").write_text("# Intro\n## The `x` key: why?\n")
  text = ("see `frcnn_jax/train.py`, `frcnn_jax/nope.py`, `frcnn_jax/{train,gone}.py`, "
          "`experiments/X.py` (a placeholder), `scripts/convert_my_net.py` (an example), "
          "DESIGN.md, [a](docs/a.md#intro), [b](docs/a.md#the-x-key-why), "
          "[c](docs/a.md#missing), [d](docs/none.md), "
          "[e](https://example.com/x.md)\n"
          "python -m frcnn_jax.train; python -m frcnn_jax.gone\n")
  assert missing_paths(text, tmp_path, base=tmp_path) == [
      "DESIGN.md", "docs/a.md#missing", "docs/none.md", "frcnn_jax/gone.py",
      "frcnn_jax/nope.py"]
  assert missing_modules(text, tmp_path) == ["frcnn_jax.gone"]
  # Docstrings: only paths with a file suffix (output folders are not checked).
  assert missing_paths("writes benchmarks/out/ and benchmarks/accel, reads docs/x.md",
                       tmp_path, suffixes={".md"}) == ["benchmarks/out/", "docs/x.md"]

  keys = {None: {"model.vgg16.width", "train.num_steps", "model.backbone"},
          "experiments/e.py": {"model.vgg16.width", "data.e.root"}}
  flags_text = ("--config.model.vgg16.width=0.5 --config.model.width=1\n"
                "--config experiments/e.py --config.data.e.root=x \\\n  --config.train.steps=1\n"
                "--config.data.e.root=y\n"
                "--config.model.backbone=my_net --config.model.my_net.depth=3 "
                "--config.model.other.depth=3\n")
  assert unknown_config_flags(flags_text, keys.get) == [
      "model.width", "train.steps", "data.e.root", "model.other.depth"]
  assert unknown_backticked_keys(
      "`model.vgg16.width`, `model.vgg16`, `model.anchor_sizes`, `train.lock`, "
      "`train.num_steps=10`, `boxes.iou`\n\nthe legacy `model.width`", keys[None]) == [
          "model.anchor_sizes"]
  assert missing_modules("python -m frcnn_jax.X, python -m frcnn_jax.<name>", tmp_path) == []

  source = ('"""Module: see CONTRACTS.md and frcnn_jax/train.py."""\n'
            "def f():\n  '''Uses docs/conventions.md.'''\n  # docs/gone.md\n")
  assert missing_paths(docstrings_and_comments(source), tmp_path,
                       suffixes={".md", ".py"}) == ["CONTRACTS.md", "docs/conventions.md",
                                                    "docs/gone.md"]
  assert github_anchor("CPU: 2026-11-30, the mix (issue 11)") == "cpu-2026-11-30-the-mix-issue-11"


# --- The repository. ---


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_paths_links_and_modules_exist(doc):
  text = doc.read_text()
  assert not missing_paths(text, ROOT, base=doc.parent), doc.name
  assert not missing_modules(text, ROOT), doc.name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_config_keys_exist(doc):
  cache = {}

  def keys_of(path):
    if path not in cache:
      cache[path] = config_keys(path)
    return cache[path]

  text = doc.read_text()
  assert not unknown_config_flags(text, keys_of), doc.name
  assert not unknown_backticked_keys(text, keys_of(None)), doc.name


def test_docstrings_cite_existing_files():
  bad = {}
  for path in SOURCES:
    missing = missing_paths(docstrings_and_comments(path.read_text()), ROOT,
                            suffixes=_DOCSTRING_SUFFIXES)
    if missing:
      bad[str(path.relative_to(ROOT))] = missing
  assert not bad


def _ci_help_commands() -> set[str]:
  """The commands whose `--help` `.ci/commands` runs (its `for command in ...` list)."""
  text = (ROOT / ".ci" / "commands").read_text()
  listed = re.search(r"for command in (.*?); do", text, re.S).group(1)
  return {re.sub(r"^-m ", "", c) for c in re.findall(r'"([^"]+)"', listed)}


def _documented_commands() -> list[str]:
  found = set()
  for doc in DOCS:
    text = doc.read_text()
    found.update(modules_named(text))
    found.update(s for s in _SCRIPT.findall(text) if not _placeholder(s))
  return sorted(found - _ci_help_commands())


def test_ci_lists_its_commands():
  assert {"frcnn_jax.train", "scripts/benchmark.py"} <= _ci_help_commands()


@pytest.mark.parametrize("command", _documented_commands())
def test_documented_command_help_runs(command):
  argv = [sys.executable, *(["-m", command] if command.startswith("frcnn_jax") else [command]),
          "--help"]
  done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip()
