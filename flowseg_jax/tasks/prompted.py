"""Prompted segmentation (RLFSeg on PixNerd-T2I): an image and a text prompt give a binary mask.

x1 is the binary mask drawn with `kronecker_centroids(2)` (background mu_0 = (-1, -1, -1),
foreground mu_1 = (1, 1, 1)); labels 0 / 1 / 255; the condition is the prompt: `batch['prompt']`
int32 (B,) ids into the task's prompt list. The network sees text features (B, T, Dt) of each
prompt, from
  'table': a learned (num_prompts, T, Dt) embedding table, one entry per prompt (the CPU demo: no
    language model, so only the prompts of the list: `condition_of` refuses any other),
  'cache': frozen Qwen3 last hidden states, encoded once per split into an on-disk cache
    (`flowseg cache-text`, `data.text_cache`) and streamed with the batch: each example's
    features arrive as `batch['text']` float32 (B, T, Dt); no table of the dataset's sentences is
    ever placed on a device (RefCOCO: ~142k sentences x 1 MiB), or
  'text': a small Qwen3 (`config.prompted.text`) over a word-level tokenizer built in code,
    trained with the denoiser (its weights are checkpointed with it).
A text model ('cache', 'text') segments any sentence at inference: `condition_of` passes the text
through and `encode` turns texts into features with the model's own encoder (the Segmenter caches
them); training never runs the 'cache' encoder.
Metrics gIoU / cIoU (`evaluators.refer_iou`). The flow is FlowSeg's with two centroids; this module
adds what RLFSeg adds, as pure jit-able functions. RLFSeg's paper gives no equations for either;
these are our definitions.
Label refinement (`refine_labels`): after `warmup_steps`, a training target pixel is replaced by
the model's own decoded prediction when all of these hold:
  1. it lies on an annotation boundary: within `boundary_width` pixels (Chebyshev distance) of a
     pixel of the other class (ignored pixels count as background for this test), where
     annotations are least reliable;
  2. the prediction is confident: the one-step prediction x1_hat = x0 + v(x0, t=0) of the EMA
     network (clean image in, no label information) has relative margin
     |d_0 - d_1| / (d_0 + d_1) >= `margin`, d_k = ||x1_hat - mu_k||^2;
  3. it is consistent: the EMA parameters average the recent training steps, so a prediction of
     theirs is one the model has held over many steps, not one step's fluctuation;
  4. the prediction differs from the annotation, which is not ignored (255 stays 255).
Off (`enabled=False`) the targets are the annotations.

Adaptive one-step sampling (`adaptive_one_step`): one network evaluation v = v(x0, t=0); instead
of the Euler step x1 = x0 + 1 * v, the step size dt is chosen per image as the least-squares fit
of the step's end point to the centroid grid:
  k*(p) = nearest centroid of x0(p) + dt * v(p)          (starting from dt = 1)
  dt    = sum_p <v(p), mu_k*(p) - x0(p)> / sum_p ||v(p)||^2,   clipped to [dt_min, dt_max]
iterated `iterations` times (assignment, then the closed-form fit: each iteration cannot increase
the mean squared distance to the assigned centroids before clipping), so a network that stops
short of (or overshoots) the centroids everywhere by a common factor is rescaled back onto them.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import models, sampling
from flowseg_jax.data import datasets
from flowseg_jax.evaluators import refer_iou
from flowseg_jax.models import pixnerd_t2i
from flowseg_jax.models.prompted import PromptedDenoiser
from flowseg_jax.tasks import base

CONDITIONS = ("table", "cache", "text")
TEXT_CONDITIONS = ("cache", "text")


def boundary_mask(labels: jax.Array, width: int) -> jax.Array:
  """bool (B, H, W): pixels within `width` pixels (Chebyshev) of a pixel of the other class.

  labels (B, H, W) int in {0, 1, 255}; 255 counts as background here. width 0: nothing.
  """
  if width <= 0:
    return jnp.zeros(labels.shape, bool)
  fg = (labels == 1).astype(jnp.float32)
  window = (1, 2 * width + 1, 2 * width + 1)
  pad = ((0, 0), (width, width), (width, width))
  hi = jax.lax.reduce_window(fg, -jnp.inf, jax.lax.max, window, (1, 1, 1), pad)
  lo = jax.lax.reduce_window(fg, jnp.inf, jax.lax.min, window, (1, 1, 1), pad)
  return hi != lo


def decode_with_margin(x1_hat: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(nearest centroid int32 (B, H, W), relative margin |d0 - d1| / (d0 + d1) in [0, 1]) for two
  centroids."""
  d = centroids_lib.squared_distances(x1_hat, centroids)  # (B, H, W, 2)
  decoded = jnp.argmin(d, axis=-1).astype(jnp.int32)
  margin = jnp.abs(d[..., 0] - d[..., 1]) / jnp.maximum(d[..., 0] + d[..., 1], 1e-12)
  return decoded, margin


