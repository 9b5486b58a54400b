"""The peer alone: torchvision's Faster R-CNN built like ours, timed on this machine.

  python scripts/peer_torchvision.py [--backbone vgg16|zf|resnet_c4|resnet_fpn] [--depth 50]
      [--height 600 --width 800] [--batch 1] [--steps 3] [--dtype float32|bfloat16]
      [--device cpu|cuda] [--threads N]

Needs torch and torchvision (`pip install torch torchvision`; without them the command exits
with a message saying so). The model and what is timed: `frcnn_jax.benchmarking.torchvision_frcnn`
(`scripts/benchmark.py --peer` times it beside our rows), with the default numbers of
`torchvision_frcnn.DetectorArgs` and of each backbone's builder (`--depth`: resnet_c4's 50 or
101; an experiment's own numbers: `scripts/benchmark.py --config X --peer`). Prints one summary
line, then one JSON object (`torchvision_frcnn.measure`'s figures).
"""

import argparse
import json

from frcnn_jax.benchmarking import torchvision_frcnn


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--backbone", choices=torchvision_frcnn.PEERS, default="vgg16")
  parser.add_argument("--depth", type=int, choices=(50, 101), default=None,
                      help="resnet_c4's depth (default 50)")
  parser.add_argument("--height", type=int, default=600)
  parser.add_argument("--width", type=int, default=800)
  parser.add_argument("--batch", type=int, default=1, help="images per step")
  parser.add_argument("--steps", type=int, default=3, help="timed runs (median)")
  parser.add_argument("--dtype", choices=torchvision_frcnn.DTYPES, default="float32")
  parser.add_argument("--device", choices=("cpu", "cuda"), default=None)
  parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
  parser.add_argument("--num_classes", type=int, default=20)
  args = parser.parse_args()
  arch = {"backbone": args.backbone}
  if args.depth is not None:
    if args.backbone != "resnet_c4":
      parser.error("--depth is resnet_c4's")
    arch["depth"] = args.depth
  if args.backbone == "resnet_fpn":   # one anchor size per map, torchvision's own
    arch["detector"] = torchvision_frcnn.DetectorArgs(
        anchor_sizes=torchvision_frcnn.FPN_ANCHOR_SIZES)
  try:
    result = torchvision_frcnn.measure(
        torchvision_frcnn.random_batch(args.batch, args.height, args.width,
                                       num_classes=args.num_classes),
        steps=args.steps, dtype=args.dtype, num_classes=args.num_classes, device=args.device,
        threads=args.threads, **arch)
  except torchvision_frcnn.PeerUnavailable as e:
    raise SystemExit(f"error: {e}") from e
  print(f"torchvision {args.backbone} train step: {result['train_step_s']:.3f} s/image, "
        f"inference: {result['infer_s']:.3f} s/image ({result['device']}, {result['dtype']})")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
