"""Official PixNerd (PyTorch) checkpoints <-> flowseg_jax `PixNerDiT` parameters.

Torch -> Flax: read a Lightning `.ckpt` (`torch.load(weights_only=True)`), a plain state dict or a
`.safetensors` file; pick the EMA (`ema_denoiser.*`) or online (`denoiser.*`) copy; infer the
architecture from the tensor shapes; check that every expected tensor is present with the
expected shape and nothing is left over (one error listing every missing / unexpected /
mis-shaped name); map each tensor (Linear weights transposed, the patch embedding's input axis
permuted from torch's channel-major unfold order to channels-last (row, column, channel), blocks
either as `blocks_{i}` or stacked for `nn.scan`). The reverse map gives the official names and
layouts back; a round trip is exact.

CLI: `flowseg convert pixnerd --ckpt FILE --out DIR [--weights ema|online] [--model XL/16]`
writes `DIR/checkpoint` (orbax, pytree `{'params': params}`), `DIR/model_config.json` (the
`PixNerDiT` keyword arguments), `DIR/conversion.json` (provenance) and, when the checkpoint holds
PixNerd's REPA projector (`diffusion_trainer.proj.0.*`), `DIR/projector` (orbax, `repa.Projector`
params) for training to start REPA from (config.repa.init_projector).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from flowseg_jax import storage
from flowseg_jax.convert import common, torch_files
from flowseg_jax.models import pixnerd
from flowseg_jax.models.nerf import DCT_MAX_FREQS
from flowseg_jax.models.pixnerd import PixNerDiT

WEIGHT_PREFIXES = {"ema": "ema_denoiser.", "online": "denoiser."}
CHECKPOINT_SUBDIR = "checkpoint"
MODEL_CONFIG_FILE = "model_config.json"
CONVERSION_INFO_FILE = "conversion.json"
PROJECTOR_SUBDIR = "projector"

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


def read_checkpoint_file(path: str | os.PathLike) -> Mapping[str, Any]:
  """Loads a `.safetensors` file or a torch pickle (Lightning `.ckpt`, `.pt`) as a mapping.

  Torch files are memory-mapped when their format allows: no tensor is read until it is used.
  """
  return torch_files.read(path, "PixNerd checkpoint")[0]


def select_weights(
  checkpoint: Mapping[str, Any], weights: str = "ema", *, source: str = "checkpoint"
) -> dict[str, Any]:
  """Picks the denoiser tensors of a Lightning checkpoint or (prefixed) state dict.

  `ckpt['state_dict']` is used when present; `_orig_mod.` (torch.compile) is stripped anywhere
  in a name. If names carry `ema_denoiser.` / `denoiser.` prefixes, the copy named by `weights`
  ('ema' or 'online') is returned without its prefix and everything else (the other copy, the
  REPA projector `diffusion_trainer.*`) is ignored; otherwise the dict is taken as a plain
  denoiser state dict.
  """
  if weights not in WEIGHT_PREFIXES:
    raise ValueError(f"weights={weights!r}; expected one of {sorted(WEIGHT_PREFIXES)}.")
  sd = checkpoint.get("state_dict", checkpoint)
  if not isinstance(sd, Mapping):
    raise ValueError(f"{source}: 'state_dict' is a {type(sd).__name__}, not a mapping.")
  sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
  if not any(k.startswith(tuple(WEIGHT_PREFIXES.values())) for k in sd):
    logging.info(
      "%s: plain state dict (no denoiser prefixes); weights=%r ignored.", source, weights
    )
    return sd
  prefix = WEIGHT_PREFIXES[weights]
  picked = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
  if not picked:
    roots = sorted({k.split(".", 1)[0] for k in sd})
    raise ValueError(
      f"{source} has no '{prefix}*' tensors for weights={weights!r}; top-level names: {roots}."
    )
  return picked


def load_torch_checkpoint(
  path: str | os.PathLike, weights: str = "ema", *, scan_blocks: bool = False, **model_overrides
) -> tuple[PixNerDiT, dict]:
  """Reads an official checkpoint and returns `(model, params)`, ready for `model.apply`.

  Args:
    path: Lightning `.ckpt`, torch state dict file or `.safetensors`.
    weights: 'ema' (the copy used for sampling) or 'online'.
    scan_blocks: return the stacked (nn.scan) layout.
    **model_overrides: non-architecture `PixNerDiT` fields (dtype, attention_impl, remat_policy).

  Returns:
    The configured module and plain (unboxed) params of NumPy arrays.
  """
  source = os.fspath(path)
  return _from_checkpoint(read_checkpoint_file(path), weights, source, scan_blocks, model_overrides)


def _from_checkpoint(raw, weights, source, scan_blocks, model_overrides, **convert_options):
  state_dict = select_weights(raw, weights, source=source)
  config = infer_model_config(state_dict)
  clash = sorted(set(model_overrides) & set(config))
  if clash:
    raise ValueError(f"Architecture fields {clash} come from the checkpoint; do not override them.")
  model = PixNerDiT(**config, scan_blocks=scan_blocks, **model_overrides)
  model.check_config()
  source = f"{source} ({weights} weights)"
  return model, _convert_tensors(state_dict, model, source=source, **convert_options)


def _check_variant(model: PixNerDiT, variant: str) -> None:
  if variant not in pixnerd.VARIANTS:
    raise ValueError(f"Unknown variant {variant!r}; known: {sorted(pixnerd.VARIANTS)}.")
  want = pixnerd.make_model(variant).arch_config()
  got = model.arch_config()
  diff = [f"{k}: checkpoint {got[k]}, {variant} {want[k]}" for k in want if got[k] != want[k]]
  if diff:
    raise ValueError(f"Checkpoint is not PixNerd {variant}: " + "; ".join(diff))


def convert_to_orbax(
  ckpt_path: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  weights: str = "ema",
  variant: str | None = None,
  scan_blocks: bool = False,
  overwrite: bool = False,
) -> str:
  """Converts an official checkpoint into an orbax checkpoint that training can start from.

  Writes `out_dir/checkpoint` (orbax StandardCheckpointer, pytree `{'params': params}`),
  `out_dir/model_config.json` (PixNerDiT kwargs, `scan_blocks` included) and
  `out_dir/conversion.json` (source, weights, step, counts).

  Returns:
    The absolute path of the orbax checkpoint directory.
  """
  import orbax.checkpoint as ocp

  source = os.fspath(ckpt_path)
  out_dir = storage.path(out_dir)
  ckpt_dir = out_dir / CHECKPOINT_SUBDIR
  if ckpt_dir.exists() and not overwrite:
    raise ValueError(f"{ckpt_dir} already exists; pass overwrite=True (--overwrite) to replace.")
  # Memory: only the chosen copy is read, tensor by tensor; each source tensor's pages are dropped
  # once copied, and each converted leaf becomes a jax CPU array, which orbax writes without
  # another host copy. Peak: about the chosen weights plus the imports (benchmarks/convert_memory.py).
  raw, mapped = torch_files.read(source, "PixNerd checkpoint")
  cpu = jax.devices("cpu")[0]
  model, params = _from_checkpoint(
    raw,
    weights,
    source,
    scan_blocks,
    {},
    release=torch_files.release_mapped_pages if mapped else None,
    place=lambda a: jax.device_put(a, cpu),
  )
  if variant is not None:
    _check_variant(model, variant)
  out_dir.mkdir(parents=True, exist_ok=True)
  # Uncompressed (float weights hardly compress) and at most 1 GB in flight: compression buffers
  # would hold another copy of the weights. StandardCheckpointer restores it like any other.
  handler = ocp.PyTreeCheckpointHandler(use_compression=False, save_concurrent_gb=1)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(ckpt_dir, args=ocp.args.PyTreeSave({"params": params}), force=overwrite)
  projector = _projector_params(raw, source)
  if projector is not None:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(out_dir / PROJECTOR_SUBDIR, projector, force=overwrite)
  config = {**model.arch_config(), "scan_blocks": scan_blocks}
  (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2))
  info = dict(
    source=os.path.abspath(os.fspath(ckpt_path)),
    weights=weights,
    global_step=int(raw["global_step"]) if isinstance(raw.get("global_step"), int) else None,
    num_tensors=len(expected_torch_shapes(model)),
    num_params=pixnerd.count_params(params),
    variant=variant,
    repa_projector=projector is not None,
  )
  (out_dir / CONVERSION_INFO_FILE).write_text(json.dumps(info, indent=2))
  return str(ckpt_dir)


def _projector_params(raw: Mapping[str, Any], source: str) -> dict | None:
  """PixNerd's REPA projector (`diffusion_trainer.proj.0.*`) as `repa.Projector` params, or None.

  An incomplete projector is reported and skipped: the denoiser alone is still a valid export.
  """
  from flowseg_jax.convert import dinov2 as dinov2_convert

  sd = raw.get("state_dict", raw)
  sd = {k.replace("_orig_mod.", ""): v for k, v in sd.items()}
  if not any(k.startswith(dinov2_convert.PROJECTOR_PREFIX) for k in sd):
    return None
  try:
    return jax.tree.map(np.asarray, dinov2_convert.projector_from_torch(sd))
  except ValueError as e:
    logging.warning("%s: REPA projector not converted (%s).", source, e)
    return None


def load_converted_projector(out_dir: str | os.PathLike) -> dict | None:
  """The REPA projector params `convert_to_orbax` stored with the denoiser (NumPy), or None."""
  import orbax.checkpoint as ocp

  if _is_exported(out_dir):
    from flowseg_jax import pretrained

    return pretrained.load_backbone_projector(out_dir)
  path = storage.path(out_dir) / PROJECTOR_SUBDIR
  if not path.is_dir():
    return None
  with ocp.StandardCheckpointer() as ckptr:
    return jax.tree.map(np.asarray, ckptr.restore(path))


def _is_exported(path: str | os.PathLike) -> bool:
  """A model folder of converted weights (`flowseg export` of a conversion), local, on gs:// or a
  Hugging Face Hub id, rather than `convert_to_orbax`'s output."""
  from flowseg_jax import pretrained

  if (storage.path(path) / MODEL_CONFIG_FILE).is_file():
    return False
  return pretrained.is_model_folder(path) or pretrained.is_hub_id(path)


