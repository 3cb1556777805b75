"""Model folders: a trained model that loads without its workdir, orbax or the training config.

A model folder (written by `flowseg export`, `export.py`) holds
  config.json                  what rebuilds the model, the sampler and the decoding (below)
  model.safetensors            the EMA denoiser's parameters, one tensor per flat dotted key
                               ("cond_blocks.attn.qkv.kernel"), float32
  prompt_features.safetensors  prompted models with cached text features: "features" (N, T, D)
  README.md                    the model card (eval figures, classes, how to load it)
and loads from a local path, a gs:// URL or a Hugging Face Hub id ("user/name", through
`huggingface_hub.snapshot_download`: the `hub` extra; HF_HUB_OFFLINE=1 reads the local cache only).

config.json ("format_version" 1): "kind" ("segmenter", or "pixnerd" for converted official PixNerd
weights, a backbone for `config.model_init`), "task", "model" (config.model), "architecture" (the
network's shape-determining fields, checked on load), "cond_label", "objective", "input"
({"image_size", "dataset"}), "sampler" ({"num_steps", "shift", "method"}), "inference" ({"mode",
"slide_short_side", "slide_stride", "tta", "tta_scales", "batch_per_device"}), "classes" ({"names", "centroids"
(the colours decoding uses, float32), "palette" (uint8)}), for prompted models "prompted" ({"variant",
"overrides", "condition", "adaptive", "prompts", "text_encoder"}), and "source" (workdir, step).
The sections map onto the base config (`defaults.get_base_config`); fields a folder does not record
keep their defaults. A version this code does not know is refused, not guessed at.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from flowseg_jax import storage
from flowseg_jax.run import files
from flowseg_jax.run.status import ConfigError

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROMPT_FEATURES_FILE = "prompt_features.safetensors"
PROJECTOR_FILE = "projector.safetensors"  # "pixnerd" folders: PixNerd's REPA projector, if any
CARD_FILE = "README.md"
KINDS = ("segmenter", "pixnerd")
SAMPLER_FIELDS = ("num_steps", "shift", "method")
INFERENCE_FIELDS = (
  "mode",
  "slide_short_side",
  "slide_stride",
  "tta",
  "tta_scales",
  "batch_per_device",
)
PROMPTED_FIELDS = ("variant", "overrides", "condition", "adaptive", "text")  # text: its tokenizer
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelFolderError(ConfigError):
  """A model folder that cannot be loaded: one line naming the folder, file and field."""


# ------------------------------------------------------------------------------------------------
# Parameters <-> flat dotted keys.
# ------------------------------------------------------------------------------------------------


def flatten_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Nested parameter dict -> {"a.b.c": leaf}; a key holding a "." is refused (it would not unflatten)."""
  out = {}
  for key, value in tree.items():
    if "." in key:
      raise ValueError(f"parameter name {prefix + key!r} holds a '.': it cannot be a dotted key")
    if isinstance(value, Mapping):
      out.update(flatten_params(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def unflatten_params(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def check_tensors(tensors: Mapping[str, np.ndarray], abstract: Mapping, source: str) -> None:
  """ModelFolderError naming every missing, unexpected and mis-shaped tensor of `source`."""
  want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in flatten_params(abstract).items()}
  got = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tensors.items()}
  problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
  problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
  problems += [
    f"{k}: {got[k][1]}{list(got[k][0])}, the model wants {want[k][1]}{list(want[k][0])}"
    for k in sorted(set(want) & set(got))
    if got[k] != want[k]
  ]
  if problems:
    shown = "; ".join(problems[:6]) + (
      f"; ... {len(problems) - 6} more" if len(problems) > 6 else ""
    )
    raise ModelFolderError(f"{source} does not fit the model config.json describes: {shown}")


def prepare_out(out_dir: storage.PathLike, overwrite: bool) -> None:
  """Creates an export's folder; one already holding files is refused unless `overwrite`."""
  out = storage.path(out_dir)
  if out.exists() and any(out.iterdir()) and not overwrite:
    raise ConfigError(f"--out {os.fspath(out_dir)!r} already holds files; pass --overwrite")
  out.mkdir(parents=True, exist_ok=True)


def write_tensors(path: storage.PathLike, tensors: Mapping[str, Any], metadata: dict) -> int:
  """Writes a safetensors file (any storage) and returns its size in bytes."""
  from safetensors import numpy as st

  arrays = {}
  for key, value in tensors.items():
    array = np.ascontiguousarray(np.asarray(value))
    if array.dtype.kind != "f" or array.dtype.itemsize < 2:
      raise ValueError(
        f"{key}: dtype {array.dtype} has no safetensors numpy type (float32 expected)"
      )
    arrays[key] = array
  data = st.save(arrays, metadata={k: str(v) for k, v in metadata.items()})
  storage.write_atomic(path, data)
  return len(data)


def read_tensors(folder: storage.PathLike, name: str) -> dict[str, np.ndarray]:
  """{key: array} of folder/name (memory-mapped when local); ModelFolderError when it is absent."""
  from safetensors import numpy as st

  path = storage.join(folder, name)
  if not storage.path(path).is_file():
    raise ModelFolderError(f"model folder {os.fspath(folder)!r} has no {name} (the weights)")
  try:
    if storage.is_url(path):
      return st.load(storage.path(path).read_bytes())
    return st.load_file(path)
  except Exception as e:  # safetensors raises its own SafetensorError for a damaged header
    raise ModelFolderError(f"{path} is not a readable safetensors file: {e}") from e


# ------------------------------------------------------------------------------------------------
# Where a folder is: a path, a URL or a Hub id.
# ------------------------------------------------------------------------------------------------


def is_hub_id(name_or_path: storage.PathLike) -> bool:
  """A "user/name" that is not a path here."""
  text = os.fspath(name_or_path)
  return not storage.is_url(text) and not storage.path(text).exists() and bool(_HUB_ID.match(text))


def resolve(name_or_path: storage.PathLike, revision: str | None = None) -> str:
  """The folder of a local path or URL as it is; a Hub id ("user/name") downloaded (or, with
  HF_HUB_OFFLINE=1, found in the local cache) by `huggingface_hub.snapshot_download`."""
  text = os.fspath(name_or_path)
  if not is_hub_id(text):
    if not storage.is_url(text) and not storage.path(text).exists():
      raise ModelFolderError(
        f"{text!r} is neither a model folder nor a Hugging Face Hub id (user/name)"
      )
    return text
  try:
    import huggingface_hub
  except ImportError as e:
    raise ModelFolderError(
      f"{text!r} is not a folder here; to load it from the Hugging Face Hub install the hub "
      "extra (pip install 'flowseg-jax[hub]')"
    ) from e
  try:
    return huggingface_hub.snapshot_download(text, revision=revision, library_name="flowseg_jax")
  except Exception as e:  # offline misses, unknown repos and network errors have many types
    raise ModelFolderError(f"cannot get {text!r} from the Hugging Face Hub: {e}") from e


def read_config(folder: storage.PathLike, kinds=KINDS) -> dict:
  """folder/config.json, its format_version and kind checked."""
  path = storage.join(folder, CONFIG_FILE)
  if not storage.path(path).is_file():
    raise ModelFolderError(f"{os.fspath(folder)!r} has no {CONFIG_FILE}: not a model folder")
  try:
    meta = json.loads(storage.path(path).read_text())
  except ValueError as e:
    raise ModelFolderError(f"{path} is not JSON: {e}") from e
  version = meta.get("format_version") if isinstance(meta, dict) else None
  if version != FORMAT_VERSION:
    raise ModelFolderError(
      f"{path}: format_version {version!r} is not one this flowseg_jax reads ({FORMAT_VERSION}); "
      "a newer flowseg_jax may read it"
    )
  if meta.get("kind") not in kinds:
    raise ModelFolderError(f"{path}: kind {meta.get('kind')!r} is not one of {kinds} here")
  return meta


# ------------------------------------------------------------------------------------------------
# config.json <-> (config, task).
# ------------------------------------------------------------------------------------------------


def library() -> dict:
  """The writer's name and version (the installed distribution's; None when run from a checkout)."""
  from importlib import metadata

  try:
    version = metadata.version("flowseg-jax")
  except metadata.PackageNotFoundError:
    version = None
  return {"name": "flowseg_jax", "version": version}


def describe(config, task, *, source: dict | None = None) -> dict:
  """config.json of a segmenter: what `model_config` and `vocabulary` rebuild it from."""

  vocab = task.vocabulary()
  model = config.model.to_dict()
  model.update(attention_impl=None, remat_policy="none")  # inference picks its own kernels
  meta = {
    "format_version": FORMAT_VERSION,
    "kind": "segmenter",
    "library": library(),
    "task": task.name,
    "model": model,
    "architecture": task.architecture(),
    "cond_label": int(config.cond_label),
    "objective": config.objective.to_dict(),
    "input": {
      "image_size": [int(s) for s in config.input.image_size],
      "dataset": config.input.dataset,
    },
    "sampler": {k: config.eval[k] for k in SAMPLER_FIELDS},
    "inference": {k: config.eval.get(k) for k in INFERENCE_FIELDS},
    "classes": {
      "names": list(vocab.class_names),
      "centroids": task.decode_centroids.tolist(),
      "palette": task.palette.tolist(),
    },
  }
  for key in ("slide_stride", "tta_scales"):  # tuples in the config, lists in JSON
    if meta["inference"].get(key) is not None:
      meta["inference"][key] = list(meta["inference"][key])
  if vocab.prompts:
    cfg = config.prompted
    prompted = {
      k: cfg[k].to_dict() if hasattr(cfg[k], "to_dict") else cfg[k] for k in PROMPTED_FIELDS
    }
    prompted["prompts"] = list(vocab.prompts)
    prompted["prompt_features"] = None if vocab.prompt_features is None else PROMPT_FEATURES_FILE
    prompted["text_encoder"] = text_encoder_record(cfg.encoder_dir) if cfg.encoder_dir else None
    meta["prompted"] = prompted
  if source:
    meta["source"] = source
  return meta


def text_encoder_record(encoder_dir: str) -> dict:
  """The prompted model's text encoder: its folder and, when readable, its config.json."""
  record: dict[str, Any] = {"encoder_dir": encoder_dir}
  path = storage.join(encoder_dir, "config.json")
  if storage.path(path).is_file():
    record["config"] = json.loads(storage.path(path).read_text())
  return record


def model_config(meta: Mapping):
  """The ConfigDict a segmenter folder's config.json describes (base-config defaults elsewhere)."""
  data = {
    "task": meta["task"],
    "model": meta["model"],
    "cond_label": meta["cond_label"],
    "objective": meta["objective"],
    "input": meta["input"],
    "eval": {**meta["sampler"], **meta["inference"]},
  }
  if "prompted" in meta:
    data["prompted"] = {k: meta["prompted"][k] for k in PROMPTED_FIELDS if k in meta["prompted"]}
  return files.config_from_json(json.dumps(data))


def read_segmenter(name_or_path: storage.PathLike, revision: str | None = None):
  """(folder, config.json, ConfigDict, Vocabulary) of a segmenter folder; the task and the weights
  follow from them (`Segmenter.from_pretrained`)."""
  from flowseg_jax.tasks.base import Vocabulary

  folder = resolve(name_or_path, revision)
  meta = read_config(folder)
  where = storage.join(folder, CONFIG_FILE)
  if meta["kind"] != "segmenter":
    raise ModelFolderError(
      f"{where}: kind {meta['kind']!r} holds backbone weights, not a segmenter: start training "
      "from it with --config.model_init"
    )
  try:
    config = model_config(meta)
    prompted = meta.get("prompted") or {}
    features = None
    if prompted.get("prompt_features"):
      features = read_tensors(folder, prompted["prompt_features"])["features"]
    names = tuple(meta["classes"]["names"])
    palette = meta["classes"].get("palette")
    palette = None if palette is None else np.asarray(palette, np.uint8).reshape(len(names), 3)
    vocab = Vocabulary(names, tuple(prompted.get("prompts", ())), features, palette)
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, ModelFolderError):
      raise
    raise ModelFolderError(f"{where}: {type(e).__name__}: {e}") from e
  return folder, meta, config, vocab


