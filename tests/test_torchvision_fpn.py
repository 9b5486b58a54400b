"""ResNet-50-FPN equals torchvision's `fasterrcnn_resnet50_fpn` stage by stage (torch extra).

torchvision's detector is built with seeded random weights (`weights=None, weights_backbone=None`,
5 classes), its state dict converted with scripts/convert_torchvision_detector.py and loaded
through `model.pretrained`, and experiments/coco_r50_fpn.py (torchvision's conventions: anchor
style, proposal style, sigmoid objectness, MultiScaleRoIAlign, 1024-wide MLP head, 1e-3 RPN
min size) runs on the same resized images, batched on one canvas as torchvision's ImageList
pads them. Each stage is compared on the same inputs (torchvision's output of the stage
before), and the whole `detector.predict` against torchvision's whole chain.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from frcnn_jax.config import build
from frcnn_jax.config import flags as config_flags
from frcnn_jax.detection import detector
from frcnn_jax.models import faster_rcnn
from frcnn_jax.ops import postprocess
from frcnn_jax.ops import proposals as proposal_ops

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import image_list  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_CLASSES = 4                      # foreground; torchvision's num_classes counts background
IMAGE_HW = ((128, 160), (96, 128), (150, 92))
CANVAS = (160, 160)                  # the largest sides rounded up to 32, as torchvision pads;
                                     # a 3-cell P6 there: torchvision's anchor stride 53


def _converter():
  spec = importlib.util.spec_from_file_location(
      "convert_torchvision_detector", ROOT / "scripts" / "convert_torchvision_detector.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _torchvision_model():
  """The peer, seeded; frozen-BN statistics and the RPN head's weights spread out so that
  activations stay O(1) through 50 layers and the objectness top-k is decided by the logits,
  not by float rounding (torchvision's own init gives logits within 1e-2 of each other)."""
  torch.manual_seed(0)
  model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
      weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(0.2 + 0.4 * torch.rand(n, generator=generator))
        module.bias.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    for parameter in model.rpn.head.parameters():
      parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
  return model.eval()


def _images() -> tuple[np.ndarray, np.ndarray]:
  """Smooth random uint8 images on one zero-padded canvas, and their sizes."""
  rng = np.random.default_rng(0)
  canvas = np.zeros((len(IMAGE_HW), *CANVAS, 3), np.uint8)
  for i, (h, w) in enumerate(IMAGE_HW):
    coarse = rng.uniform(0, 255, (h // 8 + 2, w // 8 + 2, 3))
    image = np.kron(coarse, np.ones((8, 8, 1)))[:h, :w] + rng.uniform(-20, 20, (h, w, 3))
    canvas[i, :h, :w] = np.clip(image, 0, 255).astype(np.uint8)
  return canvas, np.asarray(IMAGE_HW, np.int32)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  """(torchvision model, our model, our params, our settings, config)."""
  tv = _torchvision_model()
  converter = _converter()
  state = {k: v.detach().numpy() for k, v in tv.state_dict().items()}
  path = tmp_path_factory.mktemp("weights") / "tv_fpn.npz"
  converter.save(converter.convert_detector(state), str(path))
  config = config_flags.load_config(str(ROOT / "experiments" / "coco_r50_fpn.py"))
  config.model.pretrained = str(path)
  config.model.conv_grad = "xla"
  model = build.model_from_config(config, NUM_CLASSES)
  params = build.init_params_from_config(config, model, jax.random.key(0))
  settings = build.detector_settings_from_config(config)
  return tv, model, params, settings


def _tv_inputs(images: np.ndarray, image_hw: np.ndarray):
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
  std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
  x = (x - mean) / std
  for i, (h, w) in enumerate(image_hw):
    x[i, :, h:, :] = 0.0
    x[i, :, :, w:] = 0.0
  return image_list.ImageList(x, [tuple(int(v) for v in hw) for hw in image_hw])


def _close(ours, theirs, rtol=1e-4):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=rtol * max(1.0, np.abs(theirs).max()))


def _same_rows(ours, theirs, rtol=1e-4):
  """Equal up to the order of rows (boxes, or boxes with scores and labels): torchvision sorts
  by float32 probability, ours by logit, so boxes whose probabilities round to the same float
  may come out in either order."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  order = lambda x: x[np.lexsort(np.round(x, 2).T[::-1])]
  _close(order(ours), order(theirs), rtol)


def _nchw(x):
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.slow
def test_every_stage_equals_torchvision(pair):
  tv, model, params, settings = pair
  images, image_hw = _images()
  inputs = _tv_inputs(images, image_hw)
  batch = {"image": jnp.asarray(images), "image_hw": jnp.asarray(image_hw),
           "scale": jnp.ones((len(images),), jnp.float32)}
  with torch.no_grad():
    tv_features = tv.backbone(inputs.tensors)
    levels = list(tv_features.values())
    tv_logits, tv_deltas = tv.rpn.head(levels)
    tv_anchors = tv.rpn.anchor_generator(inputs, levels)
    tv_proposals, _ = tv.rpn(inputs, tv_features)
    tv_proposal_scores = _proposal_scores(tv, inputs, levels)
    tv_roi_features = tv.roi_heads.box_roi_pool(tv_features, tv_proposals, inputs.image_sizes)
    tv_class_logits, tv_box_deltas = tv.roi_heads.box_predictor(
        tv.roi_heads.box_head(tv_roi_features))
    tv_boxes, tv_scores, tv_labels = tv.roi_heads.postprocess_detections(
        tv_class_logits, tv_box_deltas, tv_proposals, inputs.image_sizes)

  # One program for the whole of our side (features, RPN outputs, proposals, detections).
  features, logits, deltas, our_proposals, out = jax.jit(lambda p, b: (
      *model.apply({"params": p}, b["image"], b["image_hw"],
                   method=faster_rcnn.FasterRCNN.features_and_rpn),
      detector.proposals(p, b, model=model, settings=settings),
      detector.predict(p, b, model=model, settings=settings)))(params, batch)

  # 1. Per-level features P2 .. P6.
  assert len(features) == len(levels) == 5
  for ours, theirs in zip(features, levels):
    _close(ours, _nchw(theirs))

  # 2. Objectness and deltas, anchors in torchvision's order (level, row, column, anchor).
  flat = lambda xs, k: torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, k) for x in xs],
                                 1).numpy()
  _close(logits[..., 0], flat(tv_logits, 1)[..., 0])
  _close(deltas, flat(tv_deltas, 4))
  anchors, level_sizes = detector.pyramid_anchors(features, images.shape[1:3], settings)
  np.testing.assert_array_equal(anchors, tv_anchors[0].numpy())

  # 3. Proposals, from torchvision's objectness and deltas.
  tv_logit_flat, tv_delta_flat = flat(tv_logits, 1)[..., 0], flat(tv_deltas, 4)
  for i, hw in enumerate(image_hw):
    boxes, scores, valid = proposal_ops.generate_level_proposals(
        tv_logit_flat[i], tv_delta_flat[i], anchors, hw, level_sizes=level_sizes,
        min_size=settings.rpn.min_size, pre_nms_top_n=settings.rpn.pre_nms_top_n_test,
        post_nms_top_n=settings.rpn.post_nms_top_n_test, nms_threshold=settings.rpn.nms_threshold)
    n = int(np.asarray(valid).sum())
    assert n == len(tv_proposals[i]) and not np.asarray(valid)[n:].any()
    _same_rows(np.asarray(boxes)[:n], tv_proposals[i].numpy(), rtol=1e-5)
    _close(np.asarray(scores)[:n], tv_proposal_scores[i])
  for i, theirs in enumerate(tv_proposals):
    assert int(np.asarray(our_proposals["valid"][i]).sum()) == len(theirs)
    _same_rows(np.asarray(our_proposals["boxes"][i])[:len(theirs)], theirs.numpy())

  # 4. RoI features and 5. class scores and box deltas, on torchvision's levels and proposals.
  r = settings.rpn.post_nms_top_n_test
  rois = np.zeros((len(images), r, 4), np.float32)
  for i, p in enumerate(tv_proposals):
    rois[i, :len(p)] = p.numpy()
  their_levels = tuple(jnp.asarray(_nchw(x)) for x in levels)
  pooled = jax.vmap(model.head.pooler)(their_levels[:4], jnp.asarray(rois))
  class_logits, box_deltas = model.apply({"params": params}, their_levels, jnp.asarray(rois),
                                         method=faster_rcnn.FasterRCNN.roi_head)
  start = 0
  for i, p in enumerate(tv_proposals):
    n = len(p)
    _close(pooled[i, :n], tv_roi_features[start:start + n].permute(0, 2, 3, 1).numpy())
    _close(class_logits[i, :n], tv_class_logits[start:start + n].numpy())
    _close(np.asarray(box_deltas[i, :n]).reshape(n, -1), tv_box_deltas[start:start + n].numpy())

    # 6. Detections, from torchvision's class logits, box deltas and proposals.
    scores = jax.nn.softmax(jnp.asarray(tv_class_logits[start:start + n].numpy()), -1)
    got = postprocess.detections(
        jnp.pad(scores, ((0, r - n), (0, 0))),
        jnp.pad(jnp.asarray(tv_box_deltas[start:start + n].numpy()), ((0, r - n), (0, 0))),
        jnp.asarray(rois[i]), jnp.arange(r) < n, jnp.asarray(image_hw[i]),
        weights=settings.roi.box_weights, score_threshold=settings.test.score_threshold,
        nms_threshold=settings.test.nms_threshold,
        max_detections=settings.test.detections_per_image, min_size=settings.test.min_size)
    _assert_detections(got, tv_boxes[i], tv_scores[i], tv_labels[i])
    start += n

  # 7. The whole program against torchvision's whole chain.
  for i in range(len(images)):
    got = (out["boxes"][i], out["scores"][i], out["labels"][i], out["valid"][i])
    _assert_detections(got, tv_boxes[i], tv_scores[i], tv_labels[i])


def _proposal_scores(tv, inputs, levels):
  """torchvision's proposal probabilities (its RPN returns only the boxes in eval mode)."""
  objectness, deltas = tv.rpn.head(levels)
  anchors = tv.rpn.anchor_generator(inputs, levels)
  per_level = [o[0].numel() for o in objectness]
  from torchvision.models.detection import rpn  # pylint: disable=import-outside-toplevel
  objectness, deltas = rpn.concat_box_prediction_layers(objectness, deltas)
  proposals = tv.rpn.box_coder.decode(deltas, anchors).view(len(anchors), -1, 4)
  _, scores = tv.rpn.filter_proposals(proposals, objectness, inputs.image_sizes, per_level)
  return [s.numpy() for s in scores]


def _assert_detections(got, boxes, scores, labels):
  got_boxes, got_scores, got_labels, got_valid = (np.asarray(x) for x in got)
  n = int(got_valid.sum())
  assert n == len(boxes) > 0 and not got_valid[n:].any()
  _close(got_scores[:n], scores.numpy())
  rows = lambda b, s, c: np.concatenate([np.asarray(s)[:, None], np.asarray(c)[:, None], b], 1)
  _same_rows(rows(got_boxes[:n], got_scores[:n], got_labels[:n]),
             rows(boxes.numpy(), scores.numpy(), labels.numpy()))
