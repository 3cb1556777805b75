"""Official PixNerd (PyTorch) tensor names and layouts <-> flowseg_jax `PixNerDiT` parameters.

The name map (which official tensor is which Flax leaf, with which layout transform), both
directions of the conversion, the shape check that names every missing / unexpected / mis-shaped
tensor, and reading the architecture off a state dict's shapes. Reading files and writing orbax
checkpoints live in `convert.pixnerd`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from flowseg_jax.convert import common
from flowseg_jax.models import pixnerd
from flowseg_jax.models.nerf import DCT_MAX_FREQS
from flowseg_jax.models.pixnerd import PixNerDiT

# (torch name, flax path, transform). "linear": weight.T; "patch": weight.T with the input axis
# permuted from (C, p, p) to (p, p, C); "copy": as is.
_GLOBAL_ENTRIES = (
  ("x_embedder.embedder.0.weight", ("x_embedder", "kernel"), "linear"),
  ("x_embedder.embedder.0.bias", ("x_embedder", "bias"), "copy"),
  ("s_embedder.proj.weight", ("s_embedder", "kernel"), "patch"),
  ("s_embedder.proj.bias", ("s_embedder", "bias"), "copy"),
  ("t_embedder.mlp.0.weight", ("t_embedder", "mlp_0", "kernel"), "linear"),
  ("t_embedder.mlp.0.bias", ("t_embedder", "mlp_0", "bias"), "copy"),
  ("t_embedder.mlp.2.weight", ("t_embedder", "mlp_2", "kernel"), "linear"),
  ("t_embedder.mlp.2.bias", ("t_embedder", "mlp_2", "bias"), "copy"),
  ("y_embedder.embedding_table.weight", ("y_embedder", "embedding_table", "embedding"), "copy"),
  ("final_layer.norm.weight", ("final_layer", "norm", "scale"), "copy"),
  ("final_layer.linear.weight", ("final_layer", "linear", "kernel"), "linear"),
  ("final_layer.linear.bias", ("final_layer", "linear", "bias"), "copy"),
)
_COND_BLOCK_ENTRIES = (
  ("norm1.weight", ("norm1", "scale"), "copy"),
  ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
  ("attn.q_norm.weight", ("attn", "q_norm", "scale"), "copy"),
  ("attn.k_norm.weight", ("attn", "k_norm", "scale"), "copy"),
  ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
  ("attn.proj.bias", ("attn", "proj", "bias"), "copy"),
  ("norm2.weight", ("norm2", "scale"), "copy"),
  ("mlp.w1.weight", ("mlp", "w1", "kernel"), "linear"),
  ("mlp.w2.weight", ("mlp", "w2", "kernel"), "linear"),
  ("mlp.w3.weight", ("mlp", "w3", "kernel"), "linear"),
  ("adaLN_modulation.0.weight", ("adaLN_modulation", "kernel"), "linear"),
  ("adaLN_modulation.0.bias", ("adaLN_modulation", "bias"), "copy"),
)
_NERF_BLOCK_ENTRIES = (
  ("param_generator1.0.weight", ("param_generator1", "kernel"), "linear"),
  ("param_generator1.0.bias", ("param_generator1", "bias"), "copy"),
  ("norm.weight", ("norm", "scale"), "copy"),
)


def _entries(model: PixNerDiT):
  """Yields (torch name, flax path, stack index or None, transform) for every tensor."""
  for name, path, kind in _GLOBAL_ENTRIES:
    yield name, path, None, kind
  nc = model.num_cond_blocks
  for i in range(model.num_blocks):
    is_cond = i < nc
    table = _COND_BLOCK_ENTRIES if is_cond else _NERF_BLOCK_ENTRIES
    for suffix, sub, kind in table:
      if model.scan_blocks:
        path, index = ("cond_blocks" if is_cond else "nerf_blocks",) + sub, i if is_cond else i - nc
      else:
        path, index = (f"blocks_{i}",) + sub, None
      yield f"blocks.{i}.{suffix}", path, index, kind


def _to_flax_layout(w, kind: str, model: PixNerDiT):
  if kind == "linear":
    return w.T
  if kind == "patch":
    p, c = model.patch_size, model.in_channels
    return w.reshape(w.shape[0], c, p, p).transpose(2, 3, 1, 0).reshape(p * p * c, w.shape[0])
  return w


def _to_torch_layout(w, kind: str, model: PixNerDiT):
  if kind == "linear":
    return w.T
  if kind == "patch":
    p, c = model.patch_size, model.in_channels
    return w.reshape(p, p, c, w.shape[-1]).transpose(3, 2, 0, 1).reshape(w.shape[-1], c * p * p)
  return w


def map_flax_to_torch(params: Mapping, model: PixNerDiT) -> dict[str, Any]:
  """Flax params -> {official torch name: array}, array-type agnostic (NumPy, jax, tracers).

  Works under `jax.eval_shape`, so the official names and shapes of any config can be listed
  without memory: `jax.eval_shape(lambda p: map_flax_to_torch(p, m), abstract_params(m))`.
  """
  out = {}
  for name, path, index, kind in _entries(model):
    node = params
    try:
      for key in path:
        node = node[key]
    except (KeyError, TypeError) as e:
      layout = "scanned" if model.scan_blocks else "unscanned"
      raise ValueError(
        f"Flax params lack {'/'.join(path)} (for torch {name}); is this the {layout} layout?"
      ) from e
    out[name] = _to_torch_layout(node if index is None else node[index], kind, model)
  return out


def expected_torch_shapes(model: PixNerDiT) -> dict[str, tuple[int, ...]]:
  """Official state-dict names and shapes of `model`'s architecture, in registration order."""
  abstract = pixnerd.abstract_params(model)
  shapes = jax.eval_shape(lambda p: map_flax_to_torch(p, model), abstract)
  return {k: tuple(v.shape) for k, v in shapes.items()}


