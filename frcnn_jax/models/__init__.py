"""flax.linen modules: parameters and forward passes only (no targets, no losses)."""
