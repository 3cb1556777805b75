"""Table-driven torch <-> Flax parameter mapping shared by the converters.

A converter describes its model as entries (torch name, flax path, stack index or None, kind):
`kind` names a layout transform, `stack index` places the tensor in a stacked (nn.scan) array.
These helpers walk such a table in both directions and check a state dict against it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

Entry = tuple[str, tuple[str, ...], int | None, str]


def to_numpy(value: Any, name: str) -> np.ndarray:
  """A state-dict entry (torch.Tensor, NumPy or JAX array) as NumPy: float tensors of fewer than
  4 bytes (bf16, fp16) are upcast to float32, other dtypes kept."""
  if isinstance(value, np.ndarray):
    return value
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
    value = value.detach().cpu()
    if not value.dtype.is_floating_point or value.dtype.itemsize >= 4:
      return value.numpy()
    return value.float().numpy()
  if isinstance(value, jax.Array):
    return np.asarray(value)
  raise ValueError(f"State-dict entry {name!r} is a {type(value).__name__}, not a tensor.")


def set_path(tree: dict, path: Iterable[str], value) -> None:
  """tree[path[0]]...[path[-1]] = value, creating the intermediate dicts."""
  *parents, leaf = path
  for key in parents:
    tree = tree.setdefault(key, {})
  tree[leaf] = value


def params_to_torch(
  params: Mapping, entries: Iterable[Entry], to_torch: Callable[[Any, str], Any], layout: str
) -> dict[str, Any]:
  """{torch name: to_torch(flax leaf, kind)}; array-type agnostic (works under jax.eval_shape).

  `layout` describes the expected tree in the error raised when a path is absent.
  """
  out = {}
  for name, path, index, kind in entries:
    node = params
    try:
      for key in path:
        node = node[key]
    except (KeyError, TypeError) as e:
      raise ValueError(
        f"Flax params lack {'/'.join(path)} (for torch {name}); is this the {layout} layout?"
      ) from e
    out[name] = to_torch(node if index is None else node[index], kind)
  return out


def check_shapes(
  state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], header: str
) -> None:
  """Raises one ValueError (starting with `header`) naming every missing, unexpected and
  mis-shaped tensor, with the shape found and the shape expected."""
  missing = [k for k in expected if k not in state_dict]
  unexpected = sorted(k for k in state_dict if k not in expected)
  misshaped = [
    f"{k}: got {tuple(state_dict[k].shape)}, expected {shape}"
    for k, shape in expected.items()
    if k in state_dict and tuple(state_dict[k].shape) != tuple(shape)
  ]
  if missing or unexpected or misshaped:
    parts = [header]
    if missing:
      parts.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      parts.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if misshaped:
      parts.append(f"  mis-shaped ({len(misshaped)}): " + "; ".join(misshaped))
    raise ValueError("\n".join(parts))


def torch_to_params(
  state_dict: Mapping[str, Any],
  entries: Iterable[Entry],
  to_flax: Callable[[np.ndarray, str], np.ndarray],
  dtype,
) -> dict:
  """Nested dict of NumPy arrays in `dtype`; stacked entries become one array per path."""
  params: dict = {}
  stacks: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
  for name, path, index, kind in entries:
    value = to_flax(to_numpy(state_dict[name], name), kind).astype(np.dtype(dtype))
    if index is None:
      set_path(params, path, np.ascontiguousarray(value))
    else:
      stacks.setdefault(path, {})[index] = value
  for path, layers in stacks.items():
    set_path(params, path, np.stack([layers[i] for i in range(len(layers))]))
  return params
