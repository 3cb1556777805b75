"""Segmenter: a trained model as a function from images of any size to label maps at their own size.

  seg = Segmenter.from_workdir("/tmp/flowseg_demo")   # workdir/config.json + the EMA denoiser weights
  labels = seg("photo.jpg")                           # int32 (H, W) train ids

Each image becomes one or more network inputs ("windows"): whole mode resizes it to
`config.input.image_size`; slide mode resizes it so its short side is `config.eval.slide_short_side`
and cuts mmseg's grid of image_size windows. The windows of many images stream through fixed-shape
device batches (padded), the Euler ODE carries each to its colour mask, overlapping windows are averaged,
and the continuous colours are resized bilinearly to the image's own size and decoded there (nearest
centroid), as mmseg resizes logits before the argmax (DESIGN.md "Inference").

Every device always runs `batch_per_device` windows, whatever the device count, so a window's arithmetic
does not depend on how many devices share the work. Restoring reads only the denoiser's parameters from
the `state` item of the newest readable checkpoint (no optimiser state, no REPA teacher). This module
imports no training code.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import sampling, sharding, tasks
from flowseg_jax import workdir as workdir_lib
from flowseg_jax.data import classes, pipeline, transforms

MODES = ("whole", "slide")


# ------------------------------------------------------------------------------------------------
# The model as inference sees it.
# ------------------------------------------------------------------------------------------------


class InferenceSetup:
  """What sampling needs from a config: the denoiser, the class centroids, the conditioning label.

  `train.Setup` has the same attributes, so evaluation accepts either.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    if tasks.task_name(config) == "semantic":
      self.task = tasks.SemanticTask(config, pipeline.num_classes(config.input))
    else:
      self.task = tasks.PromptedTask(config, pipeline.prompt_list(config.input))
    self.model = self.task.model
    self.num_classes = self.task.num_classes
    self.centroids = self.task.centroids
    self.cond_label = self.task.cond_label

  def abstract_params(self, mesh, rules):
    """The denoiser's parameters as ShapeDtypeStructs laid out by the logical-axis rules on mesh."""
    x, t, y = tasks.init_inputs(self.task, self.config.input.image_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      boxed = jax.eval_shape(self.model.init, jax.random.key(0), x, t, y)["params"]
      shardings = sharding.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )


def sampler_options(config, num_steps: int | None = None) -> tuple:
  cfg = config.eval
  steps = cfg.num_steps if num_steps is None else num_steps
  return (
    int(steps),
    float(cfg.shift),
    cfg.method,
    config.objective.prediction,
    config.objective.t_eps,
  )


@functools.lru_cache(maxsize=16)
def _sample_fn(setup, mesh, options, trajectory: bool):
  num_steps, shift, method, prediction, t_eps = options
  real_centroids = setup.centroids[: setup.num_classes]  # the ignore centroid is never predicted

  def sample_fn(params, images):
    y = jnp.full((images.shape[0],), setup.cond_label, jnp.int32)
    apply = lambda x, t: setup.model.apply({"params": params}, x, t, y)
    out = sampling.sample(
      apply,
      images,
      num_steps=num_steps,
      shift=shift,
      prediction=prediction,
      t_eps=t_eps,
      method=method,
      return_trajectory=trajectory,
    )
    if trajectory:
      return out
    return out, centroids_lib.decode_colors(out, real_centroids)

  data = sharding.batch_sharding(mesh)
  traj = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
  out_shardings = (data, traj) if trajectory else (data, data)
  return jax.jit(sample_fn, in_shardings=(None, data), out_shardings=out_shardings)


def make_sample_fn(setup, mesh, num_steps: int | None = None, *, trajectory: bool = False):
  """jit: (denoiser params, images (B, H, W, 3)) -> (colours (B, H, W, 3) f32, labels (B, H, W) int32).

  With `trajectory`: (colours, states after every step (num_steps, B, H, W, 3)). Compiled once per
  (setup, mesh, sampler settings).
  """
  return _sample_fn(setup, mesh, sampler_options(setup.config, num_steps), trajectory)


# ------------------------------------------------------------------------------------------------
# Host-side image handling.
# ------------------------------------------------------------------------------------------------


