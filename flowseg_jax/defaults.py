"""The base config every file in configs/ starts from: the paper's recipe with PixNerd XL/16.

Every hyper-parameter of the method is a field here; configs/*.py change what their setting needs and the
CLI overrides any leaf (`--config.objective.tau=2`). Each default says where it comes from:
  [paper]    FlowSeg (arXiv 2603.19218): its equations, its best ablation rows, its stated choices.
  [PixNerd]  PixNerd's released XL/16 recipe (reference/pixnerd_facts.md, pix256std1_repa_pixnerd_xl.yaml).
  [ours]     neither gives it (or the part of the paper we can read does not): our choice, with the reason.
  [-]        bookkeeping or scheduling that does not change the result.
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
  c.prediction = "v"  # [PixNerd] its output is a velocity; 'x' (clean mask) is Table 2's other row
  c.tau = 1.0  # [paper] softmax temperature of the potential (eq 9); the paper states tau = 1.0
  # [ours] distance offset of T(d) = -log(d + eps): the paper writes no value; 1e-6 keeps Phi finite at a
  # centroid while leaving the log's shape untouched for d >> 1e-6 (|grad Phi| <= 1/(2 sqrt(eps))).
  c.eps = 1e-6
  c.transform = "log"  # [paper] eq 9-11, Fig 5c's best; 'log' | 'sqrt' | 'linear' | 'norm_reduced'
  # [ours] 'norm_reduced' only: per-pixel bound on |grad Phi| (Fig 5c names the variant, does not define
  # it; flow.potential_grad has our definition). 1 = the scale of one channel of the FM velocity.
  c.max_grad_norm = 1.0
  c.target = "static"  # [paper] Table 2's best: 'static' v - grad Phi | 'annealing' v - t grad Phi
  c.reshape = True  # [paper] the method; False: vanilla flow matching (Table 2's baseline)
  c.mask_ignored = (
    True  # [paper] Table 2 "static + mask"; False: ignored pixels -> an extra centroid
  )
  # [ours: the official code's, tested] With the mask, the network input x_t at ignored pixels
  # still moves toward class 0's colour (ADE20K 'wall'); 'image' keeps them the image, 'centre'
  # moves them to the cube's centre. The paper does not discuss it. experiments/STUDY.md (3000
  # steps, 5 seeds): the three score within 0.4 mIoU of one another, no difference resolved, so the
  # official code's choice stays.
  c.ignored_input = "class0"
  # [ours] clamp of 1 - t in x-prediction's v = (x1_hat - x_t) / (1 - t): neither the paper nor PixNerd
  # (which predicts v) gives one; 0.05 bounds the 1 / (1 - t) amplification at 20x.
  c.t_eps = 0.05
  # Pixels per chunk of the potential's (pixels x classes) work; None: auto (cache-sized chunks on CPU,
  # all at once on GPU/TPU), 0: all at once. Changes the schedule, not the result.
  c.pixel_chunk = ml_collections.config_dict.placeholder(int)  # [-]
  c.t_distribution = "logit_normal"  # [PixNerd] lognorm_t; 'uniform' | 'logit_normal'
  c.t_mean = 0.0  # [PixNerd]
  c.t_std = 1.0  # [PixNerd]
  c.t_shift = 1.0  # [PixNerd] timeshift 1.0 (identity) of t / (t + (1 - t) shift)
  return c


def optim_config() -> ml_collections.ConfigDict:
  """`config.optim`: AdamW, schedule, clipping, EMA, gradient accumulation."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-4  # [PixNerd] AdamW lr
  c.schedule = (
    "constant"  # [PixNerd] no scheduler; 'constant' | 'cosine' | 'linear' (after warm-up)
  )
  c.warmup_steps = 0  # [PixNerd]
  c.end_lr_factor = 0.0  # [-] final lr / peak lr for cosine and linear (unused by 'constant')
  c.b1 = 0.9  # [PixNerd] torch defaults
  c.b2 = 0.999  # [PixNerd]
  c.eps = 1e-8  # [PixNerd]
  c.weight_decay = 0.0  # [PixNerd] (when set: Dense kernels only)
  # [ours] global-norm clipping; 0 disables. PixNerd configures none and the paper states none: the
  # reshaped target's early losses are ~20x vanilla FM's (DESIGN.md), and 1.0 trained stably at small
  # scale. experiments/STUDY.md's `clip` rows measure it.
  c.grad_clip_norm = 1.0
  c.ema_decay = 0.9999  # [PixNerd]
  c.grad_accum_steps = (
    1  # [-] micro-batches per step (the global batch is split, the loss stays exact)
  )
  return c


