"""Runs the FlowSeg objective and sampler on a real batch and prints what they compute.

`python -m tools.demo_objective` (from the repository root): no data or weights needed. A batch of
images with label maps (some pixels ignored) gets its Kronecker colours; the loss is evaluated for an
untrained (zero) network in every objective mode; then an 'x'-prediction oracle that knows the mask,
corrupted by noise, is integrated from the image to t = 1 with Euler, decoded by nearest centroid
and scored with mIoU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import flow, sampling, scoring
from flowseg_jax.evaluators import miou


def make_batch(key, batch=4, size=32, num_classes=19):
  """Images whose label is a blocky random map; the image is a noisy function of the label."""
  k1, k2, k3 = jax.random.split(key, 3)
  coarse = jax.random.randint(k1, (batch, size // 8, size // 8), 0, num_classes)
  labels = jnp.repeat(jnp.repeat(coarse, 8, axis=1), 8, axis=2)
  labels = jnp.where(jax.random.uniform(k2, labels.shape) < 0.05, 255, labels)
  tint = jax.random.uniform(k3, (num_classes + 1, 3), minval=-0.8, maxval=0.8)
  images = tint[jnp.minimum(labels, num_classes)] + 0.1 * jax.random.normal(k3, labels.shape + (3,))
  return jnp.clip(images, -1, 1), labels.astype(jnp.int32)


def main() -> None:
  num_classes = 19
  cents = centroids_lib.kronecker_centroids(num_classes)
  images, labels = make_batch(jax.random.key(0), num_classes=num_classes)
  print(f"{num_classes} Kronecker centroids, first three: {np.round(cents[:3], 3).tolist()}")
  print(
    f"batch: images {images.shape}, labels {labels.shape}, ignored {float(jnp.mean(labels == 255)):.1%}"
  )

  t = flow.sample_t(jax.random.key(1), (images.shape[0],))
  zero_out = jnp.zeros_like(images)
  print("\nloss of an untrained (zero-output) network:")
  for name, kw in [
    ("vanilla FM", dict(reshape=False)),
    ("reshaped, static", dict(target="static")),
    ("reshaped, annealing", dict(target="annealing")),
    ("reshaped, sqrt transform", dict(transform="sqrt")),
    ("reshaped, x-prediction", dict(prediction="x")),
  ]:
    loss, aux = jax.jit(lambda o, x, y, tt, kw=kw: flow.flowseg_loss(o, x, y, tt, cents, **kw))(
      zero_out, images, labels, t
    )
    print(
      f"  {name:26s} loss {float(loss):9.4f}  fm {float(aux['fm_loss']):.4f}  "
      f"|grad Phi| {float(aux['grad_phi_norm']):8.3f}  decodes right {float(aux['decode_accuracy']):.1%}"
    )

  target = centroids_lib.encode_labels(labels, cents)
  noise = 0.15 * jax.random.normal(jax.random.key(2), target.shape)
  oracle = lambda x, tt: target + noise  # an imperfect 'x' prediction
  for steps in (1, 10):
    x1 = sampling.sample(oracle, images, num_steps=steps, prediction="x")
    pred = centroids_lib.decode_colours(x1, cents)
    cm = scoring.confusion_matrix(pred, labels, num_classes)
    result = miou.summary_percent(miou.compute_metrics(cm))
    print(f"\nEuler, {steps:2d} step(s), noisy oracle -> nearest centroid: {result}")


if __name__ == "__main__":
  main()