def check_task(folder: str, meta: Mapping, task) -> None:
  """The network and the class colours the task builds are the ones the folder recorded."""
  recorded = {
    "architecture": meta["architecture"],
    "classes.centroids": meta["classes"]["centroids"],
  }
  built = {"architecture": task.architecture(), "classes.centroids": task.decode_centroids.tolist()}
  for field, want in recorded.items():
    if built[field] != want:
      raise ModelFolderError(
        f"{storage.join(folder, CONFIG_FILE)}: {field} {want} is not what this flowseg_jax builds "
        f"from the config ({built[field]})"
      )


def load_params(folder: str, abstract) -> dict:
  """folder's model.safetensors as `abstract` (ShapeDtypeStructs with shardings) lays it out."""
  import jax

  tensors = read_tensors(folder, WEIGHTS_FILE)
  check_tensors(tensors, abstract, storage.join(folder, WEIGHTS_FILE))
  flat = flatten_params(abstract)
  return unflatten_params({k: jax.device_put(tensors[k], a.sharding) for k, a in flat.items()})


def load_backbone(name_or_path: storage.PathLike, *, revision: str | None = None):
  """(PixNerDiT, NumPy params) of a "pixnerd" folder (converted official weights, exported)."""
  from flowseg_jax.models import pixnerd

  folder = resolve(name_or_path, revision)
  meta = read_config(folder, kinds=("pixnerd",))
  try:
    model = pixnerd.PixNerDiT(**meta["model"])
    model.check_config()
  except (KeyError, TypeError, ValueError) as e:
    raise ModelFolderError(f"{storage.join(folder, CONFIG_FILE)}: model: {e}") from e
  tensors = read_tensors(folder, WEIGHTS_FILE)
  abstract = pixnerd.abstract_params(model)
  check_tensors(tensors, abstract, storage.join(folder, WEIGHTS_FILE))
  return model, unflatten_params({k: np.asarray(v) for k, v in tensors.items()})


def load_backbone_projector(name_or_path: storage.PathLike) -> dict | None:
  """The REPA projector params (NumPy) a "pixnerd" folder holds, or None."""
  folder = resolve(name_or_path)
  meta = read_config(folder, kinds=("pixnerd",))
  if not meta.get("projector"):
    return None
  return unflatten_params(read_tensors(folder, meta["projector"]))


def is_model_folder(path: storage.PathLike) -> bool:
  """True when `path` is a folder with a config.json of this format (any kind, any version)."""
  return storage.path(storage.join(path, CONFIG_FILE)).is_file() and "format_version" in (
    files.read_json(storage.join(path, CONFIG_FILE)) or {}
  )