def eval_config() -> ml_collections.ConfigDict:
  """`config.eval`: ODE sampling and scoring."""
  c = ml_collections.ConfigDict()
  c.num_steps = 10  # [paper] Euler steps, Table 3's best
  c.shift = 1.0  # [PixNerd] time-grid shift (identity)
  c.method = "euler"  # [paper] Euler ODE; 'euler' | 'heun'
  c.mode = (
    "whole"  # [ours] 'whole' (resize to input.image_size) | 'slide' (windows on the original)
  )
  # [ours] slide: the window is input.image_size (the training size). The image is first resized so
  # its short side is slide_short_side (0: the window's short side) and windows step by
  # slide_stride (empty: 2/3 of the window); for a 512 model these are mmseg's ADE20K 512 and 341.
  c.slide_short_side = 0
  c.slide_stride = ()
  # [ours] test-time augmentation: 'none' | 'flip' (each window also mirrored left-right) | 'ms_flip'
  # (both mirrorings at each of tta_scales); the views' class probabilities (the potential's softmax)
  # are averaged before the argmax, as mmseg averages logits
  c.tta = "none"
  c.tta_scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # [mmseg] ADE20K's multi-scale test ratios
  c.max_examples = -1  # [-] -1: the whole eval split
  c.num_pictures = 4  # [-] colourised predictions written per evaluation
  c.use_ema = True  # [PixNerd] samples with the EMA weights
  # [ours] Windows per device per call. Fixed per device (not a global batch), so that an image's
  # result does not depend on the device count; batches are padded.
  c.batch_per_device = 2
  return c


def prompted_config() -> ml_collections.ConfigDict:
  """`config.prompted`: the prompted task's network, prompts, refinement and one-step sampling."""
  c = ml_collections.ConfigDict()
  c.variant = "tiny"  # [-] a name in models.pixnerd_t2i.VARIANTS ('tiny', 'released')
  c.overrides = ml_collections.ConfigDict()  # [-] PixNerd-T2I architecture fields to override
  # [ours] 'table' (learned per-prompt features: known prompts only) | 'cache' (frozen Qwen3
  # features, cached; any prompt at inference) | 'text' (a small Qwen3 over a word-level tokenizer,
  # trained with the denoiser: `text` below; any prompt at inference)
  c.condition = "table"
  # 'cache': Qwen3 Hugging Face directory (config.json + safetensors): builds the split caches of
  # config.input.text_features (`flowseg cache-text`) and encodes new prompts at inference
  c.encoder_dir = ""
  # [ours] 'text': the word vocabulary (`tasks.prompts.word_tokenizer`; other words read as [UNK])
  # and the encoder's shape (width: the T2I model's text_dim; tasks.prompts.builtin_encoder_config).
  c.text = ml_collections.ConfigDict(
    dict(
      vocabulary=ml_collections.FieldReference([], field_type=list),
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      head_dim=16,
      intermediate_size=64,
      rope_theta=10_000.0,
    )
  )
  # [ours] Label refinement (tasks/prompted.py refine_labels): RLFSeg names it without equations.
  c.refine = ml_collections.ConfigDict(
    dict(enabled=False, warmup_steps=500, boundary_width=1, margin=0.5)
  )
  # [ours] Adaptive one-step sampling (tasks/prompted.py adaptive_one_step), used when
  # eval.num_steps == 1.
  c.adaptive = ml_collections.ConfigDict(dict(enabled=False, dt_min=0.5, dt_max=2.0, iterations=2))
  # [-] Evaluation also scores every example with another example's prompt (`wrong_giou`): a model
  # that uses its prompt drops to near 0 there (evaluators/refer_iou.py wrong_prompts).
  c.eval_wrong_prompt = True
  return c


