"""2x2 / stride 2 max pooling with a scatter-free gradient.

`jax.grad` of `lax.reduce_window` max is a select-and-scatter, which XLA:CPU runs slowly (as a
variadic reduce-window carrying s32 index arrays). `max_pool_2x2` gives the same values and the
same gradient, bit for bit, from elementwise ops only: the forward takes the four elements of
every window from a reshape, and the backward routes each output gradient to the one input
position that select-and-scatter picks; all it keeps for that is an int8 index per output (a
sixteenth of the input's bytes in float32).

Which element that is: jax differentiates reduce-window max through `_select_and_gather_add`,
whose transpose is `select_and_scatter_add` with the select `ge`. XLA's select-and-scatter
visits a window in row-major order (top-left, top-right, bottom-left, bottom-right), keeps
the element selected so far while `ge(selected, candidate)` holds and otherwise takes the
candidate. So among equal maxima the first in row-major order wins (ties are common: zeros
after a ReLU; +0.0 and -0.0 are equal).

NaNs: `_winner` folds the same `ge` comparisons over the four elements, so NaNs are routed as
XLA routes them. A comparison with a NaN is false, so a NaN takes the selection from the element
selected so far and hands it on to the next element: the pooled value is NaN (max propagates
NaNs) while its gradient may go to a later, non-NaN element. In ceil mode the -inf padding
takes part as in lax (which pads with -inf on CPU before selecting): when a NaN hands the
selection to padding, that window's gradient is dropped.
"""

import jax
import jax.numpy as jnp

WINDOW = 4   # elements of a 2x2 window, numbered 2 * row + column


def _window_elements(x: jax.Array) -> list[jax.Array]:
  """The four elements of every 2x2 window in row-major order.

  Args:
    x: [B, H, W, C] with even H and W.

  Returns:
    Four arrays [B, H/2, W/2, C]: top-left, top-right, bottom-left, bottom-right.
  """
  b, h, w, c = x.shape
  x6 = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return [x6[:, :, r, :, s, :] for r in range(2) for s in range(2)]


def _winner(elements: list[jax.Array]) -> jax.Array:
  """Index (0..3) of the element select-and-scatter with `ge` picks in each window.

  Args:
    elements: four arrays [B, h, w, C] in row-major window order.

  Returns:
    [B, h, w, C] int8: the first maximum in row-major order (NaNs: see the module docstring).
  """
  best, index = elements[0], jnp.zeros(elements[0].shape, jnp.int8)
  for k, candidate in enumerate(elements[1:], 1):
    take = jnp.logical_not(best >= candidate)
    best = jnp.where(take, candidate, best)
    index = jnp.where(take, jnp.int8(k), index)
  return index


def _pool_forward(x: jax.Array) -> jax.Array:
  """Max over each 2x2 window of [B, H, W, C] (H, W even) -> [B, H/2, W/2, C].

  Elementwise maxima of the four window elements: a reduction over the reshaped window axes
  made inference on some canvases (608x1024) much slower than on their transpose at equal
  FLOPs (benchmarks/RESULTS.md, runs M3 and M4).
  """
  top_left, top_right, bottom_left, bottom_right = _window_elements(x)
  return jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))


@jax.custom_vjp
def _pool_even(x: jax.Array) -> jax.Array:
  """2x2 / stride 2 max pooling of [B, H, W, C] with even H and W -> [B, H/2, W/2, C]."""
  return _pool_forward(x)


def _pool_even_fwd(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The pooled [B, H/2, W/2, C] and, kept for the backward, its winners' int8 indices."""
  return _pool_forward(x), _winner(_window_elements(x))


def _pool_even_bwd(index: jax.Array, g: jax.Array) -> tuple[jax.Array]:
  """Input gradient [B, H, W, C]: g at each window's winner, zero elsewhere."""
  b, h, w, c = g.shape
  position = jnp.arange(WINDOW, dtype=jnp.int8).reshape(1, 1, 2, 1, 2, 1)
  dx = jnp.where(index[:, :, None, :, None, :] == position, g[:, :, None, :, None, :],
                 jnp.zeros((), g.dtype))
  return (dx.reshape(b, 2 * h, 2 * w, c),)


_pool_even.defvjp(_pool_even_fwd, _pool_even_bwd)


def max_pool_2x2(x: jax.Array, ceil_mode: bool = False) -> jax.Array:
  """2x2 max pooling with stride 2, equal to `nn.max_pool(x, (2, 2), (2, 2))` with its gradient.

  Args:
    x: [B, H, W, C] floating point.
    ceil_mode: pad odd sides with -inf (Caffe: the last window holds one row or column)
      instead of dropping the trailing odd row or column.

  Returns:
    [B, h, w, C], h = H // 2 (floor) or ceil(H / 2) (ceil), w alike.
  """
  _, height, width, _ = x.shape
  if ceil_mode:
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)),
                constant_values=-jnp.inf)
  else:
    x = x[:, :height - height % 2, :width - width % 2, :]
  return _pool_even(x)
