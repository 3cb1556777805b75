"""Prompted segmentation at inference: (image, prompt) -> binary mask, and its evaluation.

  seg = Segmenter.from_workdir("/tmp/rlfseg_demo")    # a prompted run gives a PromptedSegmenter
  mask = seg("photo.png", prompt="a photo of class_3")  # int32 (H, W): 1 = the prompt's region

Whole-image inference: the image is resized to `config.input.image_size`, carried by the ODE to
its two-colour mask (Euler, `config.eval.num_steps`; with one step and
`config.prompted.adaptive.enabled`, the adaptive one-step rule of `prompted_flow`), the colours
are resized bilinearly to the image's size and decoded there (nearest of the two centroids).
Evaluation scores gIoU / cIoU / prec@k (`prompted_metrics`) and, for scale, the same metrics of
the all-background prediction. This module imports no training code.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import inference, prompted_flow, prompted_metrics, sampling, sharding
from flowseg_jax.data import pipeline


@functools.lru_cache(maxsize=16)
def _sample_fn(setup, mesh, options, adaptive: tuple | None):
  num_steps, shift, method, prediction, t_eps = options

  def sample_fn(params, images, prompts):
    apply = lambda x, t: setup.task.apply(params, x, t, prompts)
    b = images.shape[0]
    if adaptive is not None and num_steps == 1:
      t0 = jnp.zeros((b,), jnp.float32)
      v = sampling.velocity(apply(images, t0), images, t0, prediction=prediction, t_eps=t_eps)
      dt_min, dt_max, iterations = adaptive
      out, dt = prompted_flow.adaptive_one_step(
        images, v, setup.centroids, dt_min=dt_min, dt_max=dt_max, iterations=iterations
      )
    else:
      out = sampling.sample(
        apply, images, num_steps=num_steps, shift=shift, prediction=prediction, t_eps=t_eps,
        method=method,
      )  # fmt: skip
      dt = jnp.ones((b,), jnp.float32)
    return out, centroids_lib.decode_colors(out, setup.centroids), dt

  data = sharding.batch_sharding(mesh)
  return jax.jit(sample_fn, in_shardings=(None, data, data), out_shardings=(data, data, data))


def make_sample_fn(setup, mesh, num_steps: int | None = None, adaptive: bool | None = None):
  """jit: (params, images (B, H, W, 3), prompt ids (B,)) -> (colours, labels (B, H, W), dt (B,))."""
  cfg = setup.config.prompted.adaptive
  use = bool(cfg.enabled) if adaptive is None else adaptive
  options = (float(cfg.dt_min), float(cfg.dt_max), int(cfg.iterations)) if use else None
  return _sample_fn(setup, mesh, inference.sampler_options(setup.config, num_steps), options)


class PromptedSegmenter(inference.Segmenter):
  """(image, prompt) -> int32 (H, W) binary mask (1 = the prompt's region) at the image's size.

  A prompt is a text of the model's prompt list (`self.prompts`) or its int id. The demo's
  learned table knows exactly its prompts; a Qwen3-cache model knows the prompts it was cached for.
  """

  @property
  def prompts(self) -> list[str]:
    return self.setup.task.prompts

  def prompt_id(self, prompt) -> int:
    if isinstance(prompt, int | np.integer):
      if not 0 <= int(prompt) < len(self.prompts):
        raise ValueError(f"prompt id {prompt} not in [0, {len(self.prompts)})")
      return int(prompt)
    return self.setup.task.prompt_id(str(prompt))

  def __call__(self, image, *, prompt=None, num_steps=None, mode=None, adaptive=None):
    if prompt is None:
      raise ValueError("a prompted model needs prompt= (a text of its prompt list or an id)")
    if mode not in (None, "whole"):
      raise ValueError(f"prompted segmentation runs in 'whole' mode only, got mode={mode!r}")
    return self.segment_prompts([image], [prompt], num_steps=num_steps, adaptive=adaptive)[0]

  def segment_prompts(
    self, images: Sequence, prompts: Sequence, *, num_steps=None, adaptive=None
  ) -> list[np.ndarray]:
    """Images of any size with one prompt each -> int32 (H, W) masks, in order."""
    items = [
      (inference.to_rgb(im), self.prompt_id(p)) for im, p in zip(images, prompts, strict=True)
    ]
    return [labels for _, labels, _ in self.stream(items, num_steps=num_steps, adaptive=adaptive)]

  def stream(self, items, *, num_steps=None, adaptive=None):
    """(uint8 rgb, prompt id) items -> (colours at the network's size, labels at the image's, dt).

    Multi-process: every process passes its own items; the number of device calls is agreed
    over processes (a process with fewer items runs padding batches).
    """
    fn = make_sample_fn(self.setup, self.mesh, num_steps, adaptive)
    batch = self.batch_per_device * self.mesh.local_mesh.size
    crop = tuple(int(s) for s in self.config.input.image_size)
    items = list(items)
    num_batches = inference._global_max(-(-len(items) // batch))
    with jax.set_mesh(self.mesh):
      for b in range(num_batches):
        chunk = items[b * batch : (b + 1) * batch]
        x = np.zeros((batch, *crop, 3), np.float32)
        ids = np.zeros((batch,), np.int32)
        for j, (rgb, pid) in enumerate(chunk):
          x[j] = inference.network_input(rgb, self.config, "whole")[0]
          ids[j] = pid
        arrays = sharding.shard_batch({"x": x, "p": ids}, self.mesh)
        colours, _, dt = (
          inference.local_rows(a) for a in fn(self.params, arrays["x"], arrays["p"])
        )
        for j, (rgb, _) in enumerate(chunk):
          yield colours[j], self.decode(colours[j], rgb.shape[:2]), float(dt[j])


def wrong_prompts(prompts: Sequence[int], num_prompts: int) -> np.ndarray:
  """Each example's prompt replaced by another example's, different from its own: example i takes
  the prompt of example (i + n // 2) mod n, or of the next one after it whose prompt differs (when
  all n are the same prompt p: p + 1 mod num_prompts).

  On the synthetic demo this is another class's prompt, of a class present in the image or not:
  a model that uses its prompt segments that class (disjoint from the target) or nothing, so its
  gIoU against the original targets collapses; a model that ignores its prompt keeps its gIoU.
  """
  if num_prompts < 2:
    raise ValueError(f"wrong-prompt evaluation needs at least two prompts, got {num_prompts}")
  ids = np.asarray(prompts, np.int64)
  n = len(ids)
  if n and np.all(ids == ids[0]):
    return (ids + 1) % num_prompts
  out = np.empty_like(ids)
  for i in range(n):
    j = (i + n // 2) % n
    while ids[j] == ids[i]:
      j = (j + 1) % n
    out[i] = ids[j]
  return out


def evaluate_segmenter(
  segmenter: PromptedSegmenter, *, num_steps=None, adaptive=None, wrong_prompt=None
) -> dict:
  """gIoU / cIoU / prec@k of the eval split (summed over processes), with the all-background
  baseline and, when `wrong_prompt` (default `config.prompted.eval_wrong_prompt`), the
  wrong-prompt gIoU / cIoU ('wrong_giou', 'wrong_ciou': see `wrong_prompts`)."""
  config = segmenter.config
  if wrong_prompt is None:
    wrong_prompt = bool(config.prompted.get("eval_wrong_prompt", False))
  dataset = pipeline.create_eval_dataset(config.input)
  limit = config.eval.max_examples
  total = pipeline.num_eval_examples(config.input)
  if limit is not None and limit >= 0:
    total = min(total, limit)
  total = min(len(dataset), -(-total // jax.process_count()))
  examples = [ex for _, ex in zip(range(total), dataset, strict=False)]
  targets = [ex["label"][None] for ex in examples]
  ids = [int(ex["prompt"]) for ex in examples]
  model, dts = _score(segmenter, examples, ids, targets, num_steps, adaptive)
  background = prompted_metrics.PromptedIoU.empty()
  for target in targets:
    background = background.merge(
      prompted_metrics.PromptedIoU.from_model_output(
        predictions=np.zeros_like(target), targets=target
      )
    )
  result = _sum_over_processes(model).compute()
  base = _sum_over_processes(background).compute()
  result["baseline_giou"], result["baseline_ciou"] = base["giou"], base["ciou"]
  if wrong_prompt:
    wrong, _ = _score(
      segmenter, examples, wrong_prompts(ids, len(segmenter.prompts)), targets, num_steps, adaptive
    )
    wrong = _sum_over_processes(wrong).compute()
    result["wrong_giou"], result["wrong_ciou"] = wrong["giou"], wrong["ciou"]
  dt_sum = _sum_over_processes(np.asarray([np.sum(dts), len(dts)], np.float64))
  result["mean_dt"] = float(dt_sum[0] / max(dt_sum[1], 1))
  result["num_skipped_examples"] = dataset.num_skipped
  return result


def _score(segmenter, examples, ids, targets, num_steps, adaptive):
  """(PromptedIoU of this process's predictions for prompts `ids`, the step sizes)."""
  items = [(ex["image_orig"], int(i)) for ex, i in zip(examples, ids, strict=True)]
  metric, dts = prompted_metrics.PromptedIoU.empty(), []
  stream = segmenter.stream(items, num_steps=num_steps, adaptive=adaptive)
  for target, (_, pred, dt) in zip(targets, stream, strict=True):
    metric = metric.merge(
      prompted_metrics.PromptedIoU.from_model_output(predictions=pred[None], targets=target)
    )
    dts.append(dt)
  return metric, dts


def _sum_over_processes(tree):
  tree = jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float64), tree)
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a)).sum(0), tree)


