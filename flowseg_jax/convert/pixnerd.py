"""Official PixNerd (PyTorch) checkpoints <-> flowseg_jax `PixNerDiT` parameters.

Torch -> Flax: read a Lightning `.ckpt` (`torch.load(weights_only=True)`), a plain state dict or a
`.safetensors` file; pick the EMA (`ema_denoiser.*`) or online (`denoiser.*`) copy; infer the
architecture from the tensor shapes; check that every expected tensor is present with the
expected shape and nothing is left over (one error listing every missing / unexpected /
mis-shaped name); map each tensor (Linear weights transposed, the patch embedding's input axis
permuted from torch's channel-major unfold order to channels-last (row, column, channel), blocks
either as `blocks_{i}` or stacked for `nn.scan`). The reverse map gives the official names and
layouts back; a round trip is exact.

The tensor name map and layouts are `convert.pixnerd_names`; this module reads files and writes
orbax checkpoints.

CLI: `flowseg convert pixnerd --ckpt FILE --out DIR [--weights ema|online] [--model XL/16]`
writes `DIR/checkpoint` (orbax, pytree `{'params': params}`), `DIR/model_config.json` (the
`PixNerDiT` keyword arguments), `DIR/conversion.json` (provenance) and, when the checkpoint holds
PixNerd's REPA projector (`diffusion_trainer.proj.0.*`), `DIR/projector` (orbax, `repa.Projector`
params) for training to start REPA from (config.repa.init_projector).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from flowseg_jax import storage
from flowseg_jax.convert import torch_files
from flowseg_jax.convert.pixnerd_names import (  # noqa: F401 (the public conversion API)
  _convert_tensors,
  check_state_dict,
  expected_torch_shapes,
  flax_to_torch,
  infer_model_config,
  map_flax_to_torch,
  relayout,
  torch_to_flax,
)
from flowseg_jax.models import pixnerd
from flowseg_jax.models.pixnerd import PixNerDiT

WEIGHT_PREFIXES = {"ema": "ema_denoiser.", "online": "denoiser."}
CHECKPOINT_SUBDIR = "checkpoint"
MODEL_CONFIG_FILE = "model_config.json"
CONVERSION_INFO_FILE = "conversion.json"
PROJECTOR_SUBDIR = "projector"


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
