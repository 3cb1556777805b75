"""Official DINOv2 (PyTorch) checkpoints -> `flowseg_jax.models.dinov2.DinoViT` params, and back.

Also converts the REPA projector stored in PixNerd training checkpoints
(`diffusion_trainer.proj.0.{0,2,4}.{weight,bias}`) to and from `models.repa.Projector` params.

Input checkpoints: the torch-hub files (e.g. `dinov2_vitb14_pretrain.pth`, a plain state dict) or
a safetensors file with the same key names. Key map (torch -> flax), Linear weights transposed,
the patch-embedding conv weight (D, 3, p, p) -> (p, p, 3, D):

  cls_token, pos_embed, register_tokens        -> same names, same shapes
  patch_embed.proj.{weight,bias}               -> patch_embed/{kernel,bias}
  blocks.{i}.norm{1,2}.{weight,bias}           -> blocks_{i}/norm{1,2}/{scale,bias}
  blocks.{i}.attn.{qkv,proj}.{weight,bias}     -> blocks_{i}/attn/{qkv,proj}/{kernel,bias}
  blocks.{i}.ls{1,2}.gamma                     -> blocks_{i}/ls{1,2}/gamma
  blocks.{i}.mlp.{fc1,fc2}.{weight,bias}       -> blocks_{i}/mlp/{fc1,fc2}/{kernel,bias}
  norm.{weight,bias}                           -> norm/{scale,bias}
  mask_token                                   -> ignored (only used for masked training inputs)

Checks are strict: every other missing, unexpected or mis-shaped name is reported in one
ValueError. The head count is not stored in a checkpoint; `infer_dinov2_config` assumes the
head_dim of 64 shared by all released DINOv2 models unless told otherwise.

Command line (dispatched by `flowseg convert dinov2 ...`):
  flowseg convert dinov2 --ckpt dinov2_vitb14_pretrain.pth --out /path/to/dinov2_vitb14
writes an orbax checkpoint `DIR/params` and `DIR/config.json`; `load_orbax(DIR)` reads it back.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import storage
from flowseg_jax.convert import common, torch_files
from flowseg_jax.models import dinov2

IGNORED_KEYS = ("mask_token",)
DEFAULT_HEAD_DIM = 64
PROJECTOR_PREFIX = "diffusion_trainer.proj.0."
PROJECTOR_LAYERS = (0, 2, 4)
EXPORT_FORMAT = "flowseg_jax.dinov2/1"

# (torch suffix, flax path, kind) for one block; kind: "copy" | "linear" (transpose) | "conv".
_BLOCK_ENTRIES = (
  ("norm1.weight", ("norm1", "scale"), "copy"),
  ("norm1.bias", ("norm1", "bias"), "copy"),
  ("attn.qkv.weight", ("attn", "qkv", "kernel"), "linear"),
  ("attn.qkv.bias", ("attn", "qkv", "bias"), "copy"),
  ("attn.proj.weight", ("attn", "proj", "kernel"), "linear"),
  ("attn.proj.bias", ("attn", "proj", "bias"), "copy"),
  ("ls1.gamma", ("ls1", "gamma"), "copy"),
  ("norm2.weight", ("norm2", "scale"), "copy"),
  ("norm2.bias", ("norm2", "bias"), "copy"),
  ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear"),
  ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "copy"),
  ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear"),
  ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "copy"),
  ("ls2.gamma", ("ls2", "gamma"), "copy"),
)


def _float32(value: Any, name: str) -> np.ndarray:
  """A state-dict entry as float32 NumPy (DINOv2's weights are all floats)."""
  return np.asarray(common.to_numpy(value, name), np.float32)


def _torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
  if kind == "linear":
    return flax_shape[::-1]
  if kind == "conv":  # (p, p, C, D) -> (D, C, p, p)
    return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
  return flax_shape


def _to_flax_layout(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return array.T
  if kind == "conv":
    return array.transpose(2, 3, 1, 0)
  return array


def _to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
  if kind == "linear":
    return array.T
  if kind == "conv":
    return array.transpose(3, 2, 0, 1)
  return array


def _name_map(model: dinov2.DinoViT) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch name, flax path, kind) for every parameter of `model`."""
  entries = [
    ("cls_token", ("cls_token",), "copy"),
    ("pos_embed", ("pos_embed",), "copy"),
    ("patch_embed.proj.weight", ("patch_embed", "kernel"), "conv"),
    ("patch_embed.proj.bias", ("patch_embed", "bias"), "copy"),
  ]
  if model.num_register_tokens:
    entries.append(("register_tokens", ("register_tokens",), "copy"))
  for i in range(model.depth):
    for suffix, path, kind in _BLOCK_ENTRIES:
      if not model.layerscale and path[0] in ("ls1", "ls2"):
        continue
      entries.append((f"blocks.{i}.{suffix}", (f"blocks_{i}", *path), kind))
  entries += [("norm.weight", ("norm", "scale"), "copy"), ("norm.bias", ("norm", "bias"), "copy")]
  return entries


def _get(tree: Mapping, path: Sequence[str]):
  for k in path:
    tree = tree[k]
  return tree


def expected_torch_shapes(model: dinov2.DinoViT) -> dict[str, tuple[int, ...]]:
  """Official state-dict name -> shape for `model` (without the ignored `mask_token`)."""
  abstract = dinov2.abstract_params(model)
  return {
    name: _torch_shape(tuple(_get(abstract, path).shape), kind)
    for name, path, kind in _name_map(model)
  }


def _check_keys(
  state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
  """One ValueError listing every missing, unexpected and mis-shaped name."""
  names = set(state_dict) - set(IGNORED_KEYS)
  missing = sorted(set(expected) - names)
  unexpected = sorted(names - set(expected))
  misshaped = sorted(
    f"{k}: checkpoint {tuple(state_dict[k].shape)} vs expected {expected[k]}"
    for k in names & set(expected)
    if tuple(state_dict[k].shape) != tuple(expected[k])
  )
  if missing or unexpected or misshaped:
    lines = [f"{what}: state dict does not match the model."]
    if missing:
      lines.append(f"  missing ({len(missing)}): {', '.join(missing)}")
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected)}")
    if misshaped:
      lines.append(f"  mis-shaped ({len(misshaped)}): {'; '.join(misshaped)}")
    raise ValueError("\n".join(lines))


def infer_dinov2_config(
  state_dict: Mapping[str, Any], *, num_heads: int | None = None
) -> dict[str, Any]:
  """Architecture of an official DINOv2 state dict, as `DinoViT` keyword arguments.

  Args:
    state_dict: official names -> tensors/arrays (only shapes are read).
    num_heads: head count; default embed_dim // 64 (true for every released DINOv2 model).

  Returns:
    Dict with every field of `dinov2.ARCH_FIELDS`. The interpolation fields follow the hub
    models: offset 0.1 without antialias without registers, offset 0.0 with antialias with them.

  Raises:
    ValueError: for a state dict that is not a DINOv2 ViT with an MLP feed-forward (e.g. SwiGLU
      ViT-g, chunked training layouts, HuggingFace names), with the offending keys.
  """
  required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
  absent = [k for k in required if k not in state_dict]
  if absent:
    raise ValueError(
      f"Not an official DINOv2 state dict: missing {absent} (first keys: {sorted(state_dict)[:8]})."
    )
  if any(".mlp.w12." in k for k in state_dict):
    raise ValueError("DINOv2 checkpoints with a SwiGLU feed-forward (ViT-g/14) are not supported.")
  block_ids = set()
  for k in state_dict:
    m = re.match(r"blocks\.(\d+)\.(\d+\.)?", k)
    if m:
      if m.group(2):
        raise ValueError(f"Chunked block layout (key {k!r}) is not supported; use the hub layout.")
      block_ids.add(int(m.group(1)))
  depth = len(block_ids)
  if depth == 0 or block_ids != set(range(depth)):
    raise ValueError(f"DINOv2 state dict has non-contiguous block indices {sorted(block_ids)}.")
  embed_dim = int(state_dict["cls_token"].shape[-1])
  weight = state_dict["patch_embed.proj.weight"]
  if len(weight.shape) != 4 or weight.shape[-1] != weight.shape[-2]:
    raise ValueError(
      f"patch_embed.proj.weight has shape {tuple(weight.shape)}, expected (D,3,p,p)."
    )
  patch_size = int(weight.shape[-1])
  grid2 = int(state_dict["pos_embed"].shape[1]) - 1
  grid = int(round(grid2**0.5))
  if grid * grid != grid2:
    raise ValueError(f"pos_embed has {grid2} patch positions, not a square grid.")
  if num_heads is None:
    if embed_dim % DEFAULT_HEAD_DIM:
      raise ValueError(f"embed_dim {embed_dim} is not a multiple of 64; pass num_heads.")
    num_heads = embed_dim // DEFAULT_HEAD_DIM
  fc1 = state_dict.get("blocks.0.mlp.fc1.weight")
  if fc1 is None:
    raise ValueError("DINOv2 state dict has no blocks.0.mlp.fc1.weight (MLP feed-forward).")
  registers = int(state_dict["register_tokens"].shape[1]) if "register_tokens" in state_dict else 0
  return dict(
    patch_size=patch_size,
    embed_dim=embed_dim,
    depth=depth,
    num_heads=int(num_heads),
    mlp_ratio=float(fc1.shape[0]) / embed_dim,
    num_register_tokens=registers,
    pretrain_img_size=grid * patch_size,
    layerscale="blocks.0.ls1.gamma" in state_dict,
    interpolate_offset=0.0 if registers else 0.1,
    interpolate_antialias=bool(registers),
  )


def dinov2_torch_to_flax(state_dict: Mapping[str, Any], model: dinov2.DinoViT) -> dict:
  """Official DINOv2 state dict -> `model` params (nested dict of float32 jax arrays).

  Args:
    state_dict: official names -> torch tensors or arrays; `mask_token` is ignored.
    model: the `DinoViT` the params are for (e.g. `DinoViT(**infer_dinov2_config(sd))`).

  Returns:
    The `params` collection for `model.apply({"params": params}, image)`.

  Raises:
    ValueError: listing every missing, unexpected and mis-shaped key.
  """
  _check_keys(state_dict, expected_torch_shapes(model), "dinov2_torch_to_flax")
  params: dict = {}
  for name, path, kind in _name_map(model):
    common.set_path(
      params, path, jnp.asarray(_to_flax_layout(_float32(state_dict[name], name), kind))
    )
  return params


def dinov2_flax_to_torch(params: Mapping, model: dinov2.DinoViT) -> dict[str, np.ndarray]:
  """`model` params -> official state-dict names (float32 numpy; no `mask_token`)."""
  return {
    name: np.ascontiguousarray(_to_torch_layout(np.asarray(_get(params, path), np.float32), kind))
    for name, path, kind in _name_map(model)
  }


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a torch `.pth`/`.pt` state dict (weights only) or a `.safetensors` file.

  A dict wrapping the state dict under "state_dict" or "model" is unwrapped.
  """
  obj = torch_files.read(path, "DINOv2 checkpoint")[0]
  for wrapper in ("state_dict", "model"):
    if isinstance(obj.get(wrapper), Mapping):
      obj = obj[wrapper]
  return dict(obj)


def load_dinov2_torch(
  path: str | os.PathLike, *, dtype: Any = jnp.float32, num_heads: int | None = None
) -> tuple[dinov2.DinoViT, dict]:
  """Reads an official DINOv2 checkpoint file -> (model, params).

  Args:
    path: `.pth` (e.g. the hub's `dinov2_vitb14_pretrain.pth`) or `.safetensors` with official
      key names.
    dtype: compute dtype of the returned model (params are float32 either way).
    num_heads: override for checkpoints whose head_dim is not 64.
  """
  state_dict = read_state_dict(path)
  try:
    config = infer_dinov2_config(state_dict, num_heads=num_heads)
    model = dinov2.DinoViT(**config, dtype=dtype)
    return model, dinov2_torch_to_flax(state_dict, model)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}") from e


