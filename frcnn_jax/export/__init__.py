"""Exported detectors: the writer (`python -m frcnn_jax.export`) and the JAX+NumPy loader."""
