"""The one train-state pytree (arrays only, so it checkpoints and shards as a whole), and its creation:
abstract first, born sharded; fresh starts from config.init_from, config.model_init or random init."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from flowseg_jax import checkpointing, sharding

if TYPE_CHECKING:
  from flowseg_jax.step import Setup


class TrainState(flax.struct.PyTreeNode):
  """step () int32; params / ema_params {'denoiser': ..., ['projector': ...]} float32; opt_state (optax);
  rng: raw uint32 key data (typed keys do not checkpoint), folded with the step inside the train step;
  num_skipped () int32: updates skipped for non-finite loss or gradients."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  num_skipped: jax.Array


# ------------------------------------------------------------------------------------------------
# State creation: abstract first, born sharded.
# ------------------------------------------------------------------------------------------------


def _init_boxed_fn(setup: Setup):
  def init_boxed(rng):
    params = setup.init_params(rng)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=setup.tx.init(params),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
      num_skipped=jnp.zeros((), jnp.int32),
    )

  return init_boxed


def abstract_train_state(setup: Setup, mesh, rules, seed: int):
  """(abstract state as ShapeDtypeStructs carrying shardings, state shardings); allocates nothing."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(_init_boxed_fn(setup), jax.random.key(seed))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return abstract_with_shardings(nn.unbox(boxed), shardings), shardings


def create_train_state(setup: Setup, mesh, rules, seed: int):
  """(state, state_shardings): parameters initialised directly into their shardings."""
  _, shardings = abstract_train_state(setup, mesh, rules, seed)
  init_boxed = _init_boxed_fn(setup)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state = jax.jit(lambda r: nn.unbox(init_boxed(r)), out_shardings=shardings)(
      jax.random.key(seed)
    )
  sharding.assert_sufficiently_sharded(state.params, shardings.params, mesh)
  return state, shardings


def abstract_with_shardings(state, shardings):
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
  )


def load_pretrained_denoiser(setup: Setup, model_init: str):
  """PixNerd params from a converted export, re-laid-out for this model (scan or not). Prompted
  runs read the official PixNerd-T2I checkpoint itself (EMA weights)."""
  if setup.task.name == "prompted":
    return load_pretrained_t2i(setup, model_init)
  from flowseg_jax.convert import pixnerd as pixnerd_convert

  src_model, src_params = pixnerd_convert.load_converted(model_init)
  if src_model.arch_config() != setup.model.arch_config():
    raise ValueError(
      f"config.model_init={model_init!r} holds architecture {src_model.arch_config()}, but "
      f"config.model builds {setup.model.arch_config()}"
    )
  _, params = pixnerd_convert.relayout(src_params, src_model, scan_blocks=setup.model.scan_blocks)
  return params


def load_pretrained_t2i(setup: Setup, path: str):
  from flowseg_jax.convert import pixnerd_t2i as t2i_convert

  t2i = setup.model.t2i
  src_model, params = t2i_convert.load_torch_checkpoint(path, "ema", scan_blocks=t2i.scan_blocks)
  if src_model.arch_config() != t2i.arch_config():
    raise ValueError(
      f"config.model_init={path!r} holds architecture {src_model.arch_config()}, but "
      f"config.prompted builds {t2i.arch_config()}"
    )
  if setup.model.num_prompts:
    raise ValueError(
      "config.model_init with a learned prompt table (config.prompted.condition='table') would "
      "leave the table untrained against pretrained text features; use condition='cache'"
    )
  return {"t2i": params}


def load_pretrained_projector(setup: Setup, model_init: str, params):
  """The REPA projector stored in a converted PixNerd export, when REPA is on and asks for it."""
  if setup.projector is None or not setup.config.repa.init_projector:
    return None
  from flowseg_jax.convert import pixnerd as pixnerd_convert

  projector = pixnerd_convert.load_converted_projector(model_init)
  if projector is None:
    logging.info("%s holds no REPA projector: it starts from scratch.", model_init)
    return None
  want = jax.tree.map(lambda a: a.shape, params["projector"])
  got = jax.tree.map(lambda a: a.shape, projector)
  if want != got:
    raise ValueError(
      f"config.model_init={model_init!r} holds a REPA projector of shapes {got}, but config.repa "
      f"builds {want}; set config.repa.init_projector=False to start it from scratch"
    )
  logging.info("Initialised the REPA projector from %s.", model_init)
  return projector


def initialise(setup, mesh, rules, shardings):
  """A fresh state: config.init_from > config.model_init > random initialisation."""
  config = setup.config
  state, _ = create_train_state(setup, mesh, rules, config.seed)
  if config.init_from:
    abstract = abstract_with_shardings(state, shardings)
    params, ema, step = checkpointing.restore_params_from(config.init_from, abstract)
    logging.info("Initialised params/EMA from %s step %d.", config.init_from, step)
    return state.replace(params=params, ema_params=ema), f"init_from:{step}"
  if config.model_init:
    denoiser = load_pretrained_denoiser(setup, config.model_init)
    placed = jax.device_put(denoiser, shardings.params["denoiser"])
    params = {**state.params, "denoiser": placed}
    # A separate copy: params and EMA are donated to the train step as distinct buffers.
    ema = {
      **state.ema_params,
      "denoiser": jax.device_put(denoiser, shardings.ema_params["denoiser"]),
    }
    logging.info("Initialised the denoiser from %s.", config.model_init)
    projector = load_pretrained_projector(setup, config.model_init, state.params)
    if projector is not None:
      params["projector"] = jax.device_put(projector, shardings.params["projector"])
      ema["projector"] = jax.device_put(projector, shardings.ema_params["projector"])
    return state.replace(params=params, ema_params=ema), "model_init"
  return state, "scratch"
