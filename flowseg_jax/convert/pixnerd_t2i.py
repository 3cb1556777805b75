"""Official PixNerd text-to-image (PyTorch) checkpoints <-> flowseg_jax `PixNerdT2I` parameters.

Torch -> Flax: read a Lightning `.ckpt`, a plain state dict or a `.safetensors` file (the
readers and the EMA / online / `_orig_mod.` selection are those of `convert.pixnerd`); infer the
architecture from the tensor shapes; check that every expected tensor is present with the
expected shape and nothing is left over (one error naming every missing / unexpected /
mis-shaped key with both shapes); map each tensor (Linear weights transposed, the patch
embedding's input axis permuted from torch's channel-major unfold order to channels-last,
blocks as `blocks_{i}` / `text_refine_blocks_{i}` or stacked for `nn.scan`). `flax_to_torch`
gives the official names and layouts back; a round trip is exact.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from flowseg_jax.convert import common
from flowseg_jax.convert.pixnerd import read_checkpoint_file, select_weights
from flowseg_jax.convert.pixnerd_names import (
  _NERF_BLOCK_ENTRIES,
  _fmt_config,
  _to_flax_layout,
  _to_torch_layout,
)
from flowseg_jax.models import pixnerd_t2i
from flowseg_jax.models.pixnerd_t2i import PixNerdT2I

# (torch name, flax path, transform). "linear": weight.T; "patch": weight.T with the input axis
# permuted from (C, p, p) to (p, p, C); "copy": as is (the transforms of `convert.pixnerd`, which
# read only `patch_size` and `in_channels` off the model).
_GLOBAL_ENTRIES = (
  ("y_pos_embedding", ("y_pos_embedding",), "copy"),
  ("s_embedder.proj.weight", ("s_embedder", "kernel"), "patch"),
  ("s_embedder.proj.bias", ("s_embedder", "bias"), "copy"),
  ("x_embedder.embedder.0.weight", ("x_embedder", "kernel"), "linear"),
  ("x_embedder.embedder.0.bias", ("x_embedder", "bias"), "copy"),
  ("t_embedder.mlp.0.weight", ("t_embedder", "mlp_0", "kernel"), "linear"),
  ("t_embedder.mlp.0.bias", ("t_embedder", "mlp_0", "bias"), "copy"),
  ("t_embedder.mlp.2.weight", ("t_embedder", "mlp_2", "kernel"), "linear"),
  ("t_embedder.mlp.2.bias", ("t_embedder", "mlp_2", "bias"), "copy"),
  ("y_embedder.proj.weight", ("y_embedder", "proj", "kernel"), "linear"),
  ("y_embedder.proj.bias", ("y_embedder", "proj", "bias"), "copy"),
  ("y_embedder.norm.weight", ("y_embedder", "norm", "scale"), "copy"),
  ("final_layer.linear.weight", ("final_layer", "kernel"), "linear"),
  ("final_layer.linear.bias", ("final_layer", "bias"), "copy"),
)
_MODULATED_ENTRIES = (
  ("norm1.weight", ("norm1", "scale"), "copy"),
  ("attn.q_norm.weight", ("attn", "q_norm", "scale"), "copy"),
  ("attn.k_norm.weight", ("attn", "k_norm", "scale"), "copy"),
  ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
  ("attn.proj.bias", ("attn", "proj", "bias"), "copy"),
  ("norm2.weight", ("norm2", "scale"), "copy"),
  ("mlp.w12.weight", ("mlp", "w12", "kernel"), "linear"),
  ("mlp.w3.weight", ("mlp", "w3", "kernel"), "linear"),
  ("adaLN_modulation.0.weight", ("adaLN_modulation", "kernel"), "linear"),
  ("adaLN_modulation.0.bias", ("adaLN_modulation", "bias"), "copy"),
)
_ENCODER_ENTRIES = _MODULATED_ENTRIES + (
  ("attn.qkv_x.weight", ("attn", "qkv_x", "kernel"), "linear"),
  ("attn.kv_y.weight", ("attn", "kv_y", "kernel"), "linear"),
)
_TEXT_ENTRIES = _MODULATED_ENTRIES + (("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),)


def _entries(model: PixNerdT2I):
  """Yields (torch name, flax path, stack index or None, transform) for every tensor."""
  for name, path, kind in _GLOBAL_ENTRIES:
    yield name, path, None, kind
  ne = model.num_encoder_blocks
  groups = (
    ("text_refine_blocks", "text_refine_blocks", 0, model.num_text_blocks, _TEXT_ENTRIES),
    ("blocks", "encoder_blocks", 0, ne, _ENCODER_ENTRIES),
    ("blocks", "decoder_blocks", ne, model.num_decoder_blocks, _NERF_BLOCK_ENTRIES),
  )
  for prefix, scan_name, first, count, table in groups:
    for j in range(count):
      for suffix, sub, kind in table:
        if model.scan_blocks:
          path, index = (scan_name,) + sub, j
        else:
          path, index = (f"{prefix}_{first + j}",) + sub, None
        yield f"{prefix}.{first + j}.{suffix}", path, index, kind


def map_flax_to_torch(params: Mapping, model: PixNerdT2I) -> dict[str, Any]:
  """Flax params -> {official torch name: array}; array-type agnostic (works under eval_shape)."""
  layout = "scanned" if model.scan_blocks else "unscanned"
  to_torch = lambda w, kind: _to_torch_layout(w, kind, model)
  return common.params_to_torch(params, _entries(model), to_torch, layout)


def expected_torch_shapes(model: PixNerdT2I) -> dict[str, tuple[int, ...]]:
  """Official state-dict names and shapes of `model`'s architecture."""
  abstract = pixnerd_t2i.abstract_params(model)
  shapes = jax.eval_shape(lambda p: map_flax_to_torch(p, model), abstract)
  return {k: tuple(v.shape) for k, v in shapes.items()}


