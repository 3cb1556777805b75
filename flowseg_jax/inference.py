"""Segmenter: a trained model as a function from images of any size to label maps at their own size.

  seg = Segmenter.from_workdir("/tmp/flowseg_demo")   # workdir/config.json + the EMA denoiser weights
  seg = Segmenter.from_pretrained("/tmp/flowseg_model")  # or a Hub id: `flowseg export` wrote it
  labels = seg("photo.jpg")                           # int32 (H, W) train ids
  mask = Segmenter.from_workdir("/tmp/rlfseg_demo")("photo.jpg", prompt="a photo of texture_003")
  mask = Segmenter.from_workdir("/tmp/rlfseg_text")("photo.jpg", prompt="the pink ringed thing")

Each image becomes one or more network inputs ("windows"): whole mode resizes it to
`config.input.image_size`; slide mode resizes it so its short side is `config.eval.slide_short_side`
(default: the window's) and cuts mmseg's grid of image_size windows (stride: 2/3 of the window
unless set; `slide_settings`). The windows of many images stream through fixed-shape
device batches (padded), the Euler ODE carries each to its colour mask, overlapping windows are averaged,
and the continuous colours are resized bilinearly to the image's own size and decoded there (nearest
centroid), as mmseg resizes logits before the argmax (DESIGN.md "Inference"). One Segmenter serves
every task: the task says what the network is conditioned on (a prompted model needs a prompt for
every image, in every method; a semantic one takes none) and how the ODE is integrated. A text
model (`task.encodes_text`) takes any sentence: the Segmenter encodes it with the model's own text
encoder and keeps the features of the last `prompt_cache_size` prompts it encoded; a learned-table
model takes the texts of its prompt list only.

Every device always runs `batch_per_device` windows, whatever the device count, so a window's arithmetic
does not depend on how many devices share the work. Restoring reads only the denoiser's parameters from
the `state` item of the newest readable checkpoint (no optimiser state, no REPA teacher). This module
imports no training code.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import checkpointing, sampling, sharding, tasks
from flowseg_jax.data import classes
from flowseg_jax.inference_host import (
  decode_colours_host,
  mean_colours,
  network_input,
  resize_colours,
  to_rgb,
  tta_views,
)
from flowseg_jax.run import files
from flowseg_jax.run.agreement import Agreement
from flowseg_jax.run.progress import Progress
from flowseg_jax.scoring import PixelScorer

# ------------------------------------------------------------------------------------------------
# The sampler.
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compiled_sampler(task, mesh, options: sampling.SamplerOptions, trajectory: bool):
  decode_centroids = jnp.asarray(task.decode_centroids)  # the ignore colour is never predicted

  def sample(params, images, cond):
    apply_fn = lambda x, t: task.apply(params, x, t, cond)
    if trajectory:
      return options.sample(apply_fn, images, return_trajectory=True)
    out, dt = task.integrate(apply_fn, images, options)
    return out, centroids_lib.decode_colours(out, decode_centroids), dt

  data = sharding.batch_sharding(mesh)
  traj = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
  out_shardings = (data, traj) if trajectory else (data, data, data)
  return jax.jit(sample, in_shardings=(None, data, data), out_shardings=out_shardings)


def sample_fn(task, mesh, options: sampling.SamplerOptions, *, trajectory: bool = False):
  """jit: (network params, images (B, H, W, 3), conditions int32 (B,)) -> (colours (B, H, W, 3) f32,
  labels (B, H, W) int32, step scale dt (B,)), integrated as `task.integrate` does.

  With `trajectory`: (colours, states after every step (num_steps, B, H, W, 3)). Compiled once per
  (task, mesh, options).
  """
  return _compiled_sampler(task, mesh, options, trajectory)


# ------------------------------------------------------------------------------------------------
# The segmenter.
# ------------------------------------------------------------------------------------------------


class Segmenter:
  """Images of any size -> int32 label maps at their own size: train ids (semantic) or a binary
  mask of the prompt's region (prompted: every method takes the images' prompts).

  Args:
    config: the run's ConfigDict (task, model, input.image_size, objective, eval, ...).
    params: the network's parameters.
    task: `tasks.create_task(config)` (built when not given; pass one to share compiled samplers).
    mesh: device mesh (default: all devices along 'data'; parameters replicated).
    step: the checkpoint step the parameters come from (for names and logs).
    batch_per_device: windows per device per call (default config.eval.batch_per_device, else 1).
    prompt_cache_size: text features of at most this many prompts are kept (a text model).
  """

  def __init__(
    self,
    config,
    params,
    *,
    task=None,
    mesh=None,
    step: int | None = None,
    batch_per_device=None,
    prompt_cache_size: int = 256,
  ):
    self.config = config
    self.task = tasks.create_task(config) if task is None else task
    self.mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
    self.params = params
    self.step = step
    default = config.eval.get("batch_per_device", 1)
    self.batch_per_device = int(default if batch_per_device is None else batch_per_device)
    if self.batch_per_device < 1:
      raise ValueError(f"batch_per_device must be >= 1, got {self.batch_per_device}")
    self.num_classes = self.task.num_classes
    self.class_names = self.task.class_names
    self.centroids = self.task.decode_centroids
    self.palette = self.task.palette  # classes.json's colours, else the centroids'
    if prompt_cache_size < 1:
      raise ValueError(f"prompt_cache_size must be >= 1, got {prompt_cache_size}")
    self.prompt_cache_size = int(prompt_cache_size)
    self._prompt_features: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

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
    checkpointing.check_has_checkpoint(workdir)
    config = files.load_config(workdir) if config is None else config
    mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
    task = tasks.create_task(config)
    abstract = task.abstract_params(mesh, sharding.rules_from_config(config.sharding_rules))
    use_ema = bool(config.eval.use_ema) if use_ema is None else use_ema
    params, restored_step = checkpointing.restore_denoiser(
      workdir, abstract, use_ema=use_ema, step=step
    )
    logging.info(
      "Segmenter: %s step %d (%s weights).", workdir, restored_step, "EMA" if use_ema else "online"
    )
    return cls(config, params, task=task, mesh=mesh, step=restored_step, **kwargs)

  @classmethod
  def from_pretrained(
    cls, name_or_path: str, *, revision: str | None = None, mesh=None, **kwargs
  ) -> Segmenter:
    """A model folder written by `flowseg export` (`pretrained.py`): a local path, a gs:// URL or
    a Hugging Face Hub id ("user/name", the `hub` extra). Needs no workdir, orbax or training
    config; gives the labels `from_workdir` gives on the step it was exported from."""
    from flowseg_jax import pretrained

    mesh = sharding.make_mesh(-1, 1) if mesh is None else mesh
    folder, meta, config, vocabulary = pretrained.read_segmenter(name_or_path, revision)
    try:
      task = tasks.create_task(config, vocabulary)
    except ValueError as e:
      raise pretrained.ModelFolderError(f"{folder}: config.json: {e}") from e
    pretrained.check_task(folder, meta, task)
    abstract = task.abstract_params(mesh, sharding.rules_from_config(config.sharding_rules))
    params = pretrained.load_params(folder, abstract)
    step = (meta.get("source") or {}).get("step")
    logging.info("Segmenter: %s (step %s, EMA weights).", folder, step)
    return cls(config, params, task=task, mesh=mesh, step=step, **kwargs)

  # -- public API --------------------------------------------------------------------------------

  @property
  def prompts(self) -> list[str]:
    """The prompt texts a prompted model was trained and evaluated on (empty for a semantic
    model); a text model (`task.encodes_text`) takes other sentences too."""
    return list(self.task.prompts)

  def conditions(self, prompts: Sequence) -> np.ndarray:
    """The network's condition of each prompt, (N, *task.condition_spec()): ids, or a text
    model's features, encoded once per distinct text (the last prompt_cache_size are kept); a
    text model also takes features themselves (an array of that shape, e.g. a streamed cache's).
    Every prompt is checked (a missing or, for a learned table, unknown one raises)."""
    shape, dtype = self.task.condition_spec()
    given = {i: p for i, p in enumerate(prompts) if isinstance(p, np.ndarray)}
    if given and (not self.task.encodes_text or {p.shape for p in given.values()} != {shape}):
      raise ValueError(f"features given as prompts must be text features of shape {shape}")
    conds = [p if i in given else self.task.condition_of(p) for i, p in enumerate(prompts)]
    if not self.task.encodes_text:
      return np.asarray(conds, dtype).reshape(len(conds), *shape)
    cache = self._prompt_features
    new = list(dict.fromkeys(c for i, c in enumerate(conds) if i not in given and c not in cache))
    found = dict(zip(new, self.task.encode(self.params, new))) if new else {}
    out = np.zeros((len(conds), *shape), dtype)
    for i, text in enumerate(conds):
      if i not in given and text not in found:
        cache.move_to_end(text)
      out[i] = text if i in given else found[text] if text in found else cache[text]
    for text, features in found.items():
      cache[text] = features
    while len(cache) > self.prompt_cache_size:
      cache.popitem(last=False)
    return out

  def __call__(
    self,
    image,
    *,
    prompt=None,
    num_steps=None,
    mode=None,
    adaptive=None,
    tta=None,
    return_confidence: bool = False,
  ):
    """One image (path, PIL image or uint8 array) -> int32 (H, W) labels at its own size.

    prompt: a prompted model's prompt: any text for a text model, a text of its prompt list for a
      learned-table one, or an id of that list; a semantic model takes none.
    adaptive: the prompted task's adaptive one-step rule (default config.prompted.adaptive).
    return_confidence: also return float32 (H, W) confidence in [0, 1], the decoded colour's margin
      between its class colour and the runner-up's (`decode_colours_host`): 1 on the class colour,
      0 halfway between two classes, low where the model hesitates (boundaries, unfamiliar texture).
    tta: test-time augmentation, 'none', 'flip' or 'ms_flip' (default config.eval.tta;
      `segment_stream`).
    """
    return self.segment_batch(
      [image],
      prompts=[prompt],
      num_steps=num_steps,
      mode=mode,
      adaptive=adaptive,
      tta=tta,
      return_confidence=return_confidence,
    )[0]

  def segment_batch(
    self,
    images: Sequence,
    *,
    prompts=None,
    num_steps=None,
    mode=None,
    adaptive=None,
    tta=None,
    return_confidence: bool = False,
  ) -> list:
    """Many images of any sizes (and one prompt each for a prompted model) -> int32 (H, W) label
    maps, in order (with return_confidence, (labels, confidence) pairs). Every prompt is checked
    before any image is segmented."""
    prompts = [None] * len(images) if prompts is None else list(prompts)
    if len(prompts) != len(images):
      raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one per image")
    self.conditions(prompts)  # checks every prompt (and encodes a text model's) first
    items = ((i, to_rgb(img), p) for i, (img, p) in enumerate(zip(images, prompts)))
    out = [None] * len(images)
    stream = self.segment_stream(
      items, len(images), num_steps=num_steps, mode=mode, adaptive=adaptive, tta=tta
    )
    if return_confidence and (tta or self.config.eval.get("tta", "none")) != "none":
      raise ValueError("return_confidence is computed without test-time augmentation: tta='none'")
    for i, colours, labels, _ in stream:
      if return_confidence:
        size = labels.shape
        labels = self.decode(colours, size, confidence=True)
      out[i] = labels
    return out

  def segment_prompts(self, images: Sequence, prompts: Sequence, **kwargs) -> list[np.ndarray]:
    """Images with one prompt each -> masks (`segment_batch` with `prompts`)."""
    return self.segment_batch(images, prompts=prompts, **kwargs)

  def colourise(self, labels: np.ndarray) -> np.ndarray:
    """int (H, W) labels -> uint8 (H, W, 3) in the model's palette (255 white)."""
    return classes.colourise(labels, self.palette)

  def overlay(self, image, labels: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image blended with its colourised labels, uint8 (H, W, 3)."""
    rgb = to_rgb(image).astype(np.float32)
    return ((1 - alpha) * rgb + alpha * self.colourise(labels)).round().astype(np.uint8)

  def trajectory(self, image, *, prompt=None, num_steps: int | None = None) -> np.ndarray:
    """The ODE states x(t_0 = 0), ..., x(t_n = 1) of the whole-image input: float32
    (num_steps + 1, H, W, 3) in colour space, at config.input.image_size."""
    cond = self.conditions([prompt])
    x0, _, _ = network_input(to_rgb(image), self.config, "whole")
    batch = self.batch_per_device * self.mesh.size
    images = np.zeros((batch, *x0.shape), np.float32)
    images[0] = x0
    conds = np.repeat(cond, batch, axis=0)
    fn = sample_fn(self.task, self.mesh, self.task.sampler_options(num_steps), trajectory=True)
    with jax.set_mesh(self.mesh):
      arrays = sharding.shard_batch({"x": images, "c": conds}, self.mesh)
      _, states = fn(self.params, arrays["x"], arrays["c"])
    states = np.asarray(jax.device_get(states))[:, 0]
    return np.concatenate([x0[None], states], axis=0)

  # -- streaming (evaluators and predict build on this) ------------------------------------------

  def segment_stream(
    self,
    items: Iterable[tuple[Any, np.ndarray, Any]],
    num_items: int,
    *,
    num_steps: int | None = None,
    mode: str | None = None,
    adaptive: bool | None = None,
    tta: str | None = None,
    progress: Progress | None = None,
    confusion: np.ndarray | None = None,
  ) -> Iterator[tuple[Any, np.ndarray, np.ndarray, float]]:
    """(key, uint8 rgb (h, w, 3), prompt) items -> (key, colours at the network's resolution, int32
    labels (h, w), mean step scale dt), in order, as soon as the pixel chunk of its image is decoded.

    tta (default config.eval.tta): 'none', or 'flip': each window also goes through the network
    mirrored left-right, its colours are mirrored back, and the label is the class with the
    highest mean probability over the two views, the probability being the potential's softmax
    over classes (FlowSeg eq 9: p_k ∝ (d_k + eps)^(-1/tau)), as mmseg averages logits. The mean
    *colour* of two views that disagree can fall nearer a third class (on the demo it costs 3
    mIoU points); the yielded colours are that mean, for pictures. 'ms_flip' adds mmseg's scales
    (config.eval.tta_scales): each view is the image at that multiple of its scale-1 size
    (`network_input`: padded below the window, windowed above), and every view's colours are
    resized to the image's size before the probabilities are averaged.

    Colours resized to each image's size are decoded on device in chunks of pixels of many
    images (`scoring.PixelScorer`). confusion: an int64 (N, N) array; with it every item is (key,
    rgb, prompt, annotation (h, w)) and the images' counts (on device) are added to it.

    Multi-process: every process calls this with its own items (num_items of them); the number of
    device calls is agreed over processes, and so is an error reading or preparing one process's
    items: every process raises it (run.agreement) instead of the others waiting in the sampler.
    """
    agreement = Agreement()
    mode = self.config.eval.mode if mode is None else mode
    views = tta_views(self.config, tta)
    fn = sample_fn(self.task, self.mesh, self.task.sampler_options(num_steps, adaptive))
    local_batch = self.batch_per_device * self.mesh.local_mesh.size
    chunk = 8 * local_batch  # images prepared at a time: bounded host memory
    num_chunks = agreement.agree(-(-num_items // chunk))  # the largest over processes
    items = iter(items)
    crop = tuple(int(s) for s in self.config.input.image_size)
    scales = sorted({scale for scale, _ in views})
    cond_shape, cond_dtype = self.task.condition_spec()
    scorer = PixelScorer(self.task, self.mesh.local_mesh, len(views), confusion)
    with jax.set_mesh(self.mesh):
      for _ in range(num_chunks):
        group, windows = [], []
        with agreement.hold():
          taken = _take(items, chunk)
          conditions = self.conditions([item[2] for item in taken])
          # (key, rgb, condition, {scale: (input, corners, valid)})
          group = [
            (key, rgb, cond, {s: network_input(rgb, self.config, mode, s) for s in scales})
            for (key, rgb, *_), cond in zip(taken, conditions, strict=True)
          ]
          annotations = [item[3] if confusion is not None else None for item in taken]
          windows = [
            (g, v, y0, x0)
            for g, (*_, inputs) in enumerate(group)
            for v, (scale, _) in enumerate(views)
            for y0, x0 in inputs[scale][1]
          ]
        num_batches = agreement.agree(-(-len(windows) // local_batch))
        sums = [
          [np.zeros(inputs[scale][0].shape, np.float32) for scale, _ in views]
          for *_, inputs in group
        ]
        counts = [[np.zeros(inputs[scale][0].shape[:2], np.float32) for scale, _ in views]
                  for *_, inputs in group]  # fmt: skip
        dts = np.zeros(len(group), np.float64)
        left = np.bincount([w[0] for w in windows], minlength=len(group))
        num_windows = left.copy()
        for b in range(num_batches):
          batch = windows[b * local_batch : (b + 1) * local_batch]
          crops = np.zeros((local_batch, *crop, 3), np.float32)
          conds = np.zeros((local_batch, *cond_shape), cond_dtype)
          for j, (g, v, y0, x0) in enumerate(batch):
            scale, flip = views[v]
            window = group[g][3][scale][0][y0 : y0 + crop[0], x0 : x0 + crop[1]]
            crops[j] = window[:, ::-1] if flip else window
            conds[j] = group[g][2]
          arrays = sharding.shard_batch({"x": crops, "c": conds}, self.mesh)
          colours, _, dt = fn(self.params, arrays["x"], arrays["c"])
          colours, dt = sharding.local_rows(colours), sharding.local_rows(dt)
          for j, (g, v, y0, x0) in enumerate(batch):
            out = colours[j][:, ::-1] if views[v][1] else colours[j]  # mirrored back
            sums[g][v][y0 : y0 + crop[0], x0 : x0 + crop[1]] += out
            counts[g][v][y0 : y0 + crop[0], x0 : x0 + crop[1]] += 1
            dts[g] += dt[j]
            left[g] -= 1
            if left[g] == 0:
              key, rgb, _, inputs = group[g]
              per_view = []
              for (scale, _), total, count in zip(views, sums[g], counts[g], strict=True):
                h, w = inputs[scale][2]
                per_view.append(total[:h, :w] / count[:h, :w, None])
              sums[g] = counts[g] = None
              resized = np.stack([resize_colours(v, rgb.shape[:2]) for v in per_view])
              ref = min(range(len(views)), key=lambda i: abs(views[i][0] - 1.0))
              item = (key, mean_colours(per_view, ref), dts[g] / num_windows[g])
              scorer.add(item, resized, annotations[g])
              if scorer.full:
                yield from _decoded(scorer, progress)
        yield from _decoded(scorer, progress)

  def decode(self, colours: np.ndarray, size: tuple[int, int], *, confidence: bool = False):
    """Colours at the network's resolution -> int32 labels at `size` (resize bilinearly, then
    decode); with confidence, (labels, confidence) as `decode_colours_host`."""
    return decode_colours_host(resize_colours(colours, size), self.centroids, confidence=confidence)


def _decoded(scorer: PixelScorer, progress: Progress | None):
  """The scorer's pending images decoded, as segment_stream's items, in order."""
  for (key, colours, dt), labels in scorer.flush():
    yield key, colours, labels, dt
    if progress is not None:
      progress.update()


def _take(items: Iterator, n: int) -> list:
  out = []
  for item in items:
    out.append(item)
    if len(out) == n:
      break
  return out