def load_converted(
  out_dir: str | os.PathLike, *, scan_blocks: bool | None = None, **model_overrides
) -> tuple[PixNerDiT, dict]:
  """Restores what `convert_to_orbax` wrote: `(model, params)` (NumPy arrays, host memory).

  Args:
    out_dir: the conversion output directory, or its model folder (`flowseg export`; a Hugging
      Face Hub id too).
    scan_blocks: layout wanted; None keeps the stored one, otherwise params are re-laid out.
    **model_overrides: non-architecture `PixNerDiT` fields (dtype, attention_impl, ...).
  """
  import orbax.checkpoint as ocp

  if _is_exported(out_dir):  # the same weights as a model folder (`flowseg export`)
    from flowseg_jax import pretrained

    model, params = pretrained.load_backbone(out_dir)
    model = model.clone(**model_overrides)
  else:
    out_dir = storage.path(out_dir)
    config_path = out_dir / MODEL_CONFIG_FILE
    if not config_path.is_file():
      raise FileNotFoundError(f"{config_path} not found: is {out_dir} a converted PixNerd dir?")
    config = json.loads(config_path.read_text())
    model = PixNerDiT(**config, **model_overrides)
    target = {"params": pixnerd.abstract_params(model)}
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(out_dir / CHECKPOINT_SUBDIR, target)["params"]
  if scan_blocks is not None and scan_blocks != model.scan_blocks:
    model, params = relayout(params, model, scan_blocks=scan_blocks)
  return model, params


