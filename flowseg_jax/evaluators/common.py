"""What every evaluator shares: this process's share of the eval split, the sum over processes,
`eval/<name>.json`, and the `Evaluator` interface `evaluate.py` drives.

An evaluator scores one Segmenter on its config's eval split. Multi-process: every process scores its
own examples; the sums are agreed over processes and process 0 writes the files.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flowseg_jax import storage
from flowseg_jax.data import datasets, pipeline
from flowseg_jax.run import files


def local_examples(config) -> tuple[Any, Iterator[dict], int]:
  """(eval dataset, iterator over this process's examples, their number); `config.eval.max_examples`
  (>= 0) caps the whole split."""
  dataset = pipeline.create_eval_dataset(config.input)
  total = datasets.num_eval_examples(config.input)
  limit = config.eval.max_examples
  if limit is not None and limit >= 0:
    total = min(total, limit)
  num_local = min(len(dataset), -(-total // jax.process_count()))
  examples = (ex for _, ex in zip(range(num_local), dataset, strict=False))
  return dataset, examples, num_local


def sum_over_processes(tree):
  """The elementwise sum of a pytree of host arrays over all processes (itself on one process)."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(lambda a: np.asarray(multihost_utils.process_allgather(a)).sum(axis=0), tree)


def write_json(workdir: str, name: str, summary: dict) -> str:
  """eval/<name>.json (process 0; other processes write nothing and get '')."""
  if jax.process_index() != 0:
    return ""
  out_dir = storage.path(workdir) / files.EVAL_DIR
  out_dir.mkdir(parents=True, exist_ok=True)
  path = storage.join(workdir, files.EVAL_DIR, f"{name}.json")
  storage.path(path).write_text(json.dumps(summary, indent=2))
  return path


class Evaluator(abc.ABC):
  """Scores `segmenter` (its config, task and parameters) on the eval split.

  `settings` resolves the sampler settings of one evaluation (config defaults overridden by the
  arguments); `run` scores; `write` files the result under a name (`output_name` keys it by step and
  settings, so `flowseg evaluate` never overwrites training's `step_<k>`).
  """

  def __init__(self, segmenter):
    self.segmenter = segmenter
    self.config = segmenter.config

  @abc.abstractmethod
  def settings(self, *, num_steps=None, mode=None, adaptive=None) -> dict:
    """The settings this evaluation runs with, as they go into its JSON."""

  @abc.abstractmethod
  def output_name(self, step: int, settings: dict) -> str:
    """The name `flowseg evaluate` files a result under."""

  @abc.abstractmethod
  def run(self, settings: dict) -> dict:
    """The metrics over the eval split (summed over processes)."""

  @abc.abstractmethod
  def write(self, workdir: str, name: str, step: int, result: dict, settings: dict, writer=None):
    """eval/<name>.json (and what else the evaluator keeps); returns the JSON's path."""

  @abc.abstractmethod
  def summary(self, result: dict) -> str:
    """The headline numbers in one line (the CLI prints it)."""

  @abc.abstractmethod
  def log_line(self, result: dict) -> str:
    """What the log says of a result."""
