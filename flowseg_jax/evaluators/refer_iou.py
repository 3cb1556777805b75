"""Metrics of prompted (referring) segmentation: gIoU, cIoU and precision at IoU thresholds.

Each example is one (image, prompt) pair with a binary target mask (1 = the referred region,
0 = background, `ignore_index` = not evaluated) and a binary prediction. Per example, I and U are
the foreground intersection and union over the evaluated pixels.
- gIoU (generalised / mean IoU): the mean over examples of I / U. An example whose target and
  prediction are both empty (U = 0) counts as IoU 1: the model correctly found nothing (the
  gRefCOCO convention; it never arises on RefCOCO, where every target is non-empty).
- cIoU (cumulative, also called oIoU): sum of I over the dataset / sum of U (1 when both sums
  are 0). Large objects weigh more than in gIoU.
- prec@k: the fraction of examples with IoU > k (strictly, as LAVT/CRIS evaluate), k in
  PREC_THRESHOLDS.
Per batch the counts are computed on device (int32: a batch has far fewer than 2^31 pixels);
across batches `PromptedIoU` sums them on the host in float64 / int64.

`ReferIouEvaluator` scores a prompted Segmenter on its eval split: gIoU / cIoU / prec@k, the
all-background prediction's figures for scale, the wrong-prompt figures (`wrong_prompts`) and
the prompt-use figures (`PromptConfusion`).

Prompt use. The wrong-prompt gIoU (each example predicted under another example's prompt, scored
against its own target) is near 0 for a model that uses its prompt, but also for one that answers
unfamiliar prompts with nothing. Where an image holds several prompted examples (examples named
'<image>:<class>', as `data.prompted` names them), each ordered pair (i, j) of them scores the
prediction for prompt i against i's own mask and against j's mask:
  use_own_giou    mean IoU(pred_i, mask_i) over the pairs: high when the other prompt's region is
                  found (low for an empty answer),
  use_other_giou  mean IoU(pred_i, mask_j): the wrong-prompt figure within one image,
  prompt_use      their difference: near gIoU for a model that segments what it is asked, near 0
                  for a prompt-blind one (it finds the same region whatever the prompt) and for
                  one that answers with nothing.
The per-prompt confusion (row: the prompt asked, column: the prompt whose mask is scored, mean
IoU over the images holding both; the diagonal is each prompt's own gIoU there) goes into the
JSON when at most `MAX_CONFUSION_PROMPTS` prompts occur. Pairs are formed within one process's
share of the split (all of them on one process).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from flowseg_jax.centroids import IGNORE_LABEL
from flowseg_jax.data import text_cache
from flowseg_jax.evaluators import common

PREC_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
MAX_CONFUSION_PROMPTS = 64


def intersection_union(
  predictions: jax.Array, targets: jax.Array, *, ignore_index: int = IGNORE_LABEL
) -> tuple[jax.Array, jax.Array]:
  """Per-example foreground intersection and union, each (B,) int32. jit-able.

  Args:
    predictions: (B, ...) bool or int; nonzero = foreground.
    targets: (B, ...) int; 1 = foreground, 0 = background, ignore_index = not evaluated.
  """
  if predictions.shape != targets.shape:
    raise ValueError(
      f"intersection_union: predictions {predictions.shape} and targets {targets.shape} differ"
    )
  b = predictions.shape[0]
  targets = targets.reshape(b, -1).astype(jnp.int32)
  valid = targets != ignore_index
  pred = (predictions.reshape(b, -1) != 0) & valid
  true = (targets == 1) & valid
  inter = jnp.sum(pred & true, axis=1, dtype=jnp.int32)
  union = jnp.sum(pred | true, axis=1, dtype=jnp.int32)
  return inter, union


@flax.struct.dataclass
class PromptedIoU(clu_metrics.Metric):
  """A clu Metric accumulating gIoU / cIoU / prec@k statistics.

  Build it per batch with `PromptedIoU.from_model_output(predictions=..., targets=...,
  mask=...)` (mask (B,): 0 for padding examples of a ragged last batch); merge on the host after
  `to_host()`; `compute()` returns {'giou', 'ciou', 'prec@0.5', ..., 'num_examples'}.
  """

  iou_sum: jax.Array
  count: jax.Array
  inter_sum: jax.Array
  union_sum: jax.Array
  hits: jax.Array  # (len(PREC_THRESHOLDS),) examples with IoU > threshold

  @classmethod
  def empty(cls) -> PromptedIoU:
    zero = np.zeros((), np.float64)
    return cls(zero, zero, zero, zero, np.zeros(len(PREC_THRESHOLDS), np.float64))

  @classmethod
  def from_model_output(
    cls, *, predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None, **_
  ) -> PromptedIoU:
    inter, union = intersection_union(predictions, targets)
    w = jnp.ones(inter.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    iou = jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)
    thresholds = jnp.asarray(PREC_THRESHOLDS, jnp.float32)
    return cls(
      iou_sum=jnp.sum(w * iou),
      count=jnp.sum(w),
      inter_sum=jnp.sum(w * inter),
      union_sum=jnp.sum(w * union),
      hits=jnp.sum(w[:, None] * (iou[:, None] > thresholds[None, :]), axis=0),
    )

  def merge(self, other: PromptedIoU) -> PromptedIoU:
    return jax.tree.map(lambda a, b: a + b, self, other)

  def to_host(self) -> PromptedIoU:
    """A float64 copy on the host (fetches from device)."""
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a), np.float64), self)

  def compute(self) -> dict[str, Any]:
    count = float(self.count)
    if count == 0:
      raise ValueError("PromptedIoU.compute: no examples were accumulated.")
    union = float(self.union_sum)
    out = {
      "giou": float(self.iou_sum) / count,
      "ciou": float(self.inter_sum) / union if union > 0 else 1.0,
      "num_examples": int(round(count)),
    }
    for k, hits in zip(PREC_THRESHOLDS, np.asarray(self.hits)):
      out[f"prec@{k}"] = float(hits) / count
    return out


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


def pairwise_iou(predictions: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """IoU of every prediction against every target of one image: float64 (n, n), [i, j] =
  IoU(predictions[i], targets[j]) over target j's evaluated pixels (1 where both are empty).

  predictions (n, H, W) nonzero = foreground; targets (n, H, W) in {0, 1, IGNORE_LABEL}.
  """
  n = len(targets)
  valid = (targets.reshape(n, -1) != IGNORE_LABEL).astype(np.float64)
  true = (targets.reshape(n, -1) == 1).astype(np.float64)
  pred = (predictions.reshape(n, -1) != 0).astype(np.float64)
  inter = pred @ true.T
  union = pred @ valid.T + true.sum(1)[None, :] - inter
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@flax.struct.dataclass
class PromptConfusion:
  """Sums of the prompt-use figures (module docstring) over images: pair sums, and the
  per-prompt confusion (None when the prompt list is longer than MAX_CONFUSION_PROMPTS)."""

  own_sum: np.ndarray
  other_sum: np.ndarray
  pairs: np.ndarray
  iou_sum: np.ndarray | None
  count: np.ndarray | None

  @classmethod
  def empty(cls, num_prompts: int) -> PromptConfusion:
    zero = np.zeros((), np.float64)
    if num_prompts > MAX_CONFUSION_PROMPTS:
      return cls(zero, zero, zero, None, None)
    matrix = np.zeros((num_prompts, num_prompts), np.float64)
    return cls(zero, zero, zero, matrix, matrix.copy())

  def add_image(self, prompts: Sequence[int], predictions, targets) -> PromptConfusion:
    """The examples of one image: their prompt ids, predictions and targets (n, H, W)."""
    n = len(prompts)
    if n < 2:
      return self
    iou = pairwise_iou(np.asarray(predictions), np.asarray(targets))
    off = ~np.eye(n, dtype=bool)
    own = np.diag(iou)[:, None] * off
    out = self.replace(
      own_sum=self.own_sum + own.sum(),
      other_sum=self.other_sum + (iou * off).sum(),
      pairs=self.pairs + off.sum(),
    )
    if self.iou_sum is None:
      return out
    ids = np.asarray(prompts, np.int64)
    iou_sum, count = self.iou_sum.copy(), self.count.copy()
    np.add.at(iou_sum, (ids[:, None], ids[None, :]), iou)
    np.add.at(count, (ids[:, None], ids[None, :]), 1.0)
    return out.replace(iou_sum=iou_sum, count=count)

  def compute(self, prompt_texts: Sequence[str]) -> dict[str, Any]:
    """{'use_own_giou', 'use_other_giou', 'prompt_use', 'use_pairs', 'confusion'} ({} when no
    image holds two examples)."""
    pairs = float(self.pairs)
    if pairs == 0:
      return {}
    own, other = float(self.own_sum) / pairs, float(self.other_sum) / pairs
    out = {
      "use_own_giou": own,
      "use_other_giou": other,
      "prompt_use": own - other,
      "use_pairs": int(round(pairs)),
    }
    if self.count is not None:
      seen = np.flatnonzero(self.count.sum(0) + self.count.sum(1))
      count = self.count[np.ix_(seen, seen)]
      mean = np.where(count > 0, self.iou_sum[np.ix_(seen, seen)] / np.maximum(count, 1), np.nan)
      out["confusion"] = {
        "prompts": [prompt_texts[i] for i in seen],
        "giou": [[None if np.isnan(v) else round(float(v), 4) for v in row] for row in mean],
      }
    return out


def image_of(name: str) -> str | None:
  """The image an example's name refers to ('<image>:<class>'), None when it names none."""
  return name.rsplit(":", 1)[0] if ":" in name else None