def refine_labels(
  labels: jax.Array,
  x1_hat: jax.Array,
  centroids: jax.Array,
  step: jax.Array,
  *,
  warmup_steps: int,
  boundary_width: int,
  margin: float,
) -> tuple[jax.Array, jax.Array]:
  """Refined training targets (see the module docstring) and the number of pixels changed.

  Args:
    labels: int (B, H, W) in {0, 1, 255}.
    x1_hat: (B, H, W, 3) the EMA network's one-step prediction from the clean image.
    centroids: (2, 3).
    step: scalar int, the training step (no change before warmup_steps).
  Returns:
    (labels int32 (B, H, W), number of changed pixels int32 ()).
  """
  labels = labels.astype(jnp.int32)
  decoded, m = decode_with_margin(jax.lax.stop_gradient(x1_hat), centroids)
  change = (
    boundary_mask(labels, boundary_width)
    & (m >= margin)
    & (decoded != labels)
    & (labels != centroids_lib.IGNORE_LABEL)
    & (step >= warmup_steps)
  )
  return jnp.where(change, decoded, labels), jnp.sum(change.astype(jnp.int32))


def adaptive_one_step(
  x0: jax.Array,
  v: jax.Array,
  centroids: jax.Array,
  *,
  dt_min: float = 0.5,
  dt_max: float = 2.0,
  iterations: int = 2,
) -> tuple[jax.Array, jax.Array]:
  """(x1 = x0 + dt * v (B, H, W, 3), dt (B,)) with dt fitted per image (module docstring)."""
  x0 = x0.astype(jnp.float32)
  v = v.astype(jnp.float32)
  centroids = jnp.asarray(centroids, jnp.float32)
  dt = jnp.ones((x0.shape[0],), jnp.float32)
  vv = jnp.maximum(jnp.sum(v * v, axis=(1, 2, 3)), 1e-12)
  for _ in range(iterations):
    x1 = x0 + dt[:, None, None, None] * v
    k = jnp.argmin(centroids_lib.squared_distances(x1, centroids), axis=-1)
    mu = jnp.take(centroids, k, axis=0)
    dt = jnp.clip(jnp.sum(v * (mu - x0), axis=(1, 2, 3)) / vv, dt_min, dt_max)
  return x0 + dt[:, None, None, None] * v, dt


