"""`flowseg export`: a trained model as something to hand on, publish or serve.

  flowseg export --workdir W --out DIR                      a model folder (`pretrained.py`)
  flowseg export --workdir W --out DIR --push_to_hub user/name
  flowseg export --workdir W --out DIR --format stablehlo   image -> labels for jax alone (`serving.py`)

W is a training workdir (its newest readable checkpoint, or --step; the EMA denoiser only, no
optimiser state), a model folder (stablehlo only), or a converted official PixNerd checkpoint
(`flowseg convert pixnerd --out W`), which becomes a "pixnerd" folder that training starts from
with --config.model_init=DIR (or a Hub id). One process writes; DIR may be gs://. Exit status 0,
2 with one line for a workdir, folder or flag that cannot be exported, 1 when the upload fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from flowseg_jax import checkpointing, pretrained, serving, sharding, storage, tasks
from flowseg_jax.run import files
from flowseg_jax.run.status import ConfigError

FORMATS = ("safetensors", "stablehlo")


def _cpu_mesh():
  """One CPU device: an export gathers nothing onto an accelerator."""
  return sharding.make_mesh(1, 1, devices=jax.devices("cpu")[:1])


def _is_conversion(workdir: str) -> bool:
  from flowseg_jax.convert import pixnerd as pixnerd_convert

  return (storage.path(workdir) / pixnerd_convert.MODEL_CONFIG_FILE).is_file()


# ------------------------------------------------------------------------------------------------
# Model folders.
# ------------------------------------------------------------------------------------------------


def evaluation_figures(workdir: str, step: int) -> list[dict]:
  """The eval/*.json results of `step` (training's and `flowseg evaluate`'s), figures in percent."""
  folder = storage.path(workdir) / files.EVAL_DIR
  out = []
  for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
    result = files.read_json(path)
    if not isinstance(result, dict) or result.get("step") != step or "percent" not in result:
      continue
    settings = {k: result[k] for k in ("num_steps", "mode", "tta") if k in result}
    out.append(
      dict(file=path.name, num_examples=result.get("num_examples"), **settings, **result["percent"])
    )
  return out


def model_card(meta: dict, repo_id: str | None = None) -> str:
  """README.md of a model folder: Hub metadata, what the model is, its figures, how to load it."""
  name = repo_id or "DIR"
  if meta["kind"] == "pixnerd":
    arch = ", ".join(f"{k}={v}" for k, v in meta["architecture"].items())
    return (
      "---\nlibrary_name: flowseg_jax\ntags: [jax, flax, pixnerd, flow-matching]\n---\n\n"
      "# PixNerd weights for flowseg_jax\n\n"
      f"Official PixNerd weights converted to Flax ({meta['source'].get('weights')} copy, "
      f"{meta['num_params']:,} parameters): `PixNerDiT({arch})`. A backbone, not a segmenter: "
      "FlowSeg training starts from it with\n\n"
      f"```\nflowseg train --config configs/flowseg_ade20k.py --workdir W --config.model_init={name}\n```\n"
    )
  classes, sampler, inference = meta["classes"], meta["sampler"], meta["inference"]
  size = "x".join(str(s) for s in meta["input"]["image_size"])
  lines = [
    "---",
    "library_name: flowseg_jax",
    "pipeline_tag: image-segmentation",
    "tags: [jax, flax, flowseg, pixnerd, rectified-flow, image-segmentation]",
    "---",
    "",
    f"# FlowSeg {meta['task']} segmentation ({meta['model']['variant']}, {size})",
    "",
    f"A flowseg_jax {meta['task']} segmenter: PixNerd `{meta['model']['variant']}` "
    f"({meta['num_params']:,} parameters, EMA weights of step {meta['source']['step']}), trained on "
    f"`{meta['input']['dataset']}` at {size}. The image is integrated to its colour mask by "
    f"{sampler['num_steps']} {sampler['method']} steps and each pixel takes the class of the "
    f"nearest class colour; inference mode `{inference['mode']}`.",
    "",
    "```python",
    "from flowseg_jax import Segmenter",
    "",
    f'seg = Segmenter.from_pretrained("{name}")',
    'labels = seg("photo.jpg")  # int32 (H, W) class ids',
    "```",
    "",
    "## Evaluation",
    "",
  ]
  figures = meta.get("evaluation") or []
  if figures:
    keys = [k for k in figures[0] if k not in ("file", "num_examples", "num_steps", "mode", "tta")]
    lines += ["| file | examples | steps | mode | tta | " + " | ".join(keys) + " |"]
    lines += ["|" + "---|" * (5 + len(keys))]
    for f in figures:
      cells = [f["file"], f.get("num_examples"), f.get("num_steps"), f.get("mode"), f.get("tta")]
      lines += ["| " + " | ".join(str(c) for c in cells + [f.get(k) for k in keys]) + " |"]
    lines += ["", "Figures in percent, from the training workdir's eval/ files of this step."]
  else:
    lines += ["No evaluation of this step was found in the training workdir."]
  lines += ["", "## Classes", "", "| id | name | colour |", "|---|---|---|"]
  for i, (n, c) in enumerate(zip(classes["names"], classes["palette"], strict=True)):
    lines.append(f"| {i} | {n} | #{c[0]:02x}{c[1]:02x}{c[2]:02x} |")
  if "prompted" in meta:
    prompts = meta["prompted"]["prompts"]
    lines += ["", f"## Prompts ({len(prompts)})", ""] + [f"- {p}" for p in prompts[:50]]
  return "\n".join(lines) + "\n"


def _write_folder(out_dir: str, meta: dict, weights: dict, extra: dict[str, dict], repo_id) -> dict:
  """Writes the safetensors files, config.json and README.md; {file: bytes}."""
  sizes = {pretrained.WEIGHTS_FILE: 0}
  sizes[pretrained.WEIGHTS_FILE] = pretrained.write_tensors(
    storage.join(out_dir, pretrained.WEIGHTS_FILE), weights, {"format": "flax"}
  )
  for name, tensors in extra.items():
    sizes[name] = pretrained.write_tensors(storage.join(out_dir, name), tensors, {})
  text = json.dumps(meta, indent=2)
  storage.write_atomic(storage.join(out_dir, pretrained.CONFIG_FILE), text)
  card = model_card(meta, repo_id)
  storage.write_atomic(storage.join(out_dir, pretrained.CARD_FILE), card)
  sizes[pretrained.CONFIG_FILE], sizes[pretrained.CARD_FILE] = len(text), len(card)
  return sizes


def export_segmenter(workdir: str, out_dir: str, *, step=None, overwrite=False, repo_id=None):
  """A training workdir's EMA denoiser as a model folder; a report (step, sizes, seconds)."""
  start = time.perf_counter()
  try:
    checkpointing.check_has_checkpoint(workdir)
    config = files.load_config(workdir)
    task = tasks.create_task(config)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e
  mesh = _cpu_mesh()
  abstract = task.abstract_params(mesh, sharding.rules_from_config(config.sharding_rules))
  try:
    params, step = checkpointing.restore_denoiser(workdir, abstract, use_ema=True, step=step)
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from e
  weights = {k: np.asarray(v) for k, v in pretrained.flatten_params(jax.device_get(params)).items()}
  source = {"workdir": os.fspath(workdir), "step": int(step), "weights": "ema"}
  meta = pretrained.describe(config, task, source=source)
  meta["num_params"] = int(sum(v.size for v in weights.values()))
  meta["evaluation"] = evaluation_figures(workdir, int(step))
  extra = {}
  features = task.vocabulary().prompt_features
  if features is not None:
    extra[pretrained.PROMPT_FEATURES_FILE] = {"features": features}
  pretrained.prepare_out(out_dir, overwrite)
  sizes = _write_folder(out_dir, meta, weights, extra, repo_id)
  return {
    "kind": "segmenter",
    "step": int(step),
    "sizes": sizes,
    "seconds": time.perf_counter() - start,
  }


def export_pixnerd(converted_dir: str, out_dir: str, *, overwrite=False, repo_id=None):
  """A converted official PixNerd checkpoint (`flowseg convert pixnerd`) as a "pixnerd" folder."""
  from flowseg_jax.convert import pixnerd as pixnerd_convert

  start = time.perf_counter()
  try:
    model, params = pixnerd_convert.load_converted(converted_dir)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e
  weights = {k: np.asarray(v) for k, v in pretrained.flatten_params(params).items()}
  info = files.read_json(storage.path(converted_dir) / pixnerd_convert.CONVERSION_INFO_FILE) or {}
  meta = {
    "format_version": pretrained.FORMAT_VERSION,
    "kind": "pixnerd",
    "library": pretrained.library(),
    "model": {**model.arch_config(), "scan_blocks": bool(model.scan_blocks)},
    "architecture": model.arch_config(),
    "num_params": int(sum(v.size for v in weights.values())),
    "source": {k: info.get(k) for k in ("source", "weights", "global_step", "variant")},
  }
  extra = {}
  projector = pixnerd_convert.load_converted_projector(converted_dir)
  if projector is not None:
    extra[pretrained.PROJECTOR_FILE] = pretrained.flatten_params(projector)
    meta["projector"] = pretrained.PROJECTOR_FILE
  pretrained.prepare_out(out_dir, overwrite)
  sizes = _write_folder(out_dir, meta, weights, extra, repo_id)
  return {
    "kind": "pixnerd",
    "step": info.get("global_step"),
    "sizes": sizes,
    "seconds": time.perf_counter() - start,
  }


def push_to_hub(folder: str, repo_id: str, *, private: bool = False) -> str:
  """Uploads a local model folder to the Hugging Face Hub repo `repo_id` (created if missing);
  the commit's URL. Needs the `hub` extra and a token (`huggingface-cli login` or HF_TOKEN)."""
  folder = storage.local_only(folder, "--out", "the Hub upload reads a local folder")
  try:
    import huggingface_hub
  except ImportError as e:
    raise ConfigError("--push_to_hub needs the hub extra: pip install 'flowseg-jax[hub]'") from e
  api = huggingface_hub.HfApi()
  api.create_repo(repo_id, private=private, exist_ok=True)
  info = api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="flowseg export")
  return str(getattr(info, "commit_url", info))


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="flowseg export",
    description="Export a trained model: a model folder (safetensors, config.json, model card) "
    "or a serialized StableHLO image -> labels function.",
  )
  p.add_argument("--workdir", required=True, help="training workdir, model folder or conversion")
  p.add_argument("--out", required=True, help="output folder (local or gs://)")
  p.add_argument("--format", choices=FORMATS, default="safetensors")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--overwrite", action="store_true", help="replace files in --out")
  p.add_argument("--push_to_hub", metavar="USER/NAME", default=None, help="upload --out there")
  p.add_argument("--private", action="store_true", help="create the Hub repo private")
  p.add_argument("--num_steps", type=int, default=None, help="stablehlo: sampler steps")
  p.add_argument(
    "--batch", default="symbolic", help="stablehlo: images per call, or 'symbolic' (any)"
  )
  p.add_argument(
    "--platforms", default=None, help="stablehlo: e.g. cpu,cuda,tpu (default: this machine's)"
  )
  return p


def export(args) -> dict:
  """Runs one parsed `flowseg export` command; its report."""
  if not storage.path(args.workdir).is_dir():
    raise ConfigError(f"--workdir {args.workdir!r} does not exist")
  if args.format == "stablehlo":
    batch = None if args.batch == "symbolic" else int(args.batch)
    platforms = tuple(args.platforms.split(",")) if args.platforms else None
    return serving.export_workdir(
      args.workdir,
      args.out,
      step=args.step,
      num_steps=args.num_steps,
      batch=batch,
      platforms=platforms,
      overwrite=args.overwrite,
    )
  if _is_conversion(args.workdir):
    return export_pixnerd(
      args.workdir, args.out, overwrite=args.overwrite, repo_id=args.push_to_hub
    )
  return export_segmenter(
    args.workdir, args.out, step=args.step, overwrite=args.overwrite, repo_id=args.push_to_hub
  )


def cli(argv: list[str]) -> int:
  """`flowseg export ...`; the exit status."""
  args = _parser().parse_args(argv)  # a usage error exits 2 with one line
  if args.batch != "symbolic" and not args.batch.isdigit():
    sys.stderr.write(
      f"flowseg export: error: --batch must be a number or 'symbolic', got {args.batch!r}\n"
    )
    return 2
  try:
    report = export(args)
  except ConfigError as e:
    sys.stderr.write(f"flowseg export: error: {e}\n")
    return 2
  sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report["sizes"].items())
  print(
    f"exported {report['kind']} (step {report['step']}) to {args.out} in {report['seconds']:.1f} s: {sizes}"
  )
  if args.push_to_hub:
    try:
      url = push_to_hub(args.out, args.push_to_hub, private=args.private)
    except ConfigError as e:
      sys.stderr.write(f"flowseg export: error: {e}\n")
      return 2
    except Exception as e:  # network, auth and Hub errors: the folder is written, the upload not
      sys.stderr.write(f"flowseg export: the upload to {args.push_to_hub} failed: {e}\n")
      return 1
    print(f"pushed to {url}")
  return 0
