"""frcnn_jax.benchmarking.flops: XLA's FLOP count of compiled programs."""

import jax
import jax.numpy as jnp
import pytest

from frcnn_jax.benchmarking import flops


def test_flops_of_a_matmul_are_2mnk():
  m, n, k = 48, 24, 40
  compiled = jax.jit(jnp.matmul).lower(jnp.ones((m, k)), jnp.ones((k, n))).compile()
  assert flops.compiled_flops(compiled) == 2 * m * n * k
  assert flops.program_flops(compiled) == 2 * m * n * k


def test_flops_of_a_valid_convolution():
  x, w = jnp.ones((2, 10, 12, 8)), jnp.ones((3, 3, 8, 16))
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  compiled = jax.jit(conv).lower(x, w).compile()
  assert flops.compiled_flops(compiled) == 2 * (2 * 8 * 10 * 16) * (3 * 3 * 8)


def test_flops_without_arithmetic_is_an_error():
  compiled = jax.jit(lambda x: x).lower(jnp.ones(3)).compile()
  with pytest.raises(ValueError, match="FLOP"):
    flops.compiled_flops(compiled)
  assert flops.program_flops(compiled) is None
