"""`flowseg export --format stablehlo`: the whole image -> labels function, serialized with
`jax.export`, so that it runs with jax alone (no flowseg_jax, no Flax):

  import jax, numpy as np
  exported = jax.export.deserialize(open("DIR/model.jax_exported", "rb").read())
  weights = dict(np.load("DIR/weights.npz"))             # flat dotted keys -> float32 arrays
  labels = exported.call(weights, images)                # uint8 (B, H, W, 3) -> int32 (B, H, W)

In the graph: uint8 -> [-1, 1] (the host's float32 arithmetic), the ODE from the image to its colours
(the task's sampler with the exported number of steps; deterministic: no noise), nearest class colour.
Whole-image mode only: images come at the model's input size (`serving.json` "inputs"), the caller
resizes; slide windows and test-time augmentation stay with the Segmenter. Prompted models take
int32 prompt ids (B,) as a third argument. The weights are an argument, not constants: a
serialized module is limited to 2 GiB, less than PixNerd XL/16's float32 weights.
The batch is symbolic ("b": any size) unless a fixed one is asked for.
"""

from __future__ import annotations

import io
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import pretrained, storage
from flowseg_jax.run.status import ConfigError

FORMAT_VERSION = 1
EXPORTED_FILE = "model.jax_exported"
WEIGHTS_FILE = "weights.npz"
SERVING_FILE = "serving.json"


def labels_fn(task, num_steps: int | None = None):
  """(weights {dotted key: array}, uint8 images (B, H, W, 3)[, int32 prompt ids (B,)]) -> int32
  labels (B, H, W): whole-image inference of `task`, every step in jnp."""
  options = task.sampler_options(num_steps)
  centroids = jnp.asarray(task.decode_centroids)
  cond_label = None if task.prompts else task.condition_of(None)

  def fn(weights, images, *prompt_ids):
    params = pretrained.unflatten_params(weights)
    # transforms.normalize_image's float32 arithmetic: x * float32(1 / 127.5) - 1.
    x0 = images.astype(jnp.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
    if prompt_ids:
      cond = prompt_ids[0].astype(jnp.int32)
    else:
      cond = jnp.full((images.shape[0],), cond_label, jnp.int32)
    out, _ = task.integrate(lambda x, t: task.apply(params, x, t, cond), x0, options)
    return centroids_lib.decode_colours(out, centroids)

  return fn


def export_segmenter(segmenter, *, num_steps=None, batch: int | None = None, platforms=None):
  """(jax.export.Exported, flat weights as NumPy) of `segmenter`'s labels function."""
  task = segmenter.task
  weights = {
    k: np.asarray(v) for k, v in pretrained.flatten_params(jax.device_get(segmenter.params)).items()
  }
  h, w = (int(s) for s in segmenter.config.input.image_size)
  (b,) = jax.export.symbolic_shape("b") if batch is None else (int(batch),)
  specs = [
    {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in weights.items()},
    jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8),
  ]
  if task.prompts:
    specs.append(jax.ShapeDtypeStruct((b,), jnp.int32))
  fn = jax.jit(labels_fn(task, num_steps))
  exported = jax.export.export(fn, platforms=platforms)(*specs)
  return exported, weights


def write(out_dir: str, exported, weights: dict, meta: dict) -> dict[str, int]:
  """model.jax_exported, weights.npz and serving.json in out_dir; {file: bytes}."""
  blob = bytes(exported.serialize())
  storage.write_atomic(storage.join(out_dir, EXPORTED_FILE), blob)
  buffer = io.BytesIO()
  np.savez(buffer, **weights)
  storage.write_atomic(storage.join(out_dir, WEIGHTS_FILE), buffer.getvalue())
  text = json.dumps(meta, indent=2)
  storage.write_atomic(storage.join(out_dir, SERVING_FILE), text)
  return {
    EXPORTED_FILE: len(blob),
    WEIGHTS_FILE: buffer.getbuffer().nbytes,
    SERVING_FILE: len(text),
  }


def describe(segmenter, exported, num_steps: int) -> dict:
  """serving.json: how to call the function, its inputs and outputs, the classes."""
  h, w = (int(s) for s in segmenter.config.input.image_size)
  images = exported.in_avals[len(exported.in_avals) - (2 if segmenter.task.prompts else 1)]
  batch = str(images.shape[0])  # "b" when symbolic
  inputs = {
    "weights": {"file": WEIGHTS_FILE, "keys": "flat dotted parameter names", "dtype": "float32"},
    "images": {"shape": [batch, h, w, 3], "dtype": "uint8", "range": "[0, 255] RGB"},
  }
  if segmenter.task.prompts:
    inputs["prompt_ids"] = {"shape": [batch], "dtype": "int32", "prompts": segmenter.prompts}
  task = segmenter.task
  return {
    "format_version": FORMAT_VERSION,
    "call": "jax.export.deserialize(bytes).call(weights, images"
    + (", prompt_ids)" if task.prompts else ")"),
    "file": EXPORTED_FILE,
    "platforms": list(exported.platforms),
    "inputs": inputs,
    "output": {"shape": [batch, h, w], "dtype": "int32", "meaning": "class ids"},
    "num_steps": num_steps,
    "mode": "whole: images at the model's input size",
    "classes": {
      "names": segmenter.class_names,
      "palette": task.palette.tolist(),
    },
    "source": {"step": segmenter.step},
  }


def export_workdir(
  workdir: str,
  out_dir: str,
  *,
  step=None,
  num_steps=None,
  batch=None,
  platforms=None,
  overwrite=False,
) -> dict:
  """`flowseg export --format stablehlo`: a training workdir or a model folder -> out_dir."""
  from flowseg_jax import checkpointing, inference, sharding

  start = time.perf_counter()
  mesh = sharding.make_mesh(1, 1, devices=jax.devices("cpu")[:1])
  try:
    if pretrained.is_model_folder(workdir):
      seg = inference.Segmenter.from_pretrained(workdir, mesh=mesh)
    else:
      checkpointing.check_has_checkpoint(workdir)
      seg = inference.Segmenter.from_workdir(workdir, step=step, use_ema=True, mesh=mesh)
  except (FileNotFoundError, ValueError) as e:
    raise ConfigError(str(e)) from e
  steps = int(seg.task.sampler_options(num_steps).num_steps)
  if batch is not None and batch < 1:
    raise ConfigError(f"--batch must be >= 1, got {batch}")
  exported, weights = export_segmenter(seg, num_steps=steps, batch=batch, platforms=platforms)
  pretrained.prepare_out(out_dir, overwrite)
  sizes = write(out_dir, exported, weights, describe(seg, exported, steps))
  seconds = time.perf_counter() - start
  return {"kind": "stablehlo", "step": seg.step, "sizes": sizes, "seconds": seconds}