def cli(argv: list[str]) -> int:
  """`flowseg convert pixnerd ...` (argv after "pixnerd"); returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="flowseg convert pixnerd",
    description="Convert an official PixNerd checkpoint into a flowseg_jax orbax checkpoint.",
  )
  parser.add_argument("--ckpt", required=True, help="Lightning .ckpt, state dict or .safetensors")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--weights", choices=sorted(WEIGHT_PREFIXES), default="ema")
  parser.add_argument(
    "--model",
    choices=sorted(pixnerd.VARIANTS),
    default=None,
    help="fail unless the checkpoint is this variant",
  )
  parser.add_argument("--scan-blocks", action="store_true", help="write the stacked layout")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  args = parser.parse_args(argv)
  try:
    ckpt_dir = convert_to_orbax(
      args.ckpt,
      args.out,
      weights=args.weights,
      variant=args.model,
      scan_blocks=args.scan_blocks,
      overwrite=args.overwrite,
    )
  except (ValueError, FileNotFoundError) as e:
    print(f"flowseg convert pixnerd: error: {e}", file=sys.stderr)
    return 1
  info = json.loads((storage.path(args.out) / CONVERSION_INFO_FILE).read_text())
  print(
    f"Converted {info['num_tensors']} tensors ({info['num_params']:,} parameters, "
    f"{args.weights} weights) from {args.ckpt} to {ckpt_dir}"
  )
  return 0