def flax_to_torch(params: Mapping, model: PixNerDiT) -> dict[str, np.ndarray]:
  """Flax params (plain, unboxed; scanned or not as `model` says) -> official torch state dict.

  Returns:
    {name: contiguous np.ndarray in torch layout}; `torch.from_numpy` each value for
    `load_state_dict` on the official `PixNerDiT` (keys without the `denoiser.` prefix).
  """
  return {
    k: np.ascontiguousarray(np.asarray(v)) for k, v in map_flax_to_torch(params, model).items()
  }


def check_state_dict(
  state_dict: Mapping[str, Any], model: PixNerDiT, *, source: str = "state dict"
) -> None:
  """Raises one ValueError naming every missing, unexpected and mis-shaped tensor."""
  header = f"{source} does not match PixNerDiT({_fmt_config(model.arch_config())}):"
  common.check_shapes(state_dict, expected_torch_shapes(model), header)


def _fmt_config(cfg: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in cfg.items())


def torch_to_flax(
  state_dict: Mapping[str, Any], model: PixNerDiT, *, source: str = "state dict"
) -> dict:
  """Official denoiser state dict (names without prefix) -> plain Flax params for `model`.

  Args:
    state_dict: {name: torch.Tensor | np.ndarray}, exactly the official keys of this config.
    model: the target module; its `scan_blocks` picks the layout, its `param_dtype` the dtype.
    source: what to call the state dict in error messages (e.g. the file name).

  Returns:
    Nested dict of np.ndarray in `model.param_dtype`, ready for `model.apply({'params': ...})`.

  Raises:
    ValueError: listing every missing / unexpected / mis-shaped key.
  """
  return _convert_tensors(state_dict, model, source=source)


def _convert_tensors(state_dict, model, *, source, release=None, place=None) -> dict:
  """`torch_to_flax`, one tensor at a time: each is copied into its own output array, then
  `release(tensor)` lets go of the source's memory; `place(array)` moves each finished leaf
  (e.g. to a jax CPU array). Peak memory: the output plus one tensor (plus one block stack)."""
  check_state_dict(state_dict, model, source=source)
  dtype = np.dtype(model.param_dtype)
  place = place or (lambda a: a)
  params: dict = {}
  stacks: dict[tuple[str, ...], np.ndarray] = {}
  depth = {"cond_blocks": model.num_cond_blocks}
  depth["nerf_blocks"] = model.num_blocks - model.num_cond_blocks
  for name, path, index, kind in _entries(model):
    tensor = state_dict[name]
    value = _to_flax_layout(common.to_numpy(tensor, name), kind, model)
    if index is None:  # a copy (never a view of the source), so that the source can be released
      common.set_path(params, path, place(np.array(value, dtype=dtype, order="C", copy=True)))
    else:
      if path not in stacks:
        stacks[path] = np.empty((depth[path[0]],) + value.shape, dtype)
      stacks[path][index] = value
    if release is not None:
      release(tensor)
    del tensor, value
  for path in list(stacks):
    common.set_path(params, path, place(stacks.pop(path)))
  return params