class ReferIouEvaluator(common.Evaluator):
  """gIoU / cIoU / prec@k of a prompted Segmenter, with the all-background baseline and, when
  `config.prompted.eval_wrong_prompt`, the wrong-prompt gIoU / cIoU ('wrong_giou', 'wrong_ciou')."""

  SCALARS = (
    "giou",
    "ciou",
    "baseline_giou",
    "baseline_ciou",
    "wrong_giou",
    "wrong_ciou",
    "use_own_giou",
    "use_other_giou",
    "prompt_use",
    "mean_dt",
  )

  def settings(self, *, num_steps=None, mode=None, adaptive=None) -> dict:
    if mode not in (None, "whole"):
      raise ValueError(f"prompted evaluation runs in 'whole' mode only, got mode={mode!r}")
    if self.config.eval.get("tta", "none") != "none":  # a mirror swaps 'left' and 'right'
      raise ValueError("prompted evaluation runs without test-time augmentation (config.eval.tta)")
    steps = int(self.config.eval.num_steps if num_steps is None else num_steps)
    adaptive = self.config.prompted.adaptive.enabled if adaptive is None else adaptive
    return {"num_steps": steps, "adaptive_one_step": bool(adaptive and steps == 1)}

  def output_name(self, step: int, settings: dict) -> str:
    suffix = "_adaptive" if settings["adaptive_one_step"] else ""
    return f"step_{step}_steps{settings['num_steps']}{suffix}"

  def run(self, settings: dict) -> dict:
    seg = self.segmenter
    dataset, examples, _ = common.local_examples(self.config)
    # Streamed text features (data.text_cache) are the conditions themselves, read again from the
    # split's cache as each example is scored: all of them would not fit (RefCOCO val ~10 GiB).
    examples = [{k: v for k, v in ex.items() if k != "text"} for ex in examples]
    streamed = None
    if self.config.input.get("text_features") and seg.task.encodes_text:
      root, split = self.config.input.text_features, self.config.input.eval_split
      streamed = text_cache.SplitFeatures(text_cache.split_dir(root, split)).features
    targets = [ex["label"][None] for ex in examples]
    ids = [int(ex["prompt"]) for ex in examples]
    confusion = [PromptConfusion.empty(len(seg.prompts))]
    group: list = []  # (prompt, prediction, target) of the current image's examples

    def flush():
      if group:
        ps, preds, ts = zip(*group)
        confusion[0] = confusion[0].add_image(ps, np.stack(preds), np.concatenate(ts))
        group.clear()

    last = [None]

    def on_prediction(i, pred):  # an image's examples come together (data.prompted)
      image = image_of(str(examples[i].get("name", "")))
      if image is None or image != last[0]:
        flush()
      last[0] = image
      if image is not None:
        group.append((ids[i], pred, targets[i]))

    model, dts = self._score(examples, ids, targets, settings, on_prediction, streamed)
    flush()
    background = PromptedIoU.empty()
    for target in targets:
      background = background.merge(
        PromptedIoU.from_model_output(predictions=np.zeros_like(target), targets=target)
      )
    result = _summed(model).compute()
    base = _summed(background).compute()
    result["baseline_giou"], result["baseline_ciou"] = base["giou"], base["ciou"]
    if bool(self.config.prompted.get("eval_wrong_prompt", False)):
      wrong_ids = wrong_prompts(ids, len(seg.prompts))  # other examples' sentences
      wrong, _ = self._score(examples, wrong_ids, targets, settings, streamed=streamed)
      wrong = _summed(wrong).compute()
      result["wrong_giou"], result["wrong_ciou"] = wrong["giou"], wrong["ciou"]
    dt_sum = common.sum_over_processes(np.asarray([np.sum(dts), len(dts)], np.float64))
    result["mean_dt"] = float(dt_sum[0] / max(dt_sum[1], 1))
    result["num_skipped_examples"] = dataset.num_skipped
    result.update(common.sum_over_processes(confusion[0]).compute(seg.prompts))
    return result

  def _score(self, examples, ids, targets, settings, on_prediction=None, streamed=None):
    """(PromptedIoU of this process's predictions for prompts `ids` (`streamed(id)`: their
    features, read as they are needed), the step sizes); on_prediction(example index, int32
    (H, W) prediction) sees each prediction in order."""
    conds = (streamed(int(p)) if streamed else int(p) for p in ids)
    items = ((i, ex["image_orig"], c) for i, (ex, c) in enumerate(zip(examples, conds)))
    metric, dts = PromptedIoU.empty(), []
    stream = self.segmenter.segment_stream(
      items,
      len(examples),
      num_steps=settings["num_steps"],
      mode="whole",
      adaptive=settings["adaptive_one_step"],
    )
    for target, (i, _, pred, dt) in zip(targets, stream, strict=True):
      metric = metric.merge(PromptedIoU.from_model_output(predictions=pred[None], targets=target))
      dts.append(dt)
      if on_prediction is not None:
        on_prediction(i, pred)
    return metric, dts

  def write(self, workdir, name, step, result, settings, writer=None) -> str:
    path = common.write_json(workdir, name, {"step": step, **result, **settings})
    if writer is not None:
      scalars = {f"eval/{k}": result[k] for k in self.SCALARS if k in result}
      writer.write_scalars(step, scalars)
    return path

  def summary(self, result: dict) -> str:
    return (
      f"gIoU {100 * result['giou']:.2f}% cIoU {100 * result['ciou']:.2f}% (all-background: gIoU "
      f"{100 * result['baseline_giou']:.2f}% cIoU {100 * result['baseline_ciou']:.2f}%)"
    )

  def log_line(self, result: dict) -> str:
    wrong = ""
    if "wrong_giou" in result:
      wrong = (
        f"; wrong prompt: gIoU {100 * result['wrong_giou']:.2f} "
        f"cIoU {100 * result['wrong_ciou']:.2f}"
      )
    use = ""
    if "prompt_use" in result:
      use = (
        f"; prompt use {100 * result['prompt_use']:.2f} (other prompts of the image: own mask "
        f"gIoU {100 * result['use_own_giou']:.2f}, this mask {100 * result['use_other_giou']:.2f}"
        f", {result['use_pairs']} pairs)"
      )
    return (
      f"gIoU {100 * result['giou']:.2f} cIoU {100 * result['ciou']:.2f} (all-background: gIoU "
      f"{100 * result['baseline_giou']:.2f} cIoU {100 * result['baseline_ciou']:.2f}{wrong}{use}) "
      f"over {result['num_examples']} examples"
    )


def _summed(metric: PromptedIoU) -> PromptedIoU:
  return common.sum_over_processes(metric.to_host())