class PromptedTask(base.Task):
  """Text-prompted binary segmentation (see the module docstring)."""

  name = "prompted"
  best_metric = "giou"
  batch_keys = ("image", "label", "prompt")
  evaluator = refer_iou.ReferIouEvaluator
  num_classes = 2

  def __init__(self, config, vocabulary: base.Vocabulary | None = None):
    super().__init__(config, vocabulary)
    cfg = config.prompted
    if cfg.condition not in CONDITIONS:
      raise ValueError(
        f"config.prompted.condition must be one of {CONDITIONS}, got {cfg.condition!r}"
      )
    self.condition_kind = cfg.condition
    self._prompts = None if vocabulary is None else list(vocabulary.prompts)
    if self._prompts is None and cfg.condition != "cache":
      self._prompts = list(datasets.prompt_list(config.input) or [])
      if not self._prompts:
        raise ValueError("the prompted task needs its prompt list (config.input.prompted)")
    t2i = pixnerd_t2i.make_model(
      cfg.variant,
      **cfg.overrides.to_dict(),
      dtype=models.DTYPES[config.model.dtype],
      remat_policy=config.model.remat_policy,  # e.g. RefCOCO's 'full': the 1.2B model at 512²
      attention_impl=config.model.attention_impl,
    )
    depth = t2i.num_encoder_blocks + t2i.num_decoder_blocks + t2i.num_text_blocks
    t2i = t2i.clone(scan_blocks=models.resolve_scan_blocks(config.model.scan_blocks, depth))
    t2i.check_config()
    self._t2i = t2i
    # 'cache': a model folder's stored features of its prompt list (host memory; training reads
    # the streamed split caches instead and has none).
    self._features = None
    if cfg.condition == "cache" and vocabulary is not None:
      self._features = vocabulary.prompt_features
    self._encoder = None  # 'cache': the Qwen3 encoder, loaded when a new prompt needs it
    self.tokens = None  # 'text': (token ids, mask) int32 (num_prompts, T) of the prompt list
    text_encoder = None
    if cfg.condition == "text":
      text_encoder = self._builtin = self._builtin_encoder(t2i)
      self.tokens = self._text_encoder(None).tokenize(self.prompts)
    self.model = PromptedDenoiser(
      t2i, len(self.prompts) if cfg.condition == "table" else 0, text_encoder
    )
    self.centroids = jnp.asarray(centroids_lib.kronecker_centroids(2))

  def _builtin_encoder(self, t2i):
    from flowseg_jax.models import qwen3
    from flowseg_jax.tasks import prompts as prompts_lib  # the text stack only when used

    cfg = self.config.prompted.text
    self._tokenizer = prompts_lib.word_tokenizer(list(cfg.vocabulary))
    vocab_size = self._tokenizer.get_vocab_size()
    return qwen3.Qwen3Model(prompts_lib.builtin_encoder_config(cfg, vocab_size, t2i.text_dim))

  def _text_encoder(self, params):
    """`prompts.TextEncoder` of a text model: the own encoder over `params` ('text'; None: for
    tokenising only), or the Qwen3 of config.prompted.encoder_dir ('cache', loaded once)."""
    from flowseg_jax.tasks import prompts as prompts_lib

    t2i = self._t2i
    if self.condition_kind == "text":
      return prompts_lib.TextEncoder(
        self._tokenizer,
        self._builtin,
        None if params is None else params["text_encoder"],
        identity="builtin",
        pad_id=self._tokenizer.token_to_id(prompts_lib.WORD_PAD),
        max_length=t2i.text_length,
        embed_dim=t2i.text_dim,
      )
    if self._encoder is None:
      self._encoder = prompts_lib.TextEncoder.from_pretrained(
        self.config.prompted.encoder_dir, max_length=t2i.text_length, embed_dim=t2i.text_dim
      )
    return self._encoder

  @property
  def prompts(self) -> list[str]:
    """The prompt texts (index = prompt id): the vocabulary's, else the dataset's, read when first
    needed ('cache' training streams features by id and never needs the texts)."""
    if self._prompts is None:
      self._prompts = list(datasets.prompt_list(self.config.input) or [])
    return self._prompts

  @property
  def features(self):
    """'cache' model folders: the stored features of the prompt list (N, T, Dt), on the host."""
    return self._features

  def check_inputs(self, splits) -> None:
    """'cache': each split's feature cache is complete and was built by config.prompted.encoder_dir
    (when set) at the T2I model's (text_length, text_dim) (`data.text_cache.check_caches`)."""
    if self.condition_kind != "cache":
      return
    from flowseg_jax.data import text_cache
    from flowseg_jax.tasks import prompts as prompts_lib

    expect = {"max_length": self._t2i.text_length, "embed_dim": self._t2i.text_dim}
    if self.config.prompted.encoder_dir:
      expect["encoder"] = prompts_lib.encoder_identity(self.config.prompted.encoder_dir)
    text_cache.check_caches(self.config.input.get("text_features"), splits, expect)

  @property
  def encodes_text(self) -> bool:
    """Whether the model reads text features from its own encoder (any prompt at inference)."""
    return self.condition_kind in TEXT_CONDITIONS

  def condition_spec(self) -> tuple[tuple[int, ...], type]:
    """(shape, dtype) of one image's condition at inference: a text model's features (T, Dt)
    float32, else a prompt id."""
    if self.encodes_text:
      return (self.model.t2i.text_length, self.model.t2i.text_dim), np.float32
    return (), np.int32

  def encode(self, params, prompts) -> np.ndarray:
    """A text model's features of `prompts` (texts): float32 (N, T, Dt). 'cache' reads prompts
    of its list from the training features when they are loaded (the same numbers)."""
    if not self.encodes_text:
      raise ValueError("a learned-table model has no text encoder (condition='table')")
    prompts = list(prompts)
    if self._features is not None and all(p in self.prompts for p in prompts):
      return np.asarray(self._features)[[self.prompts.index(p) for p in prompts]]
    if self.condition_kind == "cache" and not self.config.prompted.encoder_dir:
      raise ValueError("encoding a prompt needs the Qwen3 encoder: set config.prompted.encoder_dir")
    features, _ = self._text_encoder(params)(prompts)
    return features

  @property
  def class_names(self) -> list[str]:
    """What a mask's labels mean: 0 outside the prompt's region, 1 inside."""
    if self._vocabulary is not None:
      return list(self._vocabulary.class_names)
    return ["background", "foreground"]

  def architecture(self) -> dict:
    return {**self.model.t2i.arch_config(), "num_prompts": self.model.num_prompts}

  def init_inputs(self, image_size):
    x, t, cond = super().init_inputs(image_size)
    if self.condition_kind == "text":  # the encoder's parameters are made from tokens
      ids, mask = self.tokens
      return x, t, (jnp.asarray(ids[:1]), jnp.asarray(mask[:1]))
    if self.condition_kind == "cache":  # features, without reading the prompt cache
      return x, t, jnp.zeros((1, *self.condition_spec()[0]), jnp.float32)
    return x, t, cond

  def prompt_id(self, prompt: str) -> int:
    """The id of a prompt text (exact match, then case/space-insensitive)."""
    if prompt in self.prompts:
      return self.prompts.index(prompt)
    norm = {" ".join(p.lower().split()): i for i, p in enumerate(self.prompts)}
    key = " ".join(prompt.lower().split())
    if key not in norm:
      shown = ", ".join(repr(p) for p in self.prompts[:8])
      raise ValueError(
        f"prompt {prompt!r} is not one this model knows ({len(self.prompts)} prompts: {shown}"
        f"{', ...' if len(self.prompts) > 8 else ''})"
      )
    return norm[key]

  def condition(self, batch):
    """'cache': the streamed features float32 (B, T, Dt); else the prompt ids int32 (B,)."""
    if self.condition_kind == "cache":
      if "text" not in batch:
        raise ValueError(
          "condition='cache' trains on streamed text features: set config.input.text_features "
          "to the folder `flowseg cache-text` built"
        )
      return batch["text"]
    return batch["prompt"]

  def condition_batch_spec(self, batch_size: int) -> dict:
    """{key: (shape, dtype)} of the condition a training batch carries (`condition`)."""
    if self.condition_kind == "cache":
      return {"text": ((batch_size, *self.condition_spec()[0]), np.float32)}
    return {"prompt": ((batch_size,), np.int32)}

  def pretrained_params(self, path: str):
    """The official PixNerd-T2I checkpoint's EMA weights."""
    from flowseg_jax.convert import pixnerd_t2i as t2i_convert  # torch-format code only when used

    t2i = self.model.t2i
    src_model, params = t2i_convert.load_torch_checkpoint(path, "ema", scan_blocks=t2i.scan_blocks)
    if src_model.arch_config() != t2i.arch_config():
      raise ValueError(
        f"config.model_init={path!r} holds architecture {src_model.arch_config()}, but "
        f"config.prompted builds {t2i.arch_config()}"
      )
    if self.condition_kind != "cache":
      raise ValueError(
        f"config.model_init with config.prompted.condition={self.condition_kind!r} would feed "
        "the pretrained model text features it was not trained on; use condition='cache'"
      )
    return {"t2i": params}

  def condition_of(self, prompt) -> int | str:
    """A learned-table model: the id of a text of its list, or an int id (any other text is
    refused in one line listing known ones). A text model: the prompt text itself (any sentence;
    an int id is its list's text), to be encoded (`encode`). None is an error."""
    if prompt is None:
      what = "any text" if self.encodes_text else "a text of its prompt list"
      raise ValueError(f"a prompted model needs a prompt ({what} or an id)")
    if isinstance(prompt, int | np.integer):
      if not 0 <= int(prompt) < len(self.prompts):
        raise ValueError(f"prompt id {prompt} not in [0, {len(self.prompts)})")
      return self.prompts[int(prompt)] if self.encodes_text else int(prompt)
    if not isinstance(prompt, str) or not prompt.strip():
      raise ValueError(f"a prompt must be a non-empty text or an int id, got {prompt!r}")
    return prompt if self.encodes_text else self.prompt_id(prompt)

  def apply(self, params, x, t, cond, **kw):
    """cond: int32 (B,) ids of the prompt list, or float (B, T, Dt) text features (a text model's
    `encode`)."""
    if kw:
      raise ValueError(f"the prompted task does not support {sorted(kw)} (e.g. REPA)")
    if jnp.issubdtype(jnp.result_type(cond), jnp.integer):
      if self.condition_kind == "cache":
        raise ValueError("condition='cache' takes text features (B, T, Dt), not prompt ids")
      if self.condition_kind == "text":
        ids, mask = (jnp.take(jnp.asarray(a), cond, axis=0) for a in self.tokens)
        cond = (ids, mask)
    return self.model.apply({"params": params}, x, t, cond)

  def train_targets(self, ema_params, images, labels, cond, step):
    """Label refinement (`refine_labels`) when `config.prompted.refine.enabled`: the EMA network's
    one-step prediction from the clean image replaces confident, differing boundary targets."""
    cfg = self.config.prompted.refine
    if not cfg.enabled:
      return labels, {}
    t0 = jnp.zeros((images.shape[0],), jnp.float32)
    out = self.apply(jax.lax.stop_gradient(ema_params), images, t0, cond)
    obj = self.objective
    v = sampling.velocity(out, images, t0, prediction=obj.prediction, t_eps=obj.t_eps)
    refined, changed = refine_labels(
      labels,
      images + v,
      self.centroids,
      step,
      warmup_steps=cfg.warmup_steps,
      boundary_width=cfg.boundary_width,
      margin=cfg.margin,
    )
    return refined, {"refined_pixels": changed}

  def sampler_options(self, num_steps=None, adaptive=None) -> sampling.SamplerOptions:
    """The base sampler, with the adaptive one-step rule when `adaptive` (default
    `config.prompted.adaptive.enabled`)."""
    options = super().sampler_options(num_steps)
    cfg = self.config.prompted.adaptive
    if not (bool(cfg.enabled) if adaptive is None else adaptive):
      return options
    rule = (float(cfg.dt_min), float(cfg.dt_max), int(cfg.iterations))
    return dataclasses.replace(options, adaptive=rule)

  def integrate(self, apply_fn, x0, options: sampling.SamplerOptions):
    if options.adaptive is None or options.num_steps != 1:
      return super().integrate(apply_fn, x0, options)
    t0 = jnp.zeros((x0.shape[0],), jnp.float32)
    v = sampling.velocity(
      apply_fn(x0, t0), x0, t0, prediction=options.prediction, t_eps=options.t_eps
    )
    dt_min, dt_max, iterations = options.adaptive
    return adaptive_one_step(
      x0, v, self.centroids, dt_min=dt_min, dt_max=dt_max, iterations=iterations
    )