def relayout(params: Mapping, model: PixNerDiT, *, scan_blocks: bool) -> tuple[PixNerDiT, dict]:
  """Converts params between the unscanned (`blocks_{i}`) and scanned (stacked) layouts."""
  target = model.clone(scan_blocks=scan_blocks)
  return target, torch_to_flax(flax_to_torch(params, model), target)


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_COND_SUFFIXES = tuple(s for s, _, _ in _COND_BLOCK_ENTRIES)
_NERF_SUFFIXES = tuple(s for s, _, _ in _NERF_BLOCK_ENTRIES)


def infer_model_config(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """Reads the architecture (PixNerDiT keyword arguments) off a denoiser state dict's shapes."""

  def shape(key: str) -> tuple[int, ...]:
    if key not in state_dict:
      raise ValueError(f"Cannot infer the PixNerd config: tensor {key!r} is missing.")
    return tuple(state_dict[key].shape)

  hidden_x, in_plus_dct = shape("x_embedder.embedder.0.weight")
  channels = in_plus_dct - DCT_MAX_FREQS**2
  hidden, patch_dim = shape("s_embedder.proj.weight")
  patch = math.isqrt(patch_dim // channels) if channels > 0 else 0
  if channels <= 0 or patch * patch * channels != patch_dim:
    raise ValueError(
      f"Cannot infer the PixNerd config: s_embedder.proj.weight {(hidden, patch_dim)} is not "
      f"(D, C*p*p) for C={channels} from x_embedder.embedder.0.weight."
    )
  num_classes = shape("y_embedder.embedding_table.weight")[0] - 1

  cond, nerf = set(), set()
  for key in state_dict:
    m = _BLOCK_KEY.match(key)
    if m and m.group(2) in _COND_SUFFIXES:
      cond.add(int(m.group(1)))
    elif m and m.group(2) in _NERF_SUFFIXES:
      nerf.add(int(m.group(1)))
  nc, nb = len(cond), len(cond) + len(nerf)
  if cond != set(range(nc)) or nerf != set(range(nc, nb)):
    raise ValueError(
      "Cannot infer the PixNerd config: trunk blocks must be blocks.0..blocks.{nc-1} and NeRF "
      f"blocks the ones after; found trunk {sorted(cond)}, NeRF {sorted(nerf)}."
    )
  head_dims = [
    tuple(state_dict[f"blocks.{i}.attn.{n}_norm.weight"].shape)[0]
    for i in sorted(cond)
    for n in ("q", "k")
    if f"blocks.{i}.attn.{n}_norm.weight" in state_dict
  ]
  if not head_dims or head_dims[0] == 0 or hidden % head_dims[0]:
    raise ValueError(
      f"Cannot infer the number of heads from the qk-norm sizes {head_dims[:2]} and D={hidden}."
    )
  mlp_ratio = 2
  gen_rows = [
    tuple(state_dict[f"blocks.{j}.param_generator1.0.weight"].shape)[0]
    for j in sorted(nerf)
    if f"blocks.{j}.param_generator1.0.weight" in state_dict
  ]
  if gen_rows:
    mlp_ratio, rem = divmod(gen_rows[0], 2 * hidden_x * hidden_x)
    if rem or mlp_ratio < 1:
      raise ValueError(
        f"Cannot infer nerf_mlp_ratio: param_generator1 has {gen_rows[0]} outputs, not a "
        f"multiple of 2*hx^2 = {2 * hidden_x * hidden_x}."
      )
  return dict(
    patch_size=patch,
    hidden_size=hidden,
    num_heads=hidden // head_dims[0],
    num_blocks=nb,
    num_cond_blocks=nc,
    nerf_hidden_size=hidden_x,
    nerf_mlp_ratio=mlp_ratio,
    num_classes=num_classes,
    in_channels=channels,
  )