def flax_to_torch(params: Mapping, model: PixNerdT2I) -> dict[str, np.ndarray]:
  """Flax params -> official torch state dict {name: contiguous np.ndarray} (no prefix)."""
  return {
    k: np.ascontiguousarray(np.asarray(v)) for k, v in map_flax_to_torch(params, model).items()
  }


def check_state_dict(
  state_dict: Mapping[str, Any], model: PixNerdT2I, *, source: str = "state dict"
) -> None:
  """Raises one ValueError naming every missing, unexpected and mis-shaped tensor."""
  header = f"{source} does not match PixNerdT2I({_fmt_config(model.arch_config())}):"
  common.check_shapes(state_dict, expected_torch_shapes(model), header)


def torch_to_flax(
  state_dict: Mapping[str, Any], model: PixNerdT2I, *, source: str = "state dict"
) -> dict:
  """Official T2I denoiser state dict (names without prefix) -> plain Flax params for `model`.

  Raises:
    ValueError: listing every missing / unexpected / mis-shaped key.
  """
  check_state_dict(state_dict, model, source=source)
  to_flax = lambda w, kind: _to_flax_layout(w, kind, model)
  return common.torch_to_params(state_dict, _entries(model), to_flax, model.param_dtype)


def relayout(params: Mapping, model: PixNerdT2I, *, scan_blocks: bool) -> tuple[PixNerdT2I, dict]:
  """Converts params between the unscanned and scanned (stacked) layouts."""
  target = model.clone(scan_blocks=scan_blocks)
  return target, torch_to_flax(flax_to_torch(params, model), target)


_BLOCK_KEY = re.compile(r"^(blocks|text_refine_blocks)\.(\d+)\.(.+)$")