def save_orbax(
  params: Mapping, config: Mapping[str, Any], out_dir: str | os.PathLike, *, overwrite=False
) -> None:
  """Writes converted teacher params (orbax, `out_dir/params`) and `out_dir/config.json`.

  Args:
    params: `DinoViT` params.
    config: architecture fields (`model.arch_config` or `infer_dinov2_config(...)`).
    out_dir: target directory (created).
    overwrite: replace an existing export instead of failing.
  """
  import orbax.checkpoint as ocp

  unknown = set(config) - set(dinov2.ARCH_FIELDS)
  if unknown:
    raise ValueError(f"save_orbax: unknown config fields {sorted(unknown)}.")
  out_dir = storage.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(out_dir / "params", jax.tree.map(jnp.asarray, params), force=overwrite)
  ckpt.wait_until_finished()
  ckpt.close()
  meta = {"format": EXPORT_FORMAT, "config": dict(config)}
  (out_dir / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_orbax(
  out_dir: str | os.PathLike, *, dtype: Any = jnp.float32, sharding: Any = None
) -> tuple[dinov2.DinoViT, dict]:
  """Reads a `save_orbax` export -> (model, params).

  Args:
    out_dir: the export directory.
    dtype: compute dtype of the returned model.
    sharding: a `jax.sharding.Sharding` for every parameter (e.g. replicated over the mesh);
      default: the first local device.
  """
  import orbax.checkpoint as ocp

  out_dir = storage.path(out_dir)
  config_path = out_dir / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{config_path} not found: not a converted DINOv2 export.")
  meta = json.loads(config_path.read_text())
  if meta.get("format") != EXPORT_FORMAT:
    raise ValueError(f"{config_path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}.")
  model = dinov2.DinoViT(**meta["config"], dtype=dtype)
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
    dinov2.abstract_params(model),
  )
  ckpt = ocp.StandardCheckpointer()
  params = ckpt.restore(out_dir / "params", target)
  ckpt.close()
  return model, params


