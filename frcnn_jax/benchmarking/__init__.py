"""The benchmarks' shared library; the commands in `scripts/` are thin layers over it.

Modules:
  timing: wall and process-CPU seconds, warm-up and compile kept apart from the timed runs,
    medians, interleaved rounds (A, B, A, B, ...) so that load changes hit every item alike.
  flops: XLA's FLOP count of a compiled program.
  mfu: the device's measured matmul peak and model FLOPs utilisation (MFU), also on content
    pixels only.
  machine: what ran a benchmark (CPU, devices, versions, XLA flags) and its memory figures.
  report: number formatting shared by the tables, and JSON-safe results.
  cases: the measured rows (dtype, canvas, batch, proposals), synthetic batches, and the
    detector and jitted programs a row is measured on.
  rows: one row measured (compile, images/s, FLOPs, memory) and the rows' table.
  torchvision_frcnn: torchvision's Faster R-CNN built like ours, for each of our backbones
    (vgg16, zf, resnet_c4, resnet_fpn), and timed on the same device.
  peer: that model configured from an experiment config (its backbone, numbers and the check
    that ours is the same architecture), beside our rows.
  backbones: each backbone against its torchvision peer, per image, interleaved in one run.
  size_mix: a dataset's size mix laid out on one fixed canvas or on K chosen canvases.
  mix: the dataset-shaped measurement over such a mix.
  hlo: HLO instructions of a compiled program, their scopes, stages and matmuls.
  stage_profile: a traced training step summarised per stage.
  budget: a run against a wall-clock budget (estimates, skips, watchdog, atomic outputs).
  accelerator: the one-shot accelerator check's items; accelerator_report: its targets and
    summary.
  conv_pool, detection_ops, input_pipeline: the convolution and pool gradient, detection-op
    and input-pipeline micro-benchmarks.
  grain_loader: the train and eval loaders' plans and tasks run through grain (needs the
    `grain` extra; compared with the project's worker pool).

Measured figures live in benchmarks/RESULTS.md, not here.
"""
