"""The dataset-shaped measurement: a size mix on one fixed canvas against K chosen canvases.

Each canvas of every layout (`frcnn_jax.benchmarking.size_mix`) is compiled once, for the
training step and for inference, on a synthetic batch of one image per device of the canvas's
most frequent content size (zero padding beyond). All of them, and with the peer torchvision
at its own size for the most frequent sizes (batch 1, no canvas), are warmed up and then timed
in interleaved rounds (every program once per round), so that load changes hit all alike. A
layout's per-image seconds = sum over its canvases of (share of the mix) x (seconds per image
on that canvas).

Content MFU counts only useful FLOPs: XLA's count for a program whose canvas is exactly the
image (no padding), at a few content sizes (`size_mix.exact_flop_sizes`, plus any that equal
a canvas), the other sizes on the least-squares line in the pixel count through those
(`size_mix.pixel_line`); FLOPs x content fraction would undercount (the RoI head's FLOPs do not
shrink with the padding). torchvision's seconds for its untimed sizes lie on the same kind of
line through the timed ones.
"""

import itertools
import math
import statistics
from typing import Any

import jax
import ml_collections
import numpy as np

from frcnn_jax.benchmarking import cases
from frcnn_jax.benchmarking import flops
from frcnn_jax.benchmarking import machine
from frcnn_jax.benchmarking import mfu
from frcnn_jax.benchmarking import peer as peer_lib
from frcnn_jax.benchmarking import report
from frcnn_jax.benchmarking import size_mix
from frcnn_jax.benchmarking import timing
from frcnn_jax.data import canvases
from frcnn_jax.runtime import parallel

PARTS = cases.PARTS
TARGET_USEFUL_PIXELS = 0.90    # of the best layout with at most 4 canvases
TARGET_TRAIN_VS_SINGLE = 0.60  # training seconds per image of the fastest, over the single's


