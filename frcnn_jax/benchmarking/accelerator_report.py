"""The accelerator check's targets and its human summary (summary.md).

Targets, over the bfloat16 rows: training at >= TARGET_MFU content MFU at the best batch;
inference >= TARGET_INFER_SPEEDUP x torchvision's images/s from the same run; no stage but the
matmuls above TARGET_STAGE_FRACTION of the step (every stage's non-matmul time and the
device's idle time).
"""

import math
from typing import Any

from frcnn_jax.benchmarking import report
from frcnn_jax.benchmarking import stage_profile

TARGET_MFU = 0.40
TARGET_INFER_SPEEDUP = 3.0
TARGET_STAGE_FRACTION = 0.15
_pct = report.pct


def evaluate_targets(result: dict[str, Any]) -> None:
  """Sets result["targets"] from its "rows" and "profile".

  Each measured target is {"value", "target", "met", and "at" (canvas and batch) or "what"
  (the stage)}: "train_mfu_content_best", "infer_speedup_vs_torchvision_best" (also "all":
  every row's speed-up) and "largest_non_matmul_share"; unmeasured ones are absent.
  """
  rows = [r for r in result["rows"] if r["dtype"] == "bfloat16"]
  targets = {}
  mfus = [(r["train_mfu_content"], r) for r in rows if r.get("train_mfu_content") is not None]
  if mfus:
    best, row = max(mfus, key=lambda m: m[0])
    targets["train_mfu_content_best"] = {
        "value": best, "target": TARGET_MFU, "met": best >= TARGET_MFU,
        "at": f"{row['height']}x{row['width']} batch {row['batch']}"}
  speedups = [(r["infer_speedup_vs_peer"], r) for r in rows if r.get("infer_speedup_vs_peer")]
  if speedups:
    best, row = max(speedups, key=lambda m: m[0])
    targets["infer_speedup_vs_torchvision_best"] = {
        "value": best, "target": TARGET_INFER_SPEEDUP, "met": best >= TARGET_INFER_SPEEDUP,
        "at": f"{row['height']}x{row['width']} batch {row['batch']}",
        "all": {f"{r['height']}x{r['width']} b{r['batch']}": s for s, r in speedups}}
  if result.get("profile") and result["profile"].get("stages"):
    what, fraction = stage_profile.worst_non_matmul(result["profile"])
    targets["largest_non_matmul_share"] = {
        "value": fraction, "target": TARGET_STAGE_FRACTION,
        "met": fraction <= TARGET_STAGE_FRACTION, "what": what}
  result["targets"] = targets


def summarise(result: dict[str, Any]) -> str:
  """`evaluate_targets`, then the `markdown` summary (the budget.Run's `summarise` hook)."""
  evaluate_targets(result)
  return markdown(result)


def _targets(result: dict[str, Any]) -> list[str]:
  lines = ["## Targets", ""]
  names = {"train_mfu_content_best": "bf16 training MFU on content pixels, best batch",
           "infer_speedup_vs_torchvision_best": "inference images/s vs torchvision",
           "largest_non_matmul_share": "largest non-matmul share of the step"}
  for key, label in names.items():
    t = result["targets"].get(key)
    if not t:
      lines.append(f"- {label}: not measured")
      continue
    value = f"{t['value']:.2f}x" if "speedup" in key else _pct(t["value"])
    target = (f">= {t['target']:.0f}x" if "speedup" in key else
              (f"<= {_pct(t['target'])}" if "share" in key else f">= {_pct(t['target'])}"))
    where = t.get("at") or t.get("what")
    lines.append(f"- {label}: **{value}** ({where}); target {target}: "
                 f"{'met' if t['met'] else 'NOT met'}")
  return lines


def _rows(result: dict[str, Any]) -> list[str]:
  f = report.fmt
  lines = ["", "## Rows (per device; s/im over the global batch)", "",
           "| dtype | canvas | content | b/dev | train im/s | infer im/s | compile s tr/inf | "
           "GFLOP/im tr | MFU tr/inf | content MFU tr/inf | vs torchvision tr/inf | prog MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    lines.append(
        f"| {r['dtype']} | {r['height']}x{r['width']} | {r['content_hw'][0]}x"
        f"{r['content_hw'][1]} | {r['batch']} | {f(r['train_images_per_s'], '.1f')} | "
        f"{f(r['infer_images_per_s'], '.1f')} | {f(r['train_compile_s'], '.0f')}/"
        f"{f(r['infer_compile_s'], '.0f')} | "
        f"{f(r['train_flops_per_image'] and r['train_flops_per_image'] / 1e9, '.0f')} | "
        f"{_pct(r.get('train_mfu'))}/{_pct(r.get('infer_mfu'))} | "
        f"{_pct(r.get('train_mfu_content'))}/{_pct(r.get('infer_mfu_content'))} | "
        f"{f(r.get('train_speedup_vs_peer'), '.2f')}x/{f(r.get('infer_speedup_vs_peer'), '.2f')}x"
        f" | {f(r['train_program_mib'], '.0f')} |")
  peer_info = result["peer"]
  lines += ["", f"torchvision: {'measured' if peer_info.get('available') else 'not measured'}"
            + (f" ({peer_info.get('error')})" if peer_info.get("error") else "")]
  for key, figures in peer_info.get("results", {}).items():
    key = "x".join(map(str, key)) if isinstance(key, tuple) else key
    if "error" in figures:
      lines.append(f"- {key}: {figures['error'][:200]}")
    else:
      lines.append(f"- {key}: train {1 / figures['train_step_s']:.1f} im/s, infer "
                   f"{1 / figures['infer_s']:.1f} im/s")
  return lines