def infer_model_config(state_dict: Mapping[str, Any]) -> dict[str, int]:
  """Reads the architecture (PixNerdT2I keyword arguments) off a denoiser state dict's shapes."""

  def shape(key: str) -> tuple[int, ...]:
    if key not in state_dict:
      raise ValueError(f"Cannot infer the PixNerd-T2I config: tensor {key!r} is missing.")
    return tuple(state_dict[key].shape)

  pos = shape("y_pos_embedding")
  if len(pos) != 3 or pos[0] != 1:
    raise ValueError(
      f"Cannot infer the PixNerd-T2I config: y_pos_embedding is {pos}, not (1, T, D)."
    )
  _, text_length, hidden = pos
  text_dim = shape("y_embedder.proj.weight")[1]
  hidden_x, in_plus_pos = shape("x_embedder.embedder.0.weight")
  channels = in_plus_pos - pixnerd_t2i.DECODER_POS_FEATURES
  patch_dim = shape("s_embedder.proj.weight")[1]
  patch = math.isqrt(patch_dim // channels) if channels > 0 else 0
  if channels <= 0 or patch * patch * channels != patch_dim:
    raise ValueError(
      f"Cannot infer the PixNerd-T2I config: s_embedder.proj.weight {shape('s_embedder.proj.weight')}"
      f" is not (D, C*p*p) for C={channels} from x_embedder.embedder.0.weight."
    )
  enc_suffixes = {s for s, _, _ in _ENCODER_ENTRIES}
  dec_suffixes = {s for s, _, _ in _NERF_BLOCK_ENTRIES}
  enc, dec, txt = set(), set(), set()
  for key in state_dict:
    m = _BLOCK_KEY.match(key)
    if not m:
      continue
    index = int(m.group(2))
    if m.group(1) == "text_refine_blocks":
      txt.add(index)
    elif m.group(3) in enc_suffixes:
      enc.add(index)
    elif m.group(3) in dec_suffixes:
      dec.add(index)
  ne, nd, nt = len(enc), len(dec), len(txt)
  if enc != set(range(ne)) or dec != set(range(ne, ne + nd)) or txt != set(range(nt)):
    raise ValueError(
      "Cannot infer the PixNerd-T2I config: encoder blocks must be blocks.0..{ne-1}, decoder "
      f"blocks the ones after, text blocks text_refine_blocks.0..; found encoder {sorted(enc)}, "
      f"decoder {sorted(dec)}, text {sorted(txt)}."
    )
  head_dim = shape("blocks.0.attn.q_norm.weight")[0]
  if head_dim == 0 or hidden % head_dim:
    raise ValueError(
      f"Cannot infer the number of heads from q_norm size {head_dim} and D={hidden}."
    )
  mlp_ratio = 2
  if nd:
    rows = shape(f"blocks.{ne}.param_generator1.0.weight")[0]
    mlp_ratio, rem = divmod(rows, 2 * hidden_x * hidden_x)
    if rem or mlp_ratio < 1:
      raise ValueError(
        f"Cannot infer decoder_mlp_ratio: blocks.{ne}.param_generator1.0.weight has {rows} rows, "
        f"not a multiple of 2*hx^2 = {2 * hidden_x * hidden_x}."
      )
  return dict(
    patch_size=patch,
    hidden_size=hidden,
    num_heads=hidden // head_dim,
    num_encoder_blocks=ne,
    num_decoder_blocks=nd,
    num_text_blocks=nt,
    decoder_hidden_size=hidden_x,
    decoder_mlp_ratio=mlp_ratio,
    text_dim=text_dim,
    text_length=text_length,
    in_channels=channels,
  )


def from_state_dict(
  checkpoint: Mapping[str, Any],
  weights: str = "ema",
  *,
  source: str = "checkpoint",
  scan_blocks: bool = False,
  **model_overrides,
) -> tuple[PixNerdT2I, dict]:
  """(model, params) from an in-memory Lightning checkpoint or (prefixed) state dict."""
  state_dict = select_weights(checkpoint, weights, source=source)
  config = infer_model_config(state_dict)
  clash = sorted(set(model_overrides) & set(config))
  if clash:
    raise ValueError(f"Architecture fields {clash} come from the checkpoint; do not override them.")
  model = PixNerdT2I(**config, scan_blocks=scan_blocks, **model_overrides)
  model.check_config()
  return model, torch_to_flax(state_dict, model, source=f"{source} ({weights} weights)")


def load_torch_checkpoint(
  path: str | os.PathLike, weights: str = "ema", *, scan_blocks: bool = False, **model_overrides
) -> tuple[PixNerdT2I, dict]:
  """Reads an official T2I checkpoint and returns `(model, params)`, ready for `model.apply`.

  Args:
    path: Lightning `.ckpt` (e.g. the released `model.ckpt`), torch state dict or `.safetensors`.
    weights: 'ema' (`ema_denoiser.*`, the copy the official demo samples with) or 'online'
      (`denoiser.*`); ignored for plain (unprefixed) state dicts.
    scan_blocks: return the stacked (nn.scan) layout.
    **model_overrides: non-architecture fields (dtype, attention_impl, remat_policy).

  Returns:
    The configured module and plain (unboxed) params of NumPy arrays.
  """
  source = os.fspath(path)
  return from_state_dict(
    read_checkpoint_file(path), weights, source=source, scan_blocks=scan_blocks, **model_overrides
  )
