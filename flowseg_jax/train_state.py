"""The one train-state pytree (arrays only, so it checkpoints and shards as a whole), and its creation:
abstract first, born sharded; fresh starts from config.init_from, config.model_init or random init."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from flowseg_jax import checkpointing, sharding, storage
from flowseg_jax.run import files
from flowseg_jax.train_step import TrainSetup


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


def _init_boxed_fn(setup: TrainSetup):
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


def abstract_train_state(setup: TrainSetup, mesh, rules, seed: int):
  """(abstract state as ShapeDtypeStructs carrying shardings, state shardings); allocates nothing."""
  # The key is made inside eval_shape too: nothing runs on any device, so the mesh may hold
  # compile-only devices (a TPU topology or GPU target on a CPU machine, tools/scale.py). An eager
  # key made under set_mesh would be placed on the mesh, i.e. executed on those devices.
  init_boxed = _init_boxed_fn(setup)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    boxed = jax.eval_shape(lambda: init_boxed(jax.random.key(seed)))
    shardings = sharding.logical_shardings(boxed, mesh, rules)
  return abstract_with_shardings(nn.unbox(boxed), shardings), shardings


def create_train_state(setup: TrainSetup, mesh, rules, seed: int):
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


def load_pretrained_denoiser(setup: TrainSetup, model_init: str):
  """The network's parameters from `config.model_init`, as the task reads them (a converted PixNerd
  export re-laid-out for this model; the official PixNerd-T2I checkpoint's EMA weights)."""
  return setup.task.pretrained_params(model_init)


def load_pretrained_projector(setup: TrainSetup, model_init: str, params):
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
    # Placed from this process's copy (no cross-host transfer); params and EMA are separate
    # copies because the train step donates them as distinct buffers.
    place = sharding.place_host_tree
    params = {**state.params, "denoiser": place(denoiser, shardings.params["denoiser"])}
    ema = {**state.ema_params, "denoiser": place(denoiser, shardings.ema_params["denoiser"])}
    logging.info("Initialised the denoiser from %s.", config.model_init)
    projector = load_pretrained_projector(setup, config.model_init, state.params)
    if projector is not None:
      params["projector"] = place(projector, shardings.params["projector"])
      ema["projector"] = place(projector, shardings.ema_params["projector"])
    return state.replace(params=params, ema_params=ema), "model_init"
  return state, "scratch"


def restore_train_state(config: ml_collections.ConfigDict, workdir: str):
  """(setup, mesh, state, step) of the newest readable checkpoint of workdir: the whole TrainState
  (online and EMA parameters, optimiser), e.g. to compare runs. Inference uses `Segmenter`."""
  setup = TrainSetup(config)
  mesh = sharding.mesh_from_config(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  abstract, _ = abstract_train_state(setup, mesh, rules, config.seed)
  manager = checkpointing.create_manager(
    storage.path(workdir) / files.CHECKPOINTS_DIR, keep=config.keep_checkpoints, async_save=False
  )
  restored = checkpointing.restore_latest(manager, abstract, None)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/{files.CHECKPOINTS_DIR} holds no readable checkpoint")
  state, step = restored
  return setup, mesh, state, step
