"""Pure jax.numpy detection ops: no Flax, no config objects, randomness only via keys."""