def to_rgb(image: Any) -> np.ndarray:
  """A path, PIL image or uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> uint8 (H, W, 3)."""
  if isinstance(image, str | os.PathLike):
    try:
      with Image.open(image) as img:
        img.load()
        return np.asarray(img.convert("RGB"), np.uint8)
    except (OSError, ValueError, SyntaxError) as e:
      raise ValueError(f"cannot read image {os.fspath(image)!r}: {e}") from e
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"), np.uint8)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f"an image array must be uint8 in [0, 255], got dtype {array.dtype}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    return np.repeat(array[..., None], 3, axis=-1)
  if array.ndim == 3 and array.shape[-1] in (3, 4):
    return np.ascontiguousarray(array[..., :3])
  raise ValueError(
    f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}"
  )


def resize_colours(colours: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of float colours (h, w, 3) to (H, W) per channel (PIL 'F', antialiased when
  shrinking, the filter `transforms.resize_image` uses for images)."""
  h, w = size
  if colours.shape[:2] == (h, w):
    return np.asarray(colours, np.float32)
  channels = [
    np.asarray(
      Image.fromarray(np.ascontiguousarray(colours[..., c], np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR
      )
    )
    for c in range(colours.shape[-1])
  ]
  return np.stack(channels, axis=-1)


def decode_colours_host(colours: np.ndarray, centroids: np.ndarray) -> np.ndarray:
  """Nearest centroid on the host, (H, W, 3) -> int32 (H, W): the arithmetic of
  `centroids.squared_distances` (channel by channel, float32), ties to the lower index. One class at a
  time over channel planes, in place: no (pixels x classes) array."""
  x = np.asarray(colours, np.float32)
  mu = np.asarray(centroids, np.float32)
  planes = [np.ascontiguousarray(x[..., c]).ravel() for c in range(x.shape[-1])]
  best = np.full(planes[0].shape, np.inf, np.float32)
  index = np.zeros(planes[0].shape, np.int32)
  d, term = np.empty_like(best), np.empty_like(best)
  for k in range(len(mu)):
    np.subtract(planes[0], mu[k, 0], out=d)
    np.square(d, out=d)
    for c in range(1, len(planes)):
      np.subtract(planes[c], mu[k, c], out=term)
      np.square(term, out=term)
      d += term
    better = d < best
    np.copyto(best, d, where=better)
    index[better] = k
  return index.reshape(x.shape[:-1])


def slide_windows(h: int, w: int, crop: tuple[int, int], stride: tuple[int, int]):
  """mmseg's grid: the last window is shifted to end at the border; (y0, x0) corners."""
  ch, cw = crop
  sh, sw = stride
  rows = max(h - ch + sh - 1, 0) // sh + 1
  cols = max(w - cw + sw - 1, 0) // sw + 1
  for r in range(rows):
    for c in range(cols):
      yield max(min(r * sh, h - ch), 0), max(min(c * sw, w - cw), 0)


def network_input(rgb: np.ndarray, config, mode: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """(float32 input image in [-1, 1], window corners) of one image for `mode`."""
  crop = tuple(int(s) for s in config.input.image_size)
  if mode == "whole":
    return transforms.normalize_image(transforms.resize_image(rgb, crop)), [(0, 0)]
  if mode != "slide":
    raise ValueError(f"mode (config.eval.mode) must be one of {MODES}, got {mode!r}")
  stride = tuple(int(s) for s in config.eval.slide_stride)
  if len(stride) != 2 or not all(0 < s <= c for s, c in zip(stride, crop, strict=True)):
    raise ValueError(
      f"config.eval.slide_stride={stride} must be positive and at most the window "
      f"config.input.image_size={crop} (a larger stride leaves pixels no window covers)"
    )
  h, w = rgb.shape[:2]
  scale = max(config.eval.slide_short_side / min(h, w), crop[0] / h, crop[1] / w)
  size = (max(int(round(h * scale)), crop[0]), max(int(round(w * scale)), crop[1]))
  image = transforms.normalize_image(transforms.resize_image(rgb, size))
  return image, list(slide_windows(*size, crop, stride))


def _global_max(value: int) -> int:
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.asarray(value))))


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in the order they were given."""
  shards = {}
  for shard in array.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


class Progress:
  """A log line every `every` items with rate and ETA (quiet when `every` is 0)."""

  def __init__(self, what: str, total: int | None, every: int, *, start: int = 0):
    self.what, self.total, self.every = what, total, every
    self.count = self.first = start  # a resumed run counts on from its first step
    self.start = time.monotonic()

  def update(self, n: int = 1) -> None:
    before = self.count
    self.count += n
    if not self.every or self.count // self.every == before // self.every:
      return
    elapsed = time.monotonic() - self.start
    rate = (self.count - self.first) / max(elapsed, 1e-9)
    if self.total:
      eta = (self.total - self.count) / max(rate, 1e-9)
      logging.info(
        "%s: %d/%d (%.1f/s, ETA %s)", self.what, self.count, self.total, rate, _clock(eta)
      )
    else:
      logging.info("%s: %d (%.1f/s)", self.what, self.count, rate)


def _clock(seconds: float) -> str:
  s = int(round(max(seconds, 0)))
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ------------------------------------------------------------------------------------------------
# The segmenter.
# ------------------------------------------------------------------------------------------------


class Segmenter:
  """Images of any size -> int32 label maps (train ids) at their own size.

  Args:
    config: the run's ConfigDict (model, input.image_size, objective, eval, cond_label).
    params: the denoiser's parameters.
    mesh: device mesh (default: all devices along 'data'; parameters replicated).
    step: the checkpoint step the parameters come from (for names and logs).
    batch_per_device: windows per device per call (default config.eval.batch_per_device, else 1).
    setup: an `InferenceSetup` (or `train.Setup`) of config, to share compiled samplers.
  """

  def __init__(
    self, config, params, *, mesh=None, step: int | None = None, batch_per_device=None, setup=None
  ):
    self.config = config
    self.setup = InferenceSetup(config) if setup is None else setup
    self.mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
    self.params = params
    self.step = step
    default = config.eval.get("batch_per_device", 1)
    self.batch_per_device = int(default if batch_per_device is None else batch_per_device)
    if self.batch_per_device < 1:
      raise ValueError(f"batch_per_device must be >= 1, got {self.batch_per_device}")
    self.num_classes = self.setup.num_classes
    self.class_names = pipeline.class_names(config.input)
    self.centroids = np.asarray(self.setup.centroids[: self.num_classes])
    self.palette = centroids_lib.palette(self.centroids)  # a perfect mask is drawn in these

  @classmethod
  def from_workdir(
    cls,
    workdir: str,
    config: ml_collections.ConfigDict | None = None,
    *,
    step: int | None = None,
    use_ema: bool | None = None,
    mesh=None,
    **kwargs,
  ) -> Segmenter:
    """The newest readable checkpoint of a training workdir (EMA weights unless config.eval.use_ema
    is False or use_ema=False); config defaults to workdir/config.json."""
    workdir_lib.check_has_checkpoint(workdir)
    config = workdir_lib.load_config(workdir) if config is None else config
    mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
    setup = InferenceSetup(config)
    abstract = setup.abstract_params(mesh, sharding.rules_from_config(config.sharding_rules))
    use_ema = bool(config.eval.use_ema) if use_ema is None else use_ema
    params, restored_step = workdir_lib.restore_denoiser(
      workdir, abstract, use_ema=use_ema, step=step
    )
    logging.info(
      "Segmenter: %s step %d (%s weights).", workdir, restored_step, "EMA" if use_ema else "online"
    )
    if setup.task.name == "prompted":
      from flowseg_jax.prompted_inference import PromptedSegmenter

      cls = PromptedSegmenter
    return cls(config, params, mesh=mesh, step=restored_step, setup=setup, **kwargs)

  # -- public API --------------------------------------------------------------------------------

  def __call__(self, image, *, num_steps: int | None = None, mode: str | None = None) -> np.ndarray:
    """One image (path, PIL image or uint8 array) -> int32 (H, W) train ids at its own size."""
    return self.segment_batch([image], num_steps=num_steps, mode=mode)[0]

  def segment_batch(
    self, images: Sequence, *, num_steps: int | None = None, mode: str | None = None
  ) -> list[np.ndarray]:
    """Many images of any sizes -> a list of int32 (H, W) label maps, in order."""
    items = ((i, to_rgb(img)) for i, img in enumerate(images))
    out = [None] * len(images)
    for i, _, labels in self.segment_stream(items, len(images), num_steps=num_steps, mode=mode):
      out[i] = labels
    return out

  def colorize(self, labels: np.ndarray) -> np.ndarray:
    """int (H, W) labels -> uint8 (H, W, 3) in the class-centroid colours (255 white)."""
    return classes.colorize(labels, self.palette)

  def overlay(self, image, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with its colourised labels, uint8 (H, W, 3)."""
    rgb = to_rgb(image).astype(np.float32)
    return ((1 - alpha) * rgb + alpha * self.colorize(labels)).round().astype(np.uint8)

  def trajectory(self, image, *, num_steps: int | None = None) -> np.ndarray:
    """The ODE states x(t_0 = 0), ..., x(t_n = 1) of the whole-image input: float32
    (num_steps + 1, H, W, 3) in colour space, at config.input.image_size."""
    x0, _ = network_input(to_rgb(image), self.config, "whole")
    batch = self.batch_per_device * self.mesh.size
    images = np.zeros((batch, *x0.shape), np.float32)
    images[0] = x0
    fn = make_sample_fn(self.setup, self.mesh, num_steps, trajectory=True)
    with jax.set_mesh(self.mesh):
      _, states = fn(self.params, sharding.shard_batch({"x": images}, self.mesh)["x"])
    states = np.asarray(jax.device_get(states))[:, 0]
    return np.concatenate([x0[None], states], axis=0)

  # -- streaming (evaluate and predict build on this) --------------------------------------------

  def segment_stream(
    self,
    items: Iterable[tuple[Any, np.ndarray]],
    num_items: int,
    *,
    num_steps: int | None = None,
    mode: str | None = None,
    progress: Progress | None = None,
  ) -> Iterator[tuple[Any, np.ndarray, np.ndarray]]:
    """(key, uint8 rgb (h, w, 3)) items -> (key, colours at the network's resolution, int32 labels
    (h, w)), in order, as soon as each image's windows are done.

    Multi-process: every process calls this with its own items (num_items of them); the number of
    device calls is agreed over processes.
    """
    mode = self.config.eval.mode if mode is None else mode
    fn = make_sample_fn(self.setup, self.mesh, num_steps)
    local_batch = self.batch_per_device * self.mesh.local_mesh.size
    chunk = 8 * local_batch  # images prepared at a time: bounded host memory
    num_chunks = _global_max(-(-num_items // chunk))
    items = iter(items)
    crop = tuple(int(s) for s in self.config.input.image_size)
    with jax.set_mesh(self.mesh):
      for _ in range(num_chunks):
        group = [
          (key, rgb, *network_input(rgb, self.config, mode)) for key, rgb in _take(items, chunk)
        ]
        windows = [(g, y0, x0) for g, (*_, corners) in enumerate(group) for y0, x0 in corners]
        num_batches = _global_max(-(-len(windows) // local_batch))
        sums = [np.zeros(x.shape, np.float32) for _, _, x, _ in group]
        counts = [np.zeros(x.shape[:2], np.float32) for _, _, x, _ in group]
        left = np.bincount([w[0] for w in windows], minlength=len(group))
        for b in range(num_batches):
          batch = windows[b * local_batch : (b + 1) * local_batch]
          crops = np.zeros((local_batch, *crop, 3), np.float32)
          for j, (g, y0, x0) in enumerate(batch):
            crops[j] = group[g][2][y0 : y0 + crop[0], x0 : x0 + crop[1]]
          colours, _ = fn(self.params, sharding.shard_batch({"x": crops}, self.mesh)["x"])
          colours = local_rows(colours)
          for (g, y0, x0), c in zip(batch, colours, strict=False):
            sums[g][y0 : y0 + crop[0], x0 : x0 + crop[1]] += c
            counts[g][y0 : y0 + crop[0], x0 : x0 + crop[1]] += 1
            left[g] -= 1
            if left[g] == 0:
              key, rgb = group[g][:2]
              mean = sums[g] / counts[g][..., None]
              sums[g] = counts[g] = None
              yield key, mean, self.decode(mean, rgb.shape[:2])
              if progress is not None:
                progress.update()

  def decode(self, colours: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Colours at the network's resolution -> int32 labels at `size` (resize bilinearly, then decode)."""
    return decode_colours_host(resize_colours(colours, size), self.centroids)


def _take(items: Iterator, n: int) -> list:
  out = []
  for item in items:
    out.append(item)
    if len(out) == n:
      break
  return out


def progress_every(num_items: int) -> int:
  """Log about twenty progress lines for long jobs, none for a handful of images."""
  return 0 if num_items < 64 else max(num_items // 20, 1)
