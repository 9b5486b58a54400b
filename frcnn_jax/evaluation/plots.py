"""Precision-recall plots (PNG) of per-class evaluation results.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend state), so it
works headless and from any thread.
"""

import math
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _safe_name(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "class"


def plot_pr_curve(path: str | pathlib.Path, precision: np.ndarray, recall: np.ndarray,
                  title: str) -> None:
  """Writes one precision-recall curve with its monotone envelope.

  Args:
    path: output PNG path (parent folders are created).
    precision: [N] precision after each ranked detection.
    recall: [N] recall after each ranked detection.
    title: plot title, e.g. "dog  AP 0.712".
  """
  fig = Figure(figsize=(4, 4), dpi=100)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  if len(recall):
    envelope = np.maximum.accumulate(np.asarray(precision)[::-1])[::-1]
    ax.plot(recall, precision, color="0.7", lw=1, label="precision")
    # The envelope's value at recall r_i holds on (r_{i-1}, r_i]: a "pre" step from 0.
    ax.step(np.concatenate([[0.0], recall]), np.concatenate([envelope[:1], envelope]),
            where="pre", color="C0", lw=1.5, label="envelope")
    ax.legend(loc="lower left")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("recall")
  ax.set_ylabel("precision")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)


def plot_pr_curves(out_dir: str | pathlib.Path, result: dict,
                   class_names: Sequence[str]) -> list[pathlib.Path]:
  """One PNG per class from a `frcnn_jax.evaluation.voc.evaluate` result.

  Args:
    out_dir: folder for the PNGs (created), named `<index>_<class>.png`.
    result: a VOC evaluation result with "ap", "precision" and "recall".
    class_names: C names; class_names[c - 1] is label c.

  Returns:
    The written paths, in class order.
  """
  out_dir = pathlib.Path(out_dir)
  paths = []
  for c, name in enumerate(class_names):
    ap = float(result["ap"][c])
    title = f"{name}  AP {ap:.3f}" if math.isfinite(ap) else f"{name}  (no ground truth)"
    path = out_dir / f"{c + 1:03d}_{_safe_name(name)}.png"
    plot_pr_curve(path, result["precision"][c], result["recall"][c], title)
    paths.append(path)
  return paths