def _profile(p: dict[str, Any] | None) -> list[str]:
  lines = ["", "## Training step per stage", ""]
  if not p:
    return lines + ["not measured"]
  lines.append(f"{p['dtype']} {p['height']}x{p['width']} batch {p['batch']}, "
               f"source: {p.get('source', '-')} ({p.get('timeline', '-')} timeline); step "
               f"{1e3 * p.get('wall_step_s', math.nan):.1f} ms wall, device busy "
               f"{1e3 * (p.get('device_busy_s') or math.nan):.1f} ms (idle "
               f"{_pct(p.get('idle_fraction'))}); host->device input transfer "
               f"{1e3 * p.get('input_transfer_s', math.nan):.1f} ms per step if not "
               f"prefetched")
  lines += ["", "| stage | ms/step | share | matmul ms | other ms | other share |",
            "|---|---|---|---|---|---|"]
  ms = lambda v: "-" if v is None else f"{1e3 * v:.2f}"
  for name, s in p.get("stages", {}).items():
    lines.append(f"| {name} | {ms(s['s'])} | {_pct(s['fraction'])} | {ms(s['matmul_s'])} | "
                 f"{ms(s['other_s'])} | {_pct(s['other_fraction'])} |")
  if p.get("top_ops"):
    lines += ["", "Top ops:", ""]
    for o in p["top_ops"][:12]:
      lines.append(f"- {1e3 * o['s_per_step']:.2f} ms {o['hlo_op']} [{o['stage']}"
                   f"{', matmul' if o['matmul'] else ''}] `{o['op_name'][-120:]}`")
  return lines


def markdown(result: dict[str, Any]) -> str:
  """The human summary: machine, targets, rows, torchvision, profile, determinism, skips.

  Args:
    result: the check's result (`budget.Run.result` with "machine", "rows", "peer",
      "profile", "determinism", "matmul_peak" and evaluated "targets").
  """
  m = result.get("machine", {})
  lines = [f"# Accelerator check, {result['date_utc']} UTC", "",
           f"- device: {m.get('device', '?')} x {m.get('num_devices', '?')}; CPU "
           f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores)",
           f"- jax {m.get('jax', '?')}, jaxlib {m.get('jaxlib', '?')}, platform "
           f"{m.get('platform_version', '?')}, plugin "
           f"{m.get('jax-cuda13-plugin') or m.get('jax-cuda12-plugin') or '-'}; flax "
           f"{m.get('flax', '?')}; torch {m.get('torch', '-')} (CUDA {m.get('torch_cuda', '-')}),"
           f" torchvision {m.get('torchvision', '-')}",
           f"- XLA_FLAGS: `{m.get('xla_flags', '')}`",
           f"- command: `{result['command']}`",
           f"- elapsed {result.get('elapsed_s', 0):.0f} s of {result['budget_s']:.0f} s; "
           f"complete: {result['complete']}", ""]
  lines += _targets(result)
  peaks = result.get("matmul_peak", {})
  if peaks:
    lines += ["", "Matmul peak: " + ", ".join(
        f"{d} {p['flops_per_s'] / 1e12:.1f} TFLOP/s" for d, p in peaks.items())]
  lines += _rows(result)
  lines += _profile(result.get("profile"))
  lines += ["", "## Determinism flags (child process, same case)", ""]
  for d in result["determinism"] or [{"xla_flags": "not measured"}]:
    if "error" in d:
      lines.append(f"- `{d['xla_flags']}`: failed: {d['error'][-300:]}")
    elif "train_step_s" in d:
      lines.append(f"- `{d['xla_flags']}`: train x{d.get('train_step_s_vs_default', math.nan):.2f}"
                   f", infer x{d.get('infer_s_vs_default', math.nan):.2f} the default's time "
                   f"(compile {d.get('compile_s') or math.nan:.0f} s)")
    else:
      lines.append(f"- {d['xla_flags']}")
  if result["skipped"] or result["errors"]:
    lines += ["", "## Skipped / errors", ""]
    lines += [f"- skipped: {s}" for s in result["skipped"]]
    lines += [f"- error: {e[:500]}" for e in result["errors"]]
  return "\n".join(lines) + "\n"
