"""frcnn_jax.benchmarking.mix: per-layout times, torchvision over the mix, the targets."""

import pytest

from frcnn_jax.benchmarking import mix
from frcnn_jax.benchmarking import size_mix
from tests.benchmarking import test_size_mix


def test_mix_time_speedups_and_targets_hand_computed():
  plan = size_mix.plan_mix(test_size_mix.mix_config(), test_size_mix.MIX, [1, 2], (96, 96), 32)
  train = {(96, 96): 6.0, (64, 96): 3.0, (96, 64): 4.0}
  infer = {(96, 96): 2.0, (64, 96): 1.0, (96, 64): 1.5}
  single, _, k2 = plan.layouts
  assert size_mix.layout_per_image(single, train) == 6.0
  assert size_mix.layout_per_image(k2, train) == pytest.approx(5 / 6 * 3.0 + 1 / 6 * 4.0)
  rows = [{"layout": l.name, "canvases": l.canvases, "useful_pixels": l.useful,
           "train_s_per_image": size_mix.layout_per_image(l, train),
           "infer_s_per_image": size_mix.layout_per_image(l, infer)} for l in plan.layouts]
  for row in rows:
    row["train_vs_single"] = row["train_s_per_image"] / 6.0
  # torchvision timed at 64x96 and 64x64 only; 96x64 (6144 pixels) lies on their line.
  peer = {"sizes": {(64, 96): {"train_s": 7.0, "infer_s": 2.0},
                    (64, 64): {"train_s": 5.0, "infer_s": 1.0}}}
  mix.add_peer_mix(peer, rows, plan.layouts, plan.sizes, plan.counts,
                   {"train": train, "infer": infer})
  assert peer["timed_share"] == pytest.approx(5 / 6)
  assert peer["train_s_per_image"] == pytest.approx((3 * 7.0 + 2 * 5.0 + 7.0) / 6)
  assert peer["train_s_per_image_timed_sizes"] == pytest.approx((3 * 7.0 + 2 * 5.0) / 5)
  assert peer["infer_s_per_image"] == pytest.approx((3 * 2.0 + 2 * 1.0 + 2.0) / 6)
  assert rows[2]["train_speedup_vs_peer"] == pytest.approx(
      peer["train_s_per_image"] / (5 / 6 * 3.0 + 1 / 6 * 4.0))
  assert rows[2]["train_speedup_vs_peer_timed_sizes"] == pytest.approx(
      peer["train_s_per_image_timed_sizes"] / 3.0)   # the timed sizes all sit on 64x96
  targets = mix.mix_targets(rows, peer)
  assert targets["useful_pixels"] == {"layout": "K=2", "value": pytest.approx(8 / 9),
                                      "target": ">= 0.90", "met": False}
  assert targets["train_vs_single"]["value"] == pytest.approx((5 / 6 * 3 + 4 / 6) / 6)
  assert targets["train_vs_single"]["target"] == "<= 0.60"
  assert targets["train_vs_single"]["met"] is True
  assert targets["train_vs_torchvision"]["met"] is True
  assert mix.mix_targets(rows[:1], peer) == {}   # no chosen layouts: no targets
