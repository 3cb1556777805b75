"""Tasks: what the shared trainer, sampler and evaluator do differently for each kind of segmentation.

`create_task(config)` is the only reader of `config.task`:
- 'semantic' (default): FlowSeg (`tasks/semantic.py`), mIoU.
- 'prompted': RLFSeg on PixNerd-T2I (`tasks/prompted.py`, text features in `tasks/prompts.py`),
  gIoU / cIoU.
Every task is a `base.Task`: the network and its call, each example's condition, the centroid
tables, the objective, the sampler settings, the evaluator. Inference uses tasks too, so nothing here
imports training code.
"""

from __future__ import annotations

import ml_collections

from flowseg_jax.tasks.base import Task, Vocabulary
from flowseg_jax.tasks.prompted import PromptedTask
from flowseg_jax.tasks.semantic import SemanticTask

TASKS = {"semantic": SemanticTask, "prompted": PromptedTask}


def create_task(config: ml_collections.ConfigDict, vocabulary: Vocabulary | None = None) -> Task:
  """The task `config.task` names, built from the config (network, tables, objective); its class
  names and prompts from `vocabulary` when given (a model folder's), else from config.input."""
  name = config.get("task", "semantic")
  if name not in TASKS:
    raise ValueError(f"config.task must be one of {tuple(TASKS)}, got {name!r}")
  return TASKS[name](config, vocabulary)
