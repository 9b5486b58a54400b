"""Pretrained weights: the converters' command line, their .npz merged into a network's
parameters, and the frozen-layer masks of the backbones that load them."""

import argparse
import os
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np


def merge_npz(params: Any, path: str, input_norm: str, *, backbone: str, fit: str,
              head_layers: tuple[str, ...] = ("fc6", "fc7")) -> Any:
  """Merges a converter's .npz into the whole network's parameters.

  Args:
    params: the network's `params` ("trunk", "rpn", "head").
    path: .npz with "<layer>/<leaf>" arrays and metadata entries without "/" ("input_norm": the
      normalisation the weights were trained with).
    input_norm: the model's `model.input_norm`.
    backbone: the backbone's registry name, for messages.
    fit: the settings that must match the weights, for the shape message.
    head_layers: the file's layers that belong to the RoI head (the rest go to the trunk).

  Returns:
    A new params tree with the file's arrays in place.

  Raises:
    ValueError: another input normalisation, a layer or leaf the network does not have, or a
      shape that differs.
  """
  arrays, _ = read_npz(path, input_norm)
  params = flax.core.unfreeze(params)
  for name, value in arrays.items():
    layer, leaf = name.split("/")
    module = "head" if layer in head_layers else "trunk"
    if layer not in params[module] or leaf not in params[module][layer]:
      raise ValueError(f"{path}: {name} does not exist in the model ({module}): layer "
                       f"{layer!r}; the file does not fit model.backbone={backbone!r} with "
                       "these settings")
    current = params[module][layer][leaf]
    if current.shape != value.shape:
      raise ValueError(f"{path}: {name} has shape {value.shape}, the model expects "
                       f"{current.shape} ({fit} must match the weights)")
    params[module][layer][leaf] = jnp.asarray(value, current.dtype)
  return params


def read_npz(path: str, input_norm: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """A converter's .npz: its arrays (names with "/") and its metadata (names without, as
  stored: 0-d arrays for scalars).

  Raises:
    ValueError: the metadata's "input_norm" is not the model's `input_norm`.
  """
  with np.load(path) as data:
    arrays = {name: data[name] for name in data.files if "/" in name}
    meta = {name: data[name] for name in data.files if "/" not in name}
  expected_norm = str(meta["input_norm"]) if "input_norm" in meta else ""
  if expected_norm and expected_norm != input_norm:
    raise ValueError(f"{path} expects model.input_norm={expected_norm!r}, but the model uses "
                     f"{input_norm!r}")
  return arrays, meta


def set_leaf(params: Any, module: str, name: str, value: np.ndarray, path: str, fit: str,
             file_name: str | None = None) -> None:
  """Puts `value` at `params[module]`'s "/"-separated `name`, in place, in the leaf's dtype.

  Raises:
    ValueError: the model has no such leaf, or its shape differs; the message names the array
      as the file does (`file_name`, default `name`) and ends in `fit`, the settings that must
      match the file.
  """
  node = params[module]
  keys = name.split("/")
  name = file_name or name
  for key in keys[:-1]:
    if not isinstance(node, dict) or key not in node:
      raise ValueError(f"{path}: {name} does not exist in the model ({module}); {fit}")
    node = node[key]
  if not isinstance(node, dict) or keys[-1] not in node:
    raise ValueError(f"{path}: {name} does not exist in the model ({module}); {fit}")
  current = node[keys[-1]]
  if current.shape != value.shape:
    raise ValueError(f"{path}: {name} has shape {value.shape}, the model expects "
                     f"{current.shape}; {fit}")
  node[keys[-1]] = jnp.asarray(value, current.dtype)


def require_filled(tree: Any, filled: set[str], module: str, path: str, fit: str) -> None:
  """Every leaf of `tree` (a part of `params[module]`) is among the `filled` names.

  Raises:
    ValueError: naming the first leaf the file lacked.
  """
  for leaf_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(entry, "key", entry)) for entry in leaf_path)
    if name not in filled:
      raise ValueError(f"{path}: the file has no {name} (of the model's {module}); {fit}")


def converter_arguments(description: str, input_help: str,
                        argv: list[str] | None = None) -> argparse.Namespace:
  """The weight converters' command line: --input, --output, --overwrite, checked.

  Exits with a usage error (no traceback) when --input does not exist or --output exists
  without --overwrite; creates --output's folder.
  """
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--input", required=True, help=input_help)
  parser.add_argument("--output", required=True, help="destination .npz (folders are created)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = parser.parse_args(argv)
  if not os.path.isfile(args.input):
    parser.error(f"--input {args.input} does not exist")
  if os.path.exists(args.output) and not args.overwrite:
    parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
  if os.path.dirname(args.output):
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
  return args


def trainable_below(params: Any, layer_name: re.Pattern[str], frozen: int) -> Any:
  """Bool pytree like `params`: False for a leaf whose path has a key matching `layer_name`
  (group 1 an integer index) with index <= `frozen`, True elsewhere (a backbone's `trainable`)."""
  def is_trainable(path, _) -> bool:
    for entry in path:
      match = layer_name.match(str(getattr(entry, "key", entry)))
      if match and int(match.group(1)) <= frozen:
        return False
    return True
  return jax.tree_util.tree_map_with_path(is_trainable, params)