# ---------------------------------------------------------------------------------------------
# REPA projector (PixNerd `diffusion_trainer.proj`).
# ---------------------------------------------------------------------------------------------


def projector_from_torch(state_dict: Mapping[str, Any], *, prefix: str = PROJECTOR_PREFIX) -> dict:
  """PixNerd REPA projector weights -> `models.repa.Projector` params.

  Args:
    state_dict: names -> tensors/arrays; only `{prefix}{0,2,4}.{weight,bias}` are read (other keys,
      e.g. the denoiser's, are ignored). A Lightning checkpoint dict with "state_dict" is unwrapped.
    prefix: key prefix of the projector's Sequential (PixNerd: "diffusion_trainer.proj.0.").

  Returns:
    {"layers_0": {"kernel", "bias"}, "layers_2": ..., "layers_4": ...} of float32 jax arrays.
  """
  if isinstance(state_dict.get("state_dict"), Mapping):
    state_dict = state_dict["state_dict"]
  names = [f"{prefix}{i}.{w}" for i in PROJECTOR_LAYERS for w in ("weight", "bias")]
  missing = [k for k in names if k not in state_dict]
  if missing:
    raise ValueError(f"projector_from_torch: missing keys {missing}.")
  arrays = {k: _float32(state_dict[k], k) for k in names}
  problems = []
  prev_out = None
  for i in PROJECTOR_LAYERS:
    w, b = arrays[f"{prefix}{i}.weight"], arrays[f"{prefix}{i}.bias"]
    if w.ndim != 2 or b.shape != (w.shape[0],):
      problems.append(f"{prefix}{i}: weight {w.shape} / bias {b.shape} is not a Linear layer")
    elif prev_out is not None and w.shape[1] != prev_out:
      problems.append(f"{prefix}{i}.weight: input width {w.shape[1]} != previous output {prev_out}")
    prev_out = w.shape[0] if w.ndim == 2 else None
  if problems:
    raise ValueError("projector_from_torch: " + "; ".join(problems))
  return {
    f"layers_{i}": {
      "kernel": jnp.asarray(arrays[f"{prefix}{i}.weight"].T),
      "bias": jnp.asarray(arrays[f"{prefix}{i}.bias"]),
    }
    for i in PROJECTOR_LAYERS
  }


