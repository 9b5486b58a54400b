"""frcnn_jax: Faster R-CNN as a static-shape JAX/Flax research codebase."""

__version__ = "0.1.0"
