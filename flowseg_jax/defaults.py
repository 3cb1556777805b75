"""The base config every file in configs/ starts from: the paper's recipe with PixNerd XL/16.

Every hyper-parameter of the method is a field here, with the paper's (or PixNerd's) default; configs/*.py
change what their setting needs and the CLI overrides any leaf (`--config.objective.tau=2`).
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from flowseg_jax import models, sharding
from flowseg_jax.data import pipeline
from flowseg_jax.models import repa


def objective_config() -> ml_collections.ConfigDict:
  """`config.objective`: the arguments of `flow.flowseg_loss` and the training-time t distribution."""
  c = ml_collections.ConfigDict()
  c.prediction = "v"  # 'v' (velocity) or 'x' (clean mask) output
  c.tau = 1.0  # softmax temperature of the potential
  c.eps = 1e-6  # distance offset (the log transform's singularity scale)
  c.transform = "log"  # 'log' | 'sqrt' | 'linear'
  c.target = "static"  # 'static' v - grad Phi | 'annealing' v - t grad Phi
  c.reshape = True  # False: vanilla flow matching
  c.mask_ignored = True  # False: ignored pixels trained toward an extra centroid
  c.t_eps = 0.05  # clamp of 1 - t for 'x' prediction
  # Pixels per chunk of the potential's (pixels x classes) work; None: auto (cache-sized chunks on CPU,
  # all at once on GPU/TPU), 0: all at once. Changes the schedule, not the result.
  c.pixel_chunk = ml_collections.config_dict.placeholder(int)
  c.t_distribution = "logit_normal"  # 'uniform' | 'logit_normal'
  c.t_mean = 0.0
  c.t_std = 1.0
  c.t_shift = 1.0  # PixNerd's t / (t + (1 - t) shift)
  return c


def optim_config() -> ml_collections.ConfigDict:
  """`config.optim`: AdamW, schedule, clipping, EMA, gradient accumulation."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-4
  c.schedule = "constant"  # 'constant' | 'cosine' | 'linear' (after warm-up)
  c.warmup_steps = 0
  c.end_lr_factor = 0.0  # final lr / peak lr for cosine and linear
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0  # applied to Dense kernels only
  c.grad_clip_norm = 1.0  # global norm; 0 disables (the reshaped target needs it, DESIGN.md)
  c.ema_decay = 0.9999
  c.grad_accum_steps = 1  # micro-batches per step (the global batch is split, the loss stays exact)
  return c


def eval_config() -> ml_collections.ConfigDict:
  """`config.eval`: ODE sampling and scoring."""
  c = ml_collections.ConfigDict()
  c.num_steps = 10  # Euler steps (the paper's best)
  c.shift = 1.0  # time-grid shift
  c.method = "euler"  # 'euler' | 'heun'
  c.mode = "whole"  # 'whole' (resize to input.image_size) | 'slide' (windows on the original)
  c.slide_short_side = 512  # slide: resize the original so its short side is this
  c.slide_stride = (341, 341)  # slide: window stride; the window is input.image_size
  c.max_examples = -1  # -1: the whole eval split
  c.num_pictures = 4  # colourised predictions written per evaluation
  c.use_ema = True  # evaluate the EMA parameters
  # Windows per device per call. Fixed per device (not a global batch), so that an image's result does
  # not depend on the device count; batches are padded.
  c.batch_per_device = 2
  return c


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 160_000
  config.log_every_steps = 50
  config.ckpt_every_steps = 2_000
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  config.eval_every_steps = 10_000  # 0: never during training
  # Stop the run after this many consecutive updates skipped for non-finite loss or gradients
  # (checked at log steps); 0: never stop.
  config.max_consecutive_skipped = 100

  config.input = pipeline.default_input_config()
  config.input.dataset = "ade20k"
  config.input.image_size = (256, 256)
  config.input.batch_size = 64

  config.model = models.default_model_config("XL/16")
  # Conditioning label: -1 = PixNerd's null class (index num_classes), the unconditional branch.
  config.cond_label = -1
  # Converted PixNerd export (`flowseg convert pixnerd ... --out DIR`) to start from; '' = scratch.
  config.model_init = ""
  # Another run's workdir whose latest params/EMA start this run (stage 2 from stage 1); '' = none.
  config.init_from = ""

  config.objective = objective_config()
  config.repa = repa.get_config()
  config.optim = optim_config()
  config.eval = eval_config()

  # Device mesh ('data', 'fsdp'): data x fsdp = all devices, one of them -1 (fill). dcn_data > 1 runs
  # over that many TPU slices (or GPU hosts): 'data' spans them over the data-centre network,
  # 'fsdp' stays within a slice (sharding.device_grid).
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "dcn_data": 1})
  config.sharding_rules = [list(rule) for rule in sharding.DEFAULT_RULES]
  return config


def load_config_file(path: str | os.PathLike, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, as `flowseg train --config PATH:ARG` would load it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} does not exist")
  name = "flowseg_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)
