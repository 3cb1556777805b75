"""The project's jitted train step on one case, compiled ahead of time, with its own state."""

from __future__ import annotations

import contextlib
import time

import flax.linen as nn
import jax
import numpy as np

from benchmarks import flops, hardware
from flowseg_jax import sharding, train_state, train_step


class JaxTrainStep:
  """The project's jitted train step on one case, compiled ahead of time, with its own state."""

  def __init__(
    self, setup: train_step.TrainSetup, batch: dict[str, np.ndarray], *, mesh=None, count_flops=True
  ):
    self.setup = setup
    config = setup.config
    self.mesh = mesh or sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    self.rules = sharding.rules_from_config(config.sharding_rules)
    train_step.check_batch_fits_mesh(config, self.mesh)
    teacher = self.setup.teacher_params
    if teacher is not None:
      teacher = jax.device_put(teacher, sharding.replicated(self.mesh))
    self.teacher = teacher
    # create_train_state enters the mesh and the rules itself (unboxing must happen outside them).
    self.state, shardings = train_state.create_train_state(
      self.setup, self.mesh, self.rules, config.seed
    )
    self.batch = sharding.shard_batch(batch, self.mesh)
    with self.context():
      jitted = train_step.compile_train_step(self.setup, self.mesh, shardings)
      self.matmul_flops = (
        flops.jaxpr_matmul_flops(jitted, self.state, self.batch, teacher) if count_flops else None
      )
      start = time.perf_counter()
      self.compiled = jitted.lower(self.state, self.batch, teacher).compile()
      self.compile_s = time.perf_counter() - start
    self.memory = hardware.memory_summary(self.compiled)
    self.xla_flops = flops.xla_flops(self.compiled)
    self.metrics = None

  def context(self):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  def run(self, n: int) -> None:
    """n steps, blocking at the end (the device queue stays full in between)."""
    state, metrics = self.state, None
    for _ in range(n):
      state, metrics = self.compiled(state, self.batch, self.teacher)
    self.state, self.metrics = jax.block_until_ready((state, metrics))

  def last_loss(self) -> float | None:
    return None if self.metrics is None else float(jax.device_get(self.metrics["loss"]))
