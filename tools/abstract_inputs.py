"""The inputs of the train step, the sampler and the scorer as `ShapeDtypeStruct`s with shardings:
nothing allocated.

What the planner (scale.py) compiles and the exports (export.py) lower, for any mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flowseg_jax import models, scoring, sharding, train_state, train_step
from flowseg_jax.models import dinov2


def abstract_teacher(config):
  """(DinoViT, params as ShapeDtypeStructs) of `config.repa.teacher_variant`: no weights."""
  teacher = dinov2.make_model(
    config.repa.teacher_variant, dtype=models.DTYPES[config.repa.teacher_dtype]
  )
  return teacher, dinov2.abstract_params(teacher)


def train_step_inputs(config, mesh, rules):
  """(setup, abstract state, shardings, batch, teacher params): ShapeDtypeStructs, nothing allocated."""
  teacher = abstract_teacher(config) if config.repa.enabled else None
  setup = train_step.TrainSetup(config, teacher=teacher)
  state, shardings = train_state.abstract_train_state(setup, mesh, rules, config.seed)
  data = sharding.batch_sharding(mesh)
  b, (h, w) = config.input.batch_size, tuple(config.input.image_size)
  batch = {
    "image": jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=data),  # as the pipeline's
    "label": jax.ShapeDtypeStruct((b, h, w), jnp.int32, sharding=data),
    "image_hw": jax.ShapeDtypeStruct((b, 2), jnp.int32, sharding=data),
  }
  for key, (shape, dtype) in setup.task.condition_batch_spec(b).items():  # ids or text features
    batch[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=data)
  teacher_params = None
  if teacher is not None:
    repl = sharding.replicated(mesh)
    teacher_params = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), teacher[1]
    )
  return setup, state, shardings, batch, teacher_params


def sampler_inputs(config, mesh, task) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """(images float32 (B, H, W, 3), conditions (B, *task.condition_spec()): ids or a text model's
  features) of one sampler call: `config.eval.batch_per_device` images per device, what
  evaluation and `Segmenter` run per call."""
  b = config.eval.batch_per_device * mesh.size
  h, w = tuple(config.input.image_size)
  data = sharding.batch_sharding(mesh)
  images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=data)
  shape, dtype = task.condition_spec()
  return images, jax.ShapeDtypeStruct((b, *shape), dtype, sharding=data)


def scorer_inputs(mesh, num_views: int) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
  """(colours float32 (V, P, 3), labels int32 (P,)) of one full scorer call
  (`scoring.score_fn`): `scoring.MAX_PIXELS_PER_DEVICE` pixels per device."""
  p = scoring.MAX_PIXELS_PER_DEVICE * mesh.size
  spec = sharding.BATCH_AXES
  colours = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, spec))
  labels = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec))
  return (
    jax.ShapeDtypeStruct((num_views, p, 3), jnp.float32, sharding=colours),
    jax.ShapeDtypeStruct((p,), jnp.int32, sharding=labels),
  )
