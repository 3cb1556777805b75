"""Evaluation: a Segmenter on its config's eval split, scored by its task's evaluator.

The task picks the evaluator (`evaluators/`: mIoU for semantic, gIoU / cIoU for prompted). Training
writes `eval/step_<k>.json` (and, semantic, `pictures/step_<k>/`); `flowseg evaluate` writes under a
name keyed by its settings (`eval/step_<k>_steps<n>_<mode>.json`, prompted
`eval/step_<k>_steps<n>[_adaptive].json`), so it never overwrites training's results. This module
imports no training code.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from absl import logging

from flowseg_jax import inference


def score(segmenter: inference.Segmenter, **settings) -> tuple[dict, Any]:
  """Scores `segmenter` on its config's eval split and writes nothing: (metrics, the task's
  evaluator, which keeps what it collected, e.g. the semantic evaluator's `pictures`).

  settings: num_steps, mode, adaptive (default: the config's).
  """
  evaluator = segmenter.task.evaluator(segmenter)
  return evaluator.run(evaluator.settings(**settings)), evaluator


def evaluate_segmenter(
  segmenter: inference.Segmenter,
  workdir: str,
  *,
  step: int,
  name: str | None = None,
  writer=None,
  what: str = "evaluate",
  **settings,
) -> dict:
  """Scores `segmenter` and files the result; returns the metrics with 'step', 'path' and the
  one-line 'summary'.

  name: the result's name (default: keyed by step and settings); writer: a metric writer for the
  scalars (and pictures); settings: num_steps, mode, adaptive (default: the config's).
  """
  segmenter.task.check_inputs([segmenter.config.input.eval_split])  # e.g. its text features
  evaluator = segmenter.task.evaluator(segmenter)
  resolved = evaluator.settings(**settings)
  result = evaluator.run(resolved)
  name = name or evaluator.output_name(step, resolved)
  path = evaluator.write(workdir, name, step, result, resolved, writer)
  logging.info("%s step %d: %s", what, step, evaluator.log_line(result))
  return {**result, "step": step, "path": path, "summary": evaluator.summary(result)}


def evaluate_params(config, task, params, mesh, *, workdir: str, step: int, writer=None) -> dict:
  """Training's evaluation of network params: eval/step_<k>.json and the writer's scalars."""
  segmenter = inference.Segmenter(config, params, task=task, mesh=mesh, step=step)
  return evaluate_segmenter(
    segmenter, workdir, step=step, name=f"step_{step}", writer=writer, what="eval"
  )


def evaluate(
  config: ml_collections.ConfigDict | None,
  workdir: str,
  *,
  step: int | None = None,
  segmenter: inference.Segmenter | None = None,
) -> dict:
  """`flowseg evaluate`: the newest readable checkpoint of workdir (or `step`) on the eval split.

  config defaults to workdir/config.json. The returned dict holds the metrics and the result's
  'path'.
  """
  seg = segmenter or inference.Segmenter.from_workdir(workdir, config, step=step)
  result = evaluate_segmenter(seg, workdir, step=seg.step)
  if result["path"]:
    logging.info("Wrote %s.", result["path"])
  return result
