"""The FlowSeg objective: rectified flow from image (t=0) to colour mask (t=1) with a reshaped target.

Semantics (shared/DESIGN.md, "The objective"):
  x1 = mu[label],  x_t = (1 - t) x0 + t x1,  v = x1 - x0.
  'v' prediction: v_theta = out, x1_hat = x_t + (1 - t) v_theta.
  'x' prediction: x1_hat = out, v_theta = (x1_hat - x_t) / max(1 - t, t_eps).
  Phi = -log softmax(T(||sg[x1_hat] - mu_k||^2) / tau)[label];  grad Phi by jax.grad, stop-gradient.
  transform 'norm_reduced' (Fig 5c's "potential gradient norm reduction", our definition): the log
  potential's grad Phi with its per-pixel norm reduced to at most `max_grad_norm` (direction kept).
  target: static v - grad Phi | annealing v - t grad Phi | vanilla (reshape=False) v.
  loss = sum over valid pixels and channels of (v_theta - sg[target])^2 / (3 * #valid), 0 if none valid.

All math runs in float32 (float64 if the inputs are float64), whatever the network's output dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from flowseg_jax import centroids as centroids_lib
from flowseg_jax.potential import (
  TRANSFORMS,
  Transform,
  check_choice,
  compute_dtype,
  potential_grad,
)

Prediction = Literal["v", "x"]
Target = Literal["static", "annealing"]
PREDICTIONS = ("v", "x")
TARGETS = ("static", "annealing")
T_DISTRIBUTIONS = ("uniform", "logit_normal")
IGNORED_INPUTS = ("class0", "image", "centre")


_T_SAMPLING = ("t_distribution", "t_mean", "t_std", "t_shift")  # Objective fields of sample_t


@dataclasses.dataclass(frozen=True)
class Objective:
  """The objective's options (`flowseg_loss`'s keywords) and the training-time t distribution,
  checked once: built from a config's `objective` section by `from_config`.

  prediction: 'v' (out is a velocity) or 'x' (out is the clean mask x1_hat).
  tau, eps, transform: the potential's temperature, distance offset and distance transform
    ('log' | 'sqrt' | 'linear' | 'norm_reduced', see `potential_grad`).
  target: 'static' (v - grad Phi) or 'annealing' (v - t grad Phi); ignored when reshape is False.
  mask_ignored: drop ignored pixels from the loss; otherwise train them toward the last centroid.
  ignored_input: with mask_ignored, what ignored pixels of the network input x_t move toward (their
    loss is masked either way): 'class0' (mu_0, as the official code does), 'image' (x1 = x0: they
    stay the image) or 'centre' (x1 = 0, the colour cube's centre, equally far from every class).
  t_eps: clamp of 1 - t in the 'x' prediction's velocity.
  reshape: False gives vanilla flow matching (target v).
  max_grad_norm: the per-pixel bound on |grad Phi| of transform='norm_reduced' (unused otherwise).
  pixel_chunk: pixels per chunk of the potential's (pixels x classes) work: 0 all at once, None auto
    (`resolve_pixel_chunk`: cache-sized chunks on CPU, none on accelerators). Scheduling only.
  t_distribution, t_mean, t_std, t_shift: `sample_t`'s distribution of training times.
  """

  prediction: Prediction = "v"
  tau: float = 1.0
  eps: float = 1e-6
  transform: Transform = "log"
  target: Target = "static"
  mask_ignored: bool = True
  ignored_input: str = "class0"
  t_eps: float = 0.05
  reshape: bool = True
  max_grad_norm: float = 1.0
  # How JAX schedules the potential's work (no effect on the result beyond float rounding).
  pixel_chunk: int | None = None
  t_distribution: str = "logit_normal"
  t_mean: float = 0.0
  t_std: float = 1.0
  t_shift: float = 1.0

  def __post_init__(self):
    check_choice("prediction", self.prediction, PREDICTIONS)
    check_choice("transform", self.transform, TRANSFORMS)
    check_choice("target", self.target, TARGETS)
    check_choice("t_distribution", self.t_distribution, T_DISTRIBUTIONS)
    check_choice("ignored_input", self.ignored_input, IGNORED_INPUTS)
    if self.ignored_input != "class0" and not self.mask_ignored:
      raise ValueError(
        f"ignored_input={self.ignored_input!r} needs mask_ignored=True (without the mask, ignored "
        "pixels are trained toward their own centroid)"
      )
    for name, ok, rule in (
      ("tau", self.tau > 0, "> 0"),
      ("eps", self.eps >= 0, ">= 0"),
      ("t_eps", self.t_eps > 0, "> 0"),
      ("t_std", self.t_std > 0, "> 0"),
      ("t_shift", self.t_shift > 0, "> 0"),
      ("max_grad_norm", self.max_grad_norm > 0 or self.transform != "norm_reduced", "> 0"),
    ):
      if not ok:
        raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")

  @classmethod
  def from_config(cls, cfg) -> Objective:
    """From `config.objective`; a bad value is a ValueError naming `config.objective.FIELD`."""
    try:
      return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})
    except ValueError as e:
      raise ValueError(f"config.objective.{e}") from None

  def loss_options(self) -> dict:
    """`flowseg_loss`'s keyword arguments."""
    return {
      f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _T_SAMPLING
    }

  def reference_options(self) -> dict:
    """What the objective computes, without how JAX schedules it (`pixel_chunk`): the keywords a
    reference implementation takes. The official code has only ignored_input='class0'."""
    if self.ignored_input != "class0":
      raise ValueError(f"the reference has no ignored_input={self.ignored_input!r}")
    skip = ("pixel_chunk", "ignored_input")
    return {k: v for k, v in self.loss_options().items() if k not in skip}

  def sample_t(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Training times from this objective's distribution."""
    return sample_t(
      key,
      shape,
      distribution=self.t_distribution,
      mean=self.t_mean,
      std=self.t_std,
      shift=self.t_shift,
    )


def _check_shapes(out, x0, labels, t, centroids) -> None:
  if out.ndim != 4 or out.shape[-1] != 3:
    raise ValueError(f"flowseg_loss: out must be (B, H, W, 3), got shape {out.shape}")
  if x0.shape != out.shape:
    raise ValueError(f"flowseg_loss: x0 shape {x0.shape} != out shape {out.shape}")
  if labels.shape != out.shape[:-1]:
    raise ValueError(
      f"flowseg_loss: labels must be (B, H, W) = {out.shape[:-1]}, got {labels.shape}"
    )
  if t.shape != out.shape[:1]:
    raise ValueError(f"flowseg_loss: t must be (B,) = {out.shape[:1]}, got {t.shape}")
  if centroids.ndim != 2 or centroids.shape[-1] != 3 or centroids.shape[0] < 2:
    raise ValueError(f"flowseg_loss: centroids must be (N >= 2, 3), got {centroids.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"flowseg_loss: labels must be integers, got dtype {labels.dtype}")


def _train_labels(labels: jax.Array, num_table: int, mask_ignored: bool):
  """(valid mask, centroid index each pixel is trained toward, out-of-range mask) for int32 labels."""
  num_classes = num_table if mask_ignored else num_table - 1
  ignored = labels == centroids_lib.IGNORE_LABEL
  bad = ~ignored & ((labels < 0) | (labels >= num_classes))
  if mask_ignored:
    valid = ~ignored & ~bad
    return valid, jnp.where(valid, labels, 0), bad
  train_labels = jnp.where(ignored, num_table - 1, jnp.where(bad, 0, labels))
  return ~bad, train_labels, bad


def _flow_end(x0, labels, train_labels, centroids, ignored_input: str) -> jax.Array:
  """x1 of every pixel: its centroid; ignored pixels (masked from the loss) per `ignored_input`."""
  x1 = jnp.take(centroids, train_labels, axis=0)
  if ignored_input == "class0":
    return x1
  ignored = (labels == centroids_lib.IGNORE_LABEL)[..., None]
  return jnp.where(ignored, x0 if ignored_input == "image" else jnp.zeros_like(x1), x1)


def interpolant(
  x0: jax.Array,
  labels: jax.Array,
  t: jax.Array,
  centroids: jax.Array,
  *,
  mask_ignored: bool = True,
  ignored_input: str = "class0",
) -> jax.Array:
  """The network input x_t = (1 - t) x0 + t x1: (B, H, W, 3), (B, H, W), (B,) -> (B, H, W, 3).

  x1 is as in `flowseg_loss`: each pixel's centroid; ignored pixels go to centroid 0 with
  mask_ignored (or per `ignored_input`), to the last centroid without. In float32.
  """
  dtype = compute_dtype(x0, centroids, t)
  centroids = jnp.asarray(centroids, dtype)
  labels = jnp.asarray(labels).astype(jnp.int32)
  _, train_labels, _ = _train_labels(labels, centroids.shape[0], mask_ignored)
  x0 = jnp.asarray(x0, dtype)
  x1 = _flow_end(x0, labels, train_labels, centroids, ignored_input)
  tb = jnp.asarray(t, dtype)[:, None, None, None]
  return (1 - tb) * x0 + tb * x1


def flow_terms(
  out: jax.Array,
  x0: jax.Array,
  labels: jax.Array,
  t: jax.Array,
  centroids: jax.Array,
  objective: Objective | None = None,
) -> dict[str, jax.Array]:
  """Everything the loss is made of (arguments as `flowseg_loss`, the options as an `Objective`;
  None: the defaults), in the compute dtype.

  Returns a dict with `v_theta`, `x1_hat`, `v` (vanilla target), `v_target` (reshaped target, constant),
  `grad_phi` (B, H, W, 3; zeros when reshape is False); `valid` bool and `train_labels` int32 (B, H, W) (the centroid index each pixel is
  trained toward); `num_bad_labels` (labels outside the valid range, masked out).
  """
  obj = Objective() if objective is None else objective
  out, x0, labels, t, centroids = map(jnp.asarray, (out, x0, labels, t, centroids))
  _check_shapes(out, x0, labels, t, centroids)
  num_table = centroids.shape[0]
  num_classes = num_table if obj.mask_ignored else num_table - 1
  centroids_lib.check_labels(labels, num_classes)

  dtype = compute_dtype(out, x0, centroids, t)
  out, x0, t, centroids = (a.astype(dtype) for a in (out, x0, t, centroids))
  labels = labels.astype(jnp.int32)

  valid, train_labels, bad = _train_labels(labels, num_table, obj.mask_ignored)
  x1 = _flow_end(x0, labels, train_labels, centroids, obj.ignored_input)
  tb = t[:, None, None, None]
  x_t = (1 - tb) * x0 + tb * x1
  v = x1 - x0
  if obj.prediction == "v":
    v_theta = out
    x1_hat = x_t + (1 - tb) * v_theta
  else:
    x1_hat = out
    v_theta = (x1_hat - x_t) / jnp.maximum(1 - tb, obj.t_eps)

  if obj.reshape:
    grad_phi = potential_grad(
      jax.lax.stop_gradient(x1_hat),
      train_labels,
      centroids,
      tau=obj.tau,
      eps=obj.eps,
      transform=obj.transform,
      pixel_chunk=obj.pixel_chunk,
      max_grad_norm=obj.max_grad_norm,
    )
  else:  # vanilla flow matching never evaluates the potential
    grad_phi = jnp.zeros_like(x1_hat)
  if not obj.reshape:
    v_target = v
  elif obj.target == "static":
    v_target = v - grad_phi
  else:
    v_target = v - tb * grad_phi
  return {
    "v_theta": v_theta,
    "x1_hat": x1_hat,
    "v": jax.lax.stop_gradient(v),
    "v_target": jax.lax.stop_gradient(v_target),
    "grad_phi": grad_phi,
    "valid": valid,
    "train_labels": train_labels,
    "num_bad_labels": jnp.sum(bad.astype(jnp.int32)),
  }


def flowseg_loss(
  out: jax.Array,
  x0: jax.Array,
  labels: jax.Array,
  t: jax.Array,
  centroids: jax.Array,
  **options,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The FlowSeg training loss and what a training loop logs.

  Args:
    out: network output (B, H, W, 3), any float dtype (upcast to float32).
    x0: images (B, H, W, 3) in [-1, 1] (the flow's t=0 end).
    labels: int (B, H, W); 255 = ignore. Valid values are [0, N) with mask_ignored, [0, N-1) without it
      (then row N-1 of `centroids` is the ignore colour, see `centroids.class_centroids`).
    t: (B,) times in [0, 1].
    centroids: (N, 3) class colours.
    **options: the objective's keywords, `Objective`'s fields (prediction, tau, eps, transform,
      target, mask_ignored, ignored_input, t_eps, reshape, max_grad_norm, pixel_chunk); the rest
      take its defaults.

  Returns:
    (loss, aux): scalar loss; aux has `fm_loss` (vanilla FM loss on the same batch), `grad_phi_norm` (mean
    ||grad Phi|| over valid pixels; 0 for vanilla FM, which does not evaluate the potential), `decode_accuracy` (fraction of valid pixels whose x1_hat already decodes
    to the right class), `num_valid` (valid pixels) and `num_bad_labels` (labels outside the valid range that
    were masked out; only possible under jit, where they cannot raise).
  """
  objective = Objective(**options)
  terms = flow_terms(out, x0, labels, t, centroids, objective)
  v_theta, valid = terms["v_theta"], terms["valid"]
  dtype = v_theta.dtype
  weight = valid[..., None].astype(dtype)
  num_valid = jnp.sum(valid.astype(jnp.int32))
  pixels = jnp.maximum(num_valid, 1).astype(dtype)

  def masked_mse(target_v):
    return jnp.sum(weight * jnp.square(v_theta - target_v)) / (3 * pixels)

  centroids = jnp.asarray(centroids, dtype)
  x1_hat = jax.lax.stop_gradient(terms["x1_hat"])
  # The running-minimum decoder, not an argmin over (pixels x classes) distances: the same labels,
  # without the (B, H, W, N) array (45 ms of the S/16 128² b4 CPU step at 150 classes).
  decoded = centroids_lib.decode_colours(x1_hat, centroids)
  valid_f = valid.astype(dtype)
  aux = {
    "fm_loss": jax.lax.stop_gradient(masked_mse(terms["v"])),
    "grad_phi_norm": jnp.sum(jnp.linalg.norm(terms["grad_phi"], axis=-1) * valid_f) / pixels,
    "decode_accuracy": jnp.sum((decoded == terms["train_labels"]) * valid_f) / pixels,
    "num_valid": num_valid,
    "num_bad_labels": terms["num_bad_labels"],
  }
  return masked_mse(terms["v_target"]), aux


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """PixNerd's time shift t -> t / (t + (1 - t) * shift); identity at shift = 1, >1 favours small t."""
  if shift <= 0:
    raise ValueError(f"time shift must be > 0, got {shift}")
  return t / (t + (1.0 - t) * shift)


def sample_t(
  key: jax.Array,
  shape: tuple[int, ...],
  *,
  distribution: str = "logit_normal",
  mean: float = 0.0,
  std: float = 1.0,
  shift: float = 1.0,
  dtype=jnp.float32,
) -> jax.Array:
  """Training times: uniform on [0, 1) or logit-normal sigmoid(N(mean, std)), then optionally shifted."""
  check_choice("t distribution", distribution, T_DISTRIBUTIONS)
  if distribution == "uniform":
    t = jax.random.uniform(key, shape, dtype)
  else:
    if std <= 0:
      raise ValueError(f"logit-normal std must be > 0, got {std}")
    t = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, dtype))
  return t if shift == 1.0 else shift_time(t, shift)