def get_base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # [-] 'semantic' (FlowSeg) | 'prompted' (RLFSeg, `config.prompted`); read by tasks.create_task only.
  config.task = "semantic"
  config.seed = 0  # [-]
  # [ours] 2 stages x 80k (configs/flowseg_ade20k.py): neither the paper text we have nor PixNerd (800k
  # ImageNet steps) gives FlowSeg's iteration count; 80k is mmseg's common ADE20K schedule.
  config.total_steps = 160_000
  config.log_every_steps = 50  # [-]
  config.ckpt_every_steps = 2_000  # [-]
  config.keep_checkpoints = 3  # [-]
  config.async_checkpointing = True  # [-]
  config.eval_every_steps = 10_000  # [-] 0: never during training
  # [ours] Stop the run after this many consecutive updates skipped for non-finite loss or gradients
  # (checked at log steps); 0: never stop.
  config.max_consecutive_skipped = 100

  config.input = pipeline.default_input_config()
  config.input.dataset = "ade20k"
  config.input.image_size = (256, 256)  # [paper] stage 1 at PixNerd's 256 (stage 2: 512)
  config.input.batch_size = 64  # [paper] global batch of stage 1

  # [ours: the paper says PixNerd] XL/16, the released class-conditional PixNerd checkpoint
  config.model = models.default_model_config("XL/16")
  # Conditioning label: -1 = PixNerd's null class (index num_classes), the unconditional branch.
  config.cond_label = -1  # [ours] segmentation is unconditional: PixNerd's null-class branch
  # Converted PixNerd export (`flowseg convert pixnerd ... --out DIR`) to start from; '' = scratch.
  config.model_init = ""
  # Another run's workdir whose latest params/EMA start this run (stage 2 from stage 1); '' = none.
  config.init_from = ""

  config.objective = objective_config()
  config.repa = repa.get_config()  # [PixNerd] REPA settings of its XL recipe (models/repa.py)
  config.optim = optim_config()
  config.eval = eval_config()
  config.prompted = prompted_config()  # used when config.task == 'prompted'

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


def parse_arg(arg: str | None, **known) -> dict:
  """A config file's `:ARG` as a dict: 'stage=2,smoke' -> {'stage': '2', 'smoke': True, ...}.

  `known` names every argument with its default; a value is converted to its default's type (a bare
  name sets a bool argument to True). An unknown name or a bad value is a ValueError naming it.
  """
  out = dict(known)
  for item in filter(None, (p.strip() for p in (arg or "").split(","))):
    key, eq, value = (s.strip() for s in item.partition("="))
    if key not in known:
      raise ValueError(f"unknown config argument {key!r} (known: {', '.join(sorted(known))})")
    default = known[key]
    if isinstance(default, bool):
      if eq and value.lower() not in ("true", "false"):
        raise ValueError(f"config argument {key} is true or false, got {value!r}")
      out[key] = not eq or value.lower() == "true"
    elif not eq:
      raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
    else:
      try:
        out[key] = value if default is None else type(default)(value)
      except ValueError:
        kind = {int: "an integer", float: "a number"}.get(type(default), type(default).__name__)
        raise ValueError(f"config argument {key}={value!r} is not {kind}") from None
  return out


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a run to a few seconds (tests, CI): 6 steps, a checkpoint every 3, one evaluation at the
  end with 2 Euler steps, batch 8. Configs add their data sizes."""
  config.total_steps = 6
  config.log_every_steps = 2
  config.ckpt_every_steps = 3
  config.eval_every_steps = 6
  config.input.batch_size = 8
  config.optim.warmup_steps = 2
  config.eval.num_steps = 2
  return config
