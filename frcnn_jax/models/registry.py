"""The registries of the network's parts chosen by name: backbones and RoI heads.

A backbone (`model.backbone`) is a Flax module class whose `setting` fields are its config
section `model.<name>`; the model builder passes `conv_grad`, `dtype` and `param_dtype`. It
provides:
  __call__(x [B, H, W, 3] normalised images) -> features [B, h, w, out_channels]
  stride, out_channels                      # properties: output stride and channels
  output_hw(height, width) -> (h, w)        # the feature map of an H x W canvas
  trainable(params) -> bool pytree          # of its own parameters: False where frozen
  load_pretrained(params, path, input_norm)  # a converted weights file into the whole
      -> params                             # network's parameters ("trunk", "head", ...)
  input_norms                               # class attributes: the normalisations its
  all_frozen                                # pretrained weights come with; the settings
  pretrained_hint                           # that freeze it whole (alternating training's
                                            # stages 3-4); how to make its weights file
A multi-level backbone (a feature pyramid) returns a tuple of maps, finest first, and adds
  strides                                   # property: the stride of each level; `stride`
                                            # is then what canvases must be multiples of
  roi_levels                                # property: the first this many levels feed the
                                            # RoI pooler (the others the RPN only)
  output_hw(height, width) -> ((h, w), ...)  # one pair per level
The RPN head is shared by the levels; anchors.sizes is split evenly over them.

A RoI head (`model.roi_head`) is a Flax module class whose `setting` fields are its section
`model.<name>`; the builder passes `num_classes`, `pooler` (models/roi_heads/pooling.py),
`dtype`, `param_dtype` and, to a head that has the attribute, `conv_grad`. It provides
  __call__(features [B, h, w, C], rois [B, R, 4], *, train) ->
      (class logits [B, R, C + 1] float32, class-specific box deltas [B, R, C + 1, 4] float32)
and optionally
  trainable(params) -> bool pytree          # of its own parameters: False where frozen
"""

from frcnn_jax.config import registry

BACKBONES = registry.Registry("model.backbone")


def strides_of(trunk) -> tuple[int, ...]:
  """The stride of each of a backbone's feature levels (one entry for a single-map backbone)."""
  return tuple(getattr(trunk, "strides", (trunk.stride,)))
ROI_HEADS = registry.Registry("model.roi_head")
