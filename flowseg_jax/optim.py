"""The optax chain: learning-rate schedule with warm-up, global-norm clipping, AdamW with a decay mask."""

from __future__ import annotations

import jax
import ml_collections
import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over `warmup_steps`, then constant / cosine / linear decay to `end_lr_factor`."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
  if cfg.learning_rate <= 0:
    raise ValueError(f"config.optim.learning_rate must be > 0, got {cfg.learning_rate}")
  warmup = int(cfg.warmup_steps)
  if warmup < 0 or warmup > total_steps:
    raise ValueError(
      f"config.optim.warmup_steps={warmup} must lie in [0, total_steps={total_steps}]"
    )
  lr = cfg.learning_rate
  decay_steps = max(total_steps - warmup, 1)
  end = lr * cfg.end_lr_factor
  if cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.end_lr_factor)
  else:
    main = optax.linear_schedule(lr, end, decay_steps)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(params):
  """Weight decay applies to Dense kernels only: norms, biases and embedding tables are spared."""

  def is_kernel(path, _):
    return any(getattr(k, "key", None) == "kernel" for k in path)

  return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(
  cfg: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """clip_by_global_norm(grad_clip_norm) -> AdamW(schedule, betas, eps, weight_decay on kernels)."""
  schedule = learning_rate_schedule(cfg, total_steps)
  chain = []
  if cfg.grad_clip_norm:
    if cfg.grad_clip_norm < 0:
      raise ValueError(f"config.optim.grad_clip_norm must be >= 0, got {cfg.grad_clip_norm}")
    chain.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
  chain.append(
    optax.adamw(
      schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
  )
  return optax.chain(*chain)


def applied_learning_rate(opt_state, schedule: optax.Schedule):
  """The learning rate the next applied update uses: the schedule at the optimiser's own count of
  applied updates (skipped steps do not advance it), not at the train step."""
  states = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
  counts = [s.count for s in states if isinstance(s, optax.ScaleByScheduleState)]
  if not counts:
    raise ValueError("the optimiser state holds no learning-rate schedule count")
  return schedule(counts[0])