def projector_to_torch(params: Mapping, *, prefix: str = PROJECTOR_PREFIX) -> dict[str, np.ndarray]:
  """`models.repa.Projector` params -> PixNerd names `{prefix}{0,2,4}.{weight,bias}` (numpy)."""
  out = {}
  for i in PROJECTOR_LAYERS:
    layer = params[f"layers_{i}"]
    out[f"{prefix}{i}.weight"] = np.ascontiguousarray(np.asarray(layer["kernel"], np.float32).T)
    out[f"{prefix}{i}.bias"] = np.asarray(layer["bias"], np.float32)
  return out


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def cli(argv: Sequence[str] | None = None) -> int:
  """`flowseg convert dinov2 --ckpt FILE --out DIR [--overwrite] [--num_heads N]`."""
  parser = argparse.ArgumentParser(
    prog="flowseg convert dinov2",
    description="Convert an official DINOv2 checkpoint (.pth/.safetensors) to an orbax export.",
  )
  parser.add_argument("--ckpt", required=True, help="e.g. dinov2_vitb14_pretrain.pth")
  parser.add_argument("--out", required=True, help="output directory (params/ + config.json)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing export")
  parser.add_argument("--num_heads", type=int, default=None, help="default: embed_dim // 64")
  args = parser.parse_args(argv)
  model, params = load_dinov2_torch(args.ckpt, num_heads=args.num_heads)
  save_orbax(params, model.arch_config, args.out, overwrite=args.overwrite)
  print(
    f"Converted {args.ckpt} -> {args.out}: {dinov2.count_params(params):,} parameters, "
    f"config {json.dumps(model.arch_config, sort_keys=True)}"
  )
  return 0