def run_mix(config: ml_collections.ConfigDict, plan: size_mix.MixPlan, *, dtype: str,
            steps: int, num_gt: int, peer: bool, peer_sizes: int, flop_sizes: int,
            peak_size: int) -> dict[str, Any]:
  """Measures a planned mix (module docstring); prints progress and the tables.

  Args:
    config: the experiment config.
    plan: the mix and its layouts (`size_mix.plan_mix`).
    dtype: compute dtype.
    steps: interleaved timed rounds.
    num_gt: ground-truth boxes per image.
    peer: also time torchvision (`peer.peer_runners`) at the `peer_sizes` most frequent sizes.
    peer_sizes: see `peer`.
    flop_sizes: XLA counts the useful FLOPs at this many of the most frequent sizes, plus the
      smallest and the largest.
    peak_size: matmul-peak matrix side (0: `mfu.matmul_peaks`' default).

  Returns:
    The JSON result: "mode" ("mix"), "mix", "dtype", "steps", "layouts" (one row per layout),
    "canvases" (per canvas), "useful_flops", "exact_flop_sizes", "peer", "matmul_peak",
    "machine", "targets".
  """
  load_start = timing.load_average()
  sizes, counts, layouts = plan.sizes, plan.counts, plan.layouts
  single_hw = layouts[0].canvases[0]
  contents = size_mix.canvas_contents(layouts, sizes, counts)
  print(f"mix: {plan.description}; {len(sizes)} distinct resized sizes "
        f"(data.min_size {config.data.min_size}, max_size {config.data.max_size})", flush=True)
  for layout in layouts:
    print(f"  {layout.name:<16} useful pixels {100 * layout.useful:5.1f}%  canvases " + ", ".join(
        f"{h}x{w} ({100 * s:.1f}%)" for (h, w), s in zip(layout.canvases, layout.shares)),
        flush=True)

  case = cases.Case(dtype, single_hw[0], single_hw[1], 1, int(config.rpn.post_nms_top_n_test),
                    PARTS)
  mesh = parallel.make_mesh()
  global_batch = mesh.devices.size
  peaks_before = mfu.matmul_peaks([dtype], peak_size)
  programs, state = cases.build(config, case, mesh)
  batch_for = lambda h, w, content=None: programs.global_batch(
      programs.host_batch(1, h, w, num_gt, content))
  holder = {"state": state}
  del state
  canvas_info, items = _compile_canvases(programs, holder, contents, batch_for)
  exact, useful = _useful_flops(programs, holder, canvas_info, sizes, counts, flop_sizes,
                                batch_for)

  peer_info: dict[str, Any] = {"available": False, "error": "not requested (--peer)"}
  peer_hw = [tuple(int(v) for v in s) for s in sizes[:peer_sizes]]
  if peer and peer_hw:
    peer_info = peer_lib.peer_runners(programs.config, peer_hw, dtype, num_gt)
    if peer_info["available"]:
      runners = peer_info.pop("runners")
      theirs = [(("peer", hw), (runners["train"][hw], runners["infer"][hw])) for hw in peer_hw]
      items = [x for pair in itertools.zip_longest(items, theirs) for x in pair if x]
  flat = [((*key, part), fn) for key, fns in items for part, fn in zip(PARTS, fns)]
  print(f"timing: {len(flat)} programs, one warm-up round then {steps} interleaved rounds "
        f"(load {load_start})", flush=True)
  runs = timing.interleaved_runs(flat, steps)
  peak = mfu.best_peaks(peaks_before, mfu.matmul_peaks([dtype], peak_size))[dtype]

  seconds = {part: {} for part in PARTS}
  cpu_seconds = {part: {} for part in PARTS}
  for (who, size, part), (walls, cpus) in runs.items():
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    if who == "ours":
      canvas_info[size].update({f"{part}_runs_s": walls, f"{part}_cpu_runs_s": cpus,
                                f"{part}_s": wall / global_batch,
                                f"{part}_cores_used": cpu / wall})
      seconds[part][size] = wall / global_batch
      cpu_seconds[part][size] = cpu / global_batch
    else:
      peer_info.setdefault("sizes", {}).setdefault(size, {}).update({
          f"{part}_runs_s": walls, f"{part}_s": wall, f"{part}_cores_used": cpu / wall})

  rows = _layout_rows(layouts, canvas_info, seconds, cpu_seconds, useful, peak, global_batch)
  if peer_info.get("sizes"):
    add_peer_mix(peer_info, rows, layouts, sizes, counts, seconds)
  info = machine.machine()
  info.update({"load_start": load_start, "load_end": timing.load_average()})
  result = {"mode": "mix", "mix": {"description": plan.description, "images": int(counts.sum()),
                                   "distinct_resized_sizes": len(sizes),
                                   "min_size": int(config.data.min_size),
                                   "max_size": int(config.data.max_size),
                                   "multiple": plan.multiple},
            "dtype": dtype, "steps": steps, "layouts": rows, "canvases": canvas_info,
            "useful_flops": useful,
            "exact_flop_sizes": {s: {"train": f[0], "infer": f[1]} for s, f in exact.items()},
            "peer": peer_info, "matmul_peak": peak, "machine": info,
            "targets": mix_targets(rows, peer_info)}
  print_mix(result)
  return result