def evaluate_state(config, setup, params, mesh, *, workdir: str, step: int, writer=None) -> dict:
  """Training's evaluation of a prompted run: eval/step_<k>.json and the writer's scalars."""
  seg = PromptedSegmenter(config, params, mesh=mesh, step=step, setup=setup)
  result = evaluate_segmenter(seg)
  write_result(workdir, f"step_{step}", {"step": step, **result, **settings(config)})
  if writer is not None:
    scalars = ("giou", "ciou", "baseline_giou", "baseline_ciou", "wrong_giou", "wrong_ciou")
    scalars += ("mean_dt",)
    writer.write_scalars(step, {f"eval/{k}": result[k] for k in scalars if k in result})
  log(step, result)
  return result


def settings(config, num_steps=None, adaptive=None) -> dict:
  steps = config.eval.num_steps if num_steps is None else num_steps
  adaptive = config.prompted.adaptive.enabled if adaptive is None else adaptive
  return {"num_steps": int(steps), "adaptive_one_step": bool(adaptive and steps == 1)}


def write_result(workdir: str, name: str, result: dict) -> str:
  if jax.process_index() != 0:
    return ""
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", f"{name}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return path


def log(step: int, result: dict, name: str = "eval") -> None:
  wrong = ""
  if "wrong_giou" in result:
    wrong = (
      f"; wrong prompt: gIoU {100 * result['wrong_giou']:.2f} cIoU {100 * result['wrong_ciou']:.2f}"
    )
  logging.info(
    "%s step %d: gIoU %.2f cIoU %.2f (all-background: gIoU %.2f cIoU %.2f%s) over %d examples",
    name, step, 100 * result["giou"], 100 * result["ciou"], 100 * result["baseline_giou"],
    100 * result["baseline_ciou"], wrong, result["num_examples"],
  )  # fmt: skip