def _compile_canvases(programs: cases.Programs, holder: dict[str, Any],
                      contents: dict[tuple[int, int], tuple[int, int]], batch_for):
  """Compiles both programs on every canvas: ({canvas: figures}, [(("ours", canvas),
  (run_train, run_infer))]); the runners wait for their results."""
  canvas_info: dict[tuple[int, int], dict[str, Any]] = {}
  items = []
  for canvas, content in contents.items():
    batch = batch_for(*canvas, content)
    train_c, train_s = timing.compile_timed(programs.train, holder["state"], batch)
    infer_c, infer_s = timing.compile_timed(programs.predict, holder["state"].params, batch)
    canvas_info[canvas] = {
        "content_hw": content, "train_compile_s": train_s, "infer_compile_s": infer_s,
        "train_flops_per_image": flops.program_flops(train_c),
        "infer_flops_per_image": flops.program_flops(infer_c),
        "train_program_mib": machine.program_mib(train_c),
        "infer_program_mib": machine.program_mib(infer_c)}
    print(f"compiled {canvas[0]}x{canvas[1]} (content {content[0]}x{content[1]}): "
          f"{train_s:.1f} s / {infer_s:.1f} s", flush=True)

    def run_train(compiled=train_c, batch=batch, canvas=canvas):
      holder["state"], metrics = compiled(holder["state"], batch)
      canvas_info[canvas]["train_finite"] = bool(jax.block_until_ready(metrics)["finite"])

    def run_infer(compiled=infer_c, batch=batch):
      jax.block_until_ready(compiled(holder["state"].params, batch))

    items.append((("ours", canvas), (run_train, run_infer)))
  return canvas_info, items


def _useful_flops(programs, holder, canvas_info, sizes, counts, flop_sizes, batch_for):
  """XLA's FLOPs at exact content sizes and the mix's mean useful FLOPs per image.

  FLOPs do not depend on image_hw (a runtime value), so a canvas equal to a content size gives
  that size's count; the others are compiled here, the rest of the mix lies on a line.

  Returns:
    ({size: (train FLOPs, infer FLOPs)}, {part: {"flops_per_image", "line_max_residual"}}).
  """
  exact = {}
  on_canvas = [s for s in map(tuple, sizes.tolist()) if s in canvas_info]
  for size in dict.fromkeys(size_mix.exact_flop_sizes(sizes, counts, flop_sizes) + on_canvas):
    if size in canvas_info:
      exact[size] = (canvas_info[size]["train_flops_per_image"],
                     canvas_info[size]["infer_flops_per_image"])
      continue
    batch = batch_for(*size)
    exact[size] = (
        flops.program_flops(timing.compile_timed(programs.train, holder["state"], batch)[0]),
        flops.program_flops(timing.compile_timed(programs.predict, holder["state"].params,
                                                 batch)[0]))
  useful = {}
  for i, part in enumerate(PARTS):
    known = {s: f[i] for s, f in exact.items() if f[i] is not None}
    if known:
      per_size, residual = size_mix.pixel_line(known, sizes)
      useful[part] = {"flops_per_image": size_mix.mix_mean(per_size, counts),
                      "line_max_residual": residual}
  print(f"useful FLOPs: XLA's count at content sizes {sorted(exact)}; mix mean "
        + ", ".join(f"{p} {u['flops_per_image'] / 1e9:.1f} GFLOP/image" for p, u in
                    useful.items()), flush=True)
  return exact, useful


def _layout_rows(layouts, canvas_info, seconds, cpu_seconds, useful, peak, global_batch
                 ) -> list[dict[str, Any]]:
  """One row per layout: seconds per image, content MFU (wall and CPU time), vs the single."""
  rows = []
  for layout in layouts:
    row = {"layout": layout.name, "canvases": layout.canvases, "shares": layout.shares,
           "useful_pixels": layout.useful}
    for part in PARTS:
      row[f"{part}_s_per_image"] = size_mix.layout_per_image(layout, seconds[part])
      cpu = size_mix.layout_per_image(layout, cpu_seconds[part])
      u = useful.get(part)   # per device: each device's program holds one image
      row[f"{part}_content_mfu"] = (u and u["flops_per_image"] / (
          row[f"{part}_s_per_image"] * global_batch) / peak["flops_per_s"])
      row[f"{part}_content_mfu_cpu_time"] = (u and u["flops_per_image"] / (cpu * global_batch)
                                             / peak["flops_per_cpu_s"])
      row[f"{part}_program_flops_per_image"] = sum(
          share * (canvas_info[cv][f"{part}_flops_per_image"] or math.nan)
          for cv, share in zip(layout.canvases, layout.shares))
    rows.append(row)
  for row in rows:
    for part in PARTS:
      row[f"{part}_vs_single"] = row[f"{part}_s_per_image"] / rows[0][f"{part}_s_per_image"]
  return rows


def add_peer_mix(peer_info: dict[str, Any], rows: list[dict[str, Any]],
                 layouts: list[size_mix.Layout], sizes: np.ndarray, counts: np.ndarray,
                 seconds: dict[str, dict[tuple[int, int], float]]) -> None:
  """torchvision's per-image seconds over the mix, and our speed-up over it per layout.

  torchvision was timed at the sizes in `peer_info["sizes"]` ({size: {"train_s", "infer_s"}});
  the other sizes' seconds lie on the line in the pixel count through those
  (`size_mix.pixel_line`). Adds to `peer_info` "timed_share" and per part "{part}_s_per_image",
  "{part}_line_max_residual" and "{part}_s_per_image_timed_sizes" (the timed sizes' images
  only, no line), and to each row "{part}_speedup_vs_peer" and
  "{part}_speedup_vs_peer_timed_sizes".
  """
  measured = peer_info["sizes"]
  timed = np.asarray([(int(h), int(w)) in measured for h, w in sizes])
  peer_info["timed_share"] = float(counts[timed].sum() / counts.sum())
  for part in PARTS:
    per_size, residual = size_mix.pixel_line({s: f[f"{part}_s"] for s, f in measured.items()},
                                             sizes)
    peer_info[f"{part}_s_per_image"] = size_mix.mix_mean(per_size, counts)
    peer_info[f"{part}_line_max_residual"] = residual
    peer_info[f"{part}_s_per_image_timed_sizes"] = size_mix.mix_mean(per_size, counts, timed)
    for layout, row in zip(layouts, rows):
      index = canvases.assign_canvases(sizes, layout.canvases)
      ours = np.asarray([seconds[part][layout.canvases[i]] for i in index])
      row[f"{part}_speedup_vs_peer"] = peer_info[f"{part}_s_per_image"] / row[
          f"{part}_s_per_image"]
      row[f"{part}_speedup_vs_peer_timed_sizes"] = (
          peer_info[f"{part}_s_per_image_timed_sizes"] / size_mix.mix_mean(ours, counts, timed))


def mix_targets(rows: list[dict[str, Any]], peer_info: dict[str, Any]) -> dict[str, Any]:
  """The mix's targets over the layouts with at most 4 canvases ({} when there are none).

  Returns:
    {"useful_pixels": the best layout's useful fraction >= TARGET_USEFUL_PIXELS,
     "train_vs_single": the fastest layout's training time over the single canvas's <=
     TARGET_TRAIN_VS_SINGLE, and where torchvision was timed "train_vs_torchvision": the
     fastest layout's speed-up > 1}, each {"layout", "value", "target", "met"}.
  """
  chosen = [r for r in rows[1:] if len(r["canvases"]) <= 4]
  if not chosen:
    return {}
  best_useful = max(chosen, key=lambda r: r["useful_pixels"])
  fastest = min(chosen, key=lambda r: r["train_s_per_image"])
  out = {"useful_pixels": {"layout": best_useful["layout"],
                           "value": best_useful["useful_pixels"],
                           "target": f">= {TARGET_USEFUL_PIXELS:.2f}",
                           "met": best_useful["useful_pixels"] >= TARGET_USEFUL_PIXELS},
         "train_vs_single": {"layout": fastest["layout"], "value": fastest["train_vs_single"],
                             "target": f"<= {TARGET_TRAIN_VS_SINGLE:.2f}",
                             "met": fastest["train_vs_single"] <= TARGET_TRAIN_VS_SINGLE}}
  if "train_s_per_image" in peer_info:
    out["train_vs_torchvision"] = {
        "layout": fastest["layout"], "value": fastest["train_speedup_vs_peer"],
        "target": "> 1 (speed-up)", "met": fastest["train_speedup_vs_peer"] > 1}
  return out


def print_mix(result: dict[str, Any]) -> None:
  """Prints the per-canvas table, the per-layout table, torchvision's sizes and the targets."""
  fmt = report.fmt
  print(f"\nmatmul peak {result['dtype']}: {result['matmul_peak']['flops_per_s'] / 1e9:.1f} "
        f"GFLOP/s ({result['matmul_peak']['flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second)")
  print(f"\n{'canvas':>10} {'content':>9} | {'train s/im':>10} {'infer s/im':>10} | "
        f"{'GFLOP/im tr/inf':>16} | {'compile s':>11} | {'cores':>9} | finite")
  for (h, w), p in result["canvases"].items():
    gflop = "/".join(fmt(p[f"{q}_flops_per_image"] and p[f"{q}_flops_per_image"] / 1e9, ".1f")
                     for q in PARTS)
    print(f"{h:>5}x{w:<4} {p['content_hw'][0]:>4}x{p['content_hw'][1]:<4} | "
          f"{p['train_s']:>10.3f} {p['infer_s']:>10.3f} | {gflop:>16} | "
          f"{p['train_compile_s']:>5.1f}/{p['infer_compile_s']:<5.1f} | "
          f"{p['train_cores_used']:>4.2f}/{p['infer_cores_used']:<4.2f} | "
          f"{p.get('train_finite')}")
  peer = result["peer"]
  print(f"\n{'layout':<16} {'useful px':>9} | {'train s/im':>10} {'x single':>8} | "
        f"{'infer s/im':>10} {'x single':>8} | {'content MFU tr/inf':>18} | "
        f"{'CPU-time':>11} | {'vs torchvision tr/inf':>21} | canvases (share)")
  for r in result["layouts"]:
    mfu_text = "/".join(fmt(r[f"{q}_content_mfu"] and 100 * r[f"{q}_content_mfu"], ".1f")
                        for q in PARTS)
    cpu_mfu = "/".join(fmt(r[f"{q}_content_mfu_cpu_time"]
                           and 100 * r[f"{q}_content_mfu_cpu_time"], ".1f") for q in PARTS)
    vs = "/".join(fmt(r.get(f"{q}_speedup_vs_peer"), ".2f") for q in PARTS)
    print(f"{r['layout']:<16} {100 * r['useful_pixels']:>8.1f}% | "
          f"{r['train_s_per_image']:>10.3f} {r['train_vs_single']:>8.2f} | "
          f"{r['infer_s_per_image']:>10.3f} {r['infer_vs_single']:>8.2f} | "
          f"{mfu_text + '%':>18} | {cpu_mfu + '%':>11} | {vs + 'x':>21} | " + ", ".join(
              f"{h}x{w} ({100 * s:.0f}%)" for (h, w), s in zip(r["canvases"], r["shares"])))
  if "train_s_per_image" in peer:
    print(f"{'torchvision':<16} {'100.0%':>9} | {peer['train_s_per_image']:>10.3f} "
          f"{'':>8} | {peer['infer_s_per_image']:>10.3f} {'':>8} | (each image at its own "
          f"size; timed at {len(peer['sizes'])} sizes = {100 * peer['timed_share']:.1f}% of "
          f"the images, the rest on a line in pixels)")
    for (h, w), f in peer["sizes"].items():
      print(f"  torchvision {h}x{w}: train {f['train_s']:.3f} s, infer {f['infer_s']:.3f} s "
            f"(cores {f['train_cores_used']:.2f}/{f['infer_cores_used']:.2f})")
  elif peer.get("error"):
    print(f"torchvision: not measured ({peer['error']})")
  for name, t in result["targets"].items():
    print(f"target {name}: {t['layout']} {t['value']:.3f} ({t['target']}): "
          f"{'met' if t['met'] else 'NOT met'}")
  print(f"load average (1, 5, 15 min): start {result['machine']['load_start']}, end "
        f"{result['machine']['load_end']}")
