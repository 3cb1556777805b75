"""The FlowSeg objective: PyTorch parity, eq 11, the paper's properties, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import flow
from tests.torch_reference import flowseg as ref

MODES = [  # (reshape, target)
  (True, "static"),
  (True, "annealing"),
  (False, "static"),
]


def make_inputs(rng, n, *, batch=3, h=4, w=5, ignore_frac=0.2, dtype=np.float64):
  out = rng.normal(size=(batch, h, w, 3)).astype(dtype)
  x0 = rng.uniform(-1, 1, size=(batch, h, w, 3)).astype(dtype)
  labels = rng.integers(0, n, size=(batch, h, w)).astype(np.int32)
  labels[rng.uniform(size=labels.shape) < ignore_frac] = 255
  # t = 0, an interior time and t near 1 (inside the x-prediction's t_eps clamp).
  t = np.array([0.0, 0.37, 0.999][:batch], dtype)
  return out, x0, labels, t


def jax_quantities(out, x0, labels, t, cents, **kw):
  """loss, d loss / d out, grad Phi and the reshaped target (all NHWC numpy)."""

  def loss_fn(o):
    return flow.flowseg_loss(o, x0, labels, t, cents, **kw)[0]

  loss, grad_out = jax.value_and_grad(loss_fn)(jnp.asarray(out))
  terms = flow.flow_terms(out, x0, labels, t, cents, flow.Objective(**kw))
  return (
    np.asarray(loss),
    np.asarray(grad_out),
    np.asarray(terms["grad_phi"]),
    np.asarray(terms["v_target"]),
    np.asarray(terms["valid"]),
  )


def torch_quantities(out, x0, labels, t, cents, **kw):
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  out_t = nchw(out).requires_grad_(True)
  loss, grad_phi, v_target, _ = ref.flowseg_loss(
    out_t,
    nchw(x0),
    torch.from_numpy(labels).long(),
    torch.from_numpy(t),
    torch.from_numpy(cents),
    **kw,
  )
  loss.backward()
  nhwc = lambda a: a.detach().numpy().transpose(0, 2, 3, 1)
  return loss.item(), nhwc(out_t.grad), nhwc(grad_phi), nhwc(v_target)


F32_UNIT_ROUNDOFF = 2.0**-24


def conditioning_rtol(x1_hat, labels, cents, base):
  """Per-sample relative tolerance for float32: base + 8 u / r_min.

  The log transform's grad Phi ~ 2 (x1_hat - mu_y) / (d_y + eps) amplifies the rounding of x1_hat (about u
  |x1_hat| for u = 2^-24; twice, for x_t and the update) by 1 / r where r = |x1_hat - mu_y|. With 'v'
  prediction at t -> 1, x1_hat = x_t + (1 - t) v_theta lands within ~1e-3 of the centroid, so that sample's
  agreement is only ~1e-4 however exact both sides are; the other samples agree to ~1e-6.
  """
  safe = np.where(labels == 255, 0, labels)
  r = np.linalg.norm(x1_hat - cents[np.minimum(safe, len(cents) - 1)], axis=-1)
  r_min = np.maximum(r.reshape(len(r), -1).min(axis=1), 1e-12)
  return base + 8 * F32_UNIT_ROUNDOFF / r_min


def assert_parity(n, *, dtype, rtol, atol, seed=0, jax_kw=None, **kw):
  """JAX vs the torch reference on random inputs; `jax_kw` holds JAX-only (scheduling) options."""
  rng = np.random.default_rng(seed)
  mask_ignored = kw.get("mask_ignored", True)
  cents = centroids_lib.class_centroids(n, ignore_as_class=not mask_ignored, dtype=dtype)
  out, x0, labels, t = make_inputs(rng, n, dtype=dtype)
  j_loss, j_gout, j_gphi, j_tgt, valid = jax_quantities(
    out, x0, labels, t, cents, **kw, **(jax_kw or {})
  )
  t_loss, t_gout, t_gphi, t_tgt = torch_quantities(out, x0, labels, t, cents, **kw)
  per_sample = np.full(len(t), rtol)
  if dtype == np.float32:
    x1_hat = np.asarray(flow.flow_terms(out, x0, labels, t, cents, flow.Objective(**kw))["x1_hat"])
    per_sample = conditioning_rtol(x1_hat, labels, cents, rtol)
  v = valid[..., None]
  pairs = {
    "dloss/dout": (j_gout, t_gout),
    "grad phi": (j_gphi * v, t_gphi * v),
    "target": (j_tgt * v, t_tgt * v),
  }
  # norm_reduced rescales each pixel's log gradient by c / |g| <= 1: its rounding error is at most the log
  # gradient's (so its direction carries the log's error relative to |g|, up to ~1e-3 in float32 where the
  # N terms cancel), while its own scale is capped at c. The absolute tolerance scales with the log run's.
  log_scale = {}
  if kw.get("transform") == "norm_reduced":
    log = jax_quantities(out, x0, labels, t, cents, **{**kw, "transform": "log"}, **(jax_kw or {}))
    log_scale = {
      "dloss/dout": np.max(np.abs(log[1])),
      "grad phi": np.max(np.abs(log[2] * v)),
      "target": np.max(np.abs(log[3] * v)),
    }
  if not kw.get("reshape", True):  # vanilla flow matching does not evaluate the potential
    np.testing.assert_array_equal(j_gphi, 0.0)
    del pairs["grad phi"]
  for name, (got, want) in pairs.items():
    for b, tol in enumerate(per_sample):
      # Elements are sums of N terms of either sign: rounding is relative to the array's scale, so the
      # absolute tolerance scales with max |want| (elements near zero by cancellation need it).
      scale = max(np.max(np.abs(want)), log_scale.get(name, 0.0))
      np.testing.assert_allclose(
        got[b], want[b], rtol=tol, atol=atol + tol * scale, err_msg=f"{name} sample {b} {kw}"
      )
  np.testing.assert_allclose(j_loss, t_loss, rtol=per_sample.max(), atol=atol, err_msg=f"loss {kw}")


def test_centroids_match_reference_and_definition():
  for n in (2, 19, 150, 171):
    ours = centroids_lib.kronecker_centroids(n, dtype=np.float64)
    np.testing.assert_array_equal(ours, ref.kronecker_centroids(n).numpy())
    assert ours.shape == (n, 3)
    np.testing.assert_array_equal(ours[0], [-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(ours.min(0), [-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(ours.max(0), [1.0, 1.0, 1.0])
    assert len(np.unique(ours, axis=0)) == n
  # Hand-computed: k=1 of a 3-entry table. frac(2*sqrt2)=0.828.. is the max of channel 0.
  c3 = centroids_lib.kronecker_centroids(3, dtype=np.float64)
  f1 = np.mod(np.sqrt([2.0, 3.0, 5.0]), 1)
  f2 = np.mod(2 * np.sqrt([2.0, 3.0, 5.0]), 1)
  lo, hi = np.minimum(0, np.minimum(f1, f2)), np.maximum(f1, f2)
  np.testing.assert_allclose(c3[1], 2 * (f1 - lo) / (hi - lo) - 1, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [2, 19, 150, 171])
def test_parity_float64_all_modes(n):
  """Every transform x prediction x target mode and tau in {0.5, 1, 2}: agreement to 1e-10 relative."""
  with jax.enable_x64(True):
    combos = itertools.product(flow.TRANSFORMS, flow.PREDICTIONS, MODES, (0.5, 1.0, 2.0))
    for i, (transform, prediction, (reshape, target), tau) in enumerate(combos):
      assert_parity(
        n,
        dtype=np.float64,
        rtol=1e-10,
        atol=1e-12,
        seed=i,
        transform=transform,
        prediction=prediction,
        reshape=reshape,
        target=target,
        tau=tau,
      )
    for transform in flow.TRANSFORMS:  # ignored pixels trained toward the extra centroid
      assert_parity(
        n, dtype=np.float64, rtol=1e-10, atol=1e-12, transform=transform, mask_ignored=False
      )


@pytest.mark.parametrize("n", [19, 171])
def test_parity_float32(n):
  """float32: the two sides round differently (op order, fused multiply-adds). Well-conditioned entries agree
  to ~1e-6 relative (observed max 1.2e-6), so the base tolerance is 5e-6 (~40 ulps) of the array's scale;
  near-centroid samples get the conditioning allowance of `conditioning_rtol`."""
  combos = itertools.product(flow.TRANSFORMS, flow.PREDICTIONS, MODES)
  for i, (transform, prediction, (reshape, target)) in enumerate(combos):
    assert_parity(
      n,
      dtype=np.float32,
      rtol=5e-6,
      atol=1e-7,
      seed=100 + i,
      transform=transform,
      prediction=prediction,
      reshape=reshape,
      target=target,
    )


@pytest.mark.parametrize("n", [19, 150])
def test_parity_with_pixel_chunks(n):
  """The potential in chunks of 1 and 9 pixels over a batch of 3 (1 and 3 pixels per image; 3 does not
  divide an image's 20 pixels, so the last chunk is padded) against the reference: the tolerances of the
  unchunked parity tests."""
  for chunk in (1, 9):
    with jax.enable_x64(True):
      for i, (transform, target) in enumerate(itertools.product(flow.TRANSFORMS, flow.TARGETS)):
        assert_parity(
          n,
          dtype=np.float64,
          rtol=1e-10,
          atol=1e-12,
          seed=200 + i,
          jax_kw={"pixel_chunk": chunk},
          transform=transform,
          target=target,
        )
    assert_parity(
      n, dtype=np.float32, rtol=5e-6, atol=1e-7, seed=300, jax_kw={"pixel_chunk": chunk}
    )


def test_parity_edge_cases_float64():
  with jax.enable_x64(True):
    n = 19
    cents = centroids_lib.kronecker_centroids(n, dtype=np.float64)
    rng = np.random.default_rng(7)
    out, x0, labels, t = make_inputs(rng, n)
    # x1_hat exactly on the true centroid ('x' prediction: out is x1_hat).
    labels[labels == 255] = 3
    on_centroid = cents[labels]
    for transform in flow.TRANSFORMS:
      kw = dict(prediction="x", transform=transform)
      j = jax_quantities(on_centroid, x0, labels, t, cents, **kw)
      r = torch_quantities(on_centroid, x0, labels, t, cents, **kw)
      for a, b in zip(j[:4], r, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
      assert np.all(np.isfinite(j[2]))
    # An all-ignored batch: loss 0 and zero gradient, on both sides.
    all_ignored = np.full_like(labels, 255)
    j_loss, j_gout, *_ = jax_quantities(out, x0, all_ignored, t, cents)
    t_loss, t_gout, *_ = torch_quantities(out, x0, all_ignored, t, cents)
    assert j_loss == 0.0 and t_loss == 0.0
    np.testing.assert_array_equal(j_gout, 0.0)
    np.testing.assert_array_equal(t_gout, 0.0)


def test_loss_has_no_gradient_path_through_target():
  """d loss / d out must equal 2 w (v_theta - target) d v_theta / d out with the target held constant."""
  with jax.enable_x64(True):
    n = 19
    cents = centroids_lib.kronecker_centroids(n, dtype=np.float64)
    out, x0, labels, t = make_inputs(np.random.default_rng(3), n)
    for prediction in flow.PREDICTIONS:
      _, g_out, _, v_target, valid = jax_quantities(
        out, x0, labels, t, cents, prediction=prediction
      )
      terms = flow.flow_terms(out, x0, labels, t, cents, flow.Objective(prediction=prediction))
      n_valid = valid.sum()
      dvdo = 1.0 if prediction == "v" else 1.0 / np.maximum(1 - t, 0.05)[:, None, None, None]
      expected = (
        2 * valid[..., None] * (np.asarray(terms["v_theta"]) - v_target) * dvdo / (3 * n_valid)
      )
      np.testing.assert_allclose(g_out, expected, rtol=1e-10, atol=1e-14)


def test_interpolant_is_the_network_input_of_the_loss():
  """x_t fed to the network must be the x_t the loss assumes: for 'v', x1_hat - (1 - t) v_theta = x_t."""
  for mask_ignored in (True, False):
    cents = centroids_lib.class_centroids(19, ignore_as_class=not mask_ignored)
    out, x0, labels, t = make_inputs(np.random.default_rng(4), 19, dtype=np.float32)
    x_t = flow.interpolant(x0, labels, t, cents, mask_ignored=mask_ignored)
    terms = flow.flow_terms(out, x0, labels, t, cents, flow.Objective(mask_ignored=mask_ignored))
    recovered = terms["x1_hat"] - (1 - t[:, None, None, None]) * terms["v_theta"]
    np.testing.assert_allclose(x_t, recovered, atol=1e-6)
    np.testing.assert_allclose(x_t[0], x0[0], atol=0)  # t = 0 is the image


def test_ignored_input_moves_only_ignored_pixels_of_the_input():
  """ignored_input changes x_t at ignored pixels only (class0: toward mu_0, image: stays x0,
  centre: toward 0); the loss, masked there, is unchanged for the same network output."""
  cents = centroids_lib.class_centroids(19)
  out, x0, labels, t = make_inputs(np.random.default_rng(5), 19, dtype=np.float32)
  ignored = labels == centroids_lib.IGNORE_LABEL
  assert ignored.any() and (~ignored).any()
  tb = t[:, None, None, None]
  base = flow.interpolant(x0, labels, t, cents)
  want = {"class0": (1 - tb) * x0 + tb * cents[0], "image": x0, "centre": (1 - tb) * x0}
  losses = []
  for mode, at_ignored in want.items():
    x_t = np.asarray(flow.interpolant(x0, labels, t, cents, ignored_input=mode))
    np.testing.assert_allclose(
      x_t[ignored], np.broadcast_to(at_ignored, x_t.shape)[ignored], atol=1e-6
    )
    np.testing.assert_array_equal(x_t[~ignored], np.asarray(base)[~ignored])
    terms = flow.flow_terms(out, x0, labels, t, cents, flow.Objective(ignored_input=mode))
    recovered = terms["x1_hat"] - (1 - tb) * terms["v_theta"]
    np.testing.assert_allclose(recovered, x_t, atol=1e-6)  # the loss assumes the same input
    losses.append(float(flow.flowseg_loss(out, x0, labels, t, cents, ignored_input=mode)[0]))
  assert losses[0] == losses[1] == losses[2]
  with pytest.raises(ValueError, match="needs mask_ignored=True"):
    flow.Objective(ignored_input="image", mask_ignored=False)
  with pytest.raises(ValueError, match="ignored_input must be one of"):
    flow.Objective(ignored_input="zero")
  with pytest.raises(ValueError, match="the reference has no ignored_input='centre'"):
    flow.Objective(ignored_input="centre").reference_options()


def test_aux_values():
  n = 5
  cents = centroids_lib.kronecker_centroids(n)
  labels = np.array([[[0, 1], [2, 255]]], np.int32)
  x0 = np.zeros((1, 2, 2, 3), np.float32)
  out = cents[np.where(labels == 255, 0, labels)][None][0]  # x-prediction exactly right everywhere
  out[0, 0, 1] = cents[3]  # one valid pixel decodes to a wrong class
  loss, aux = flow.flowseg_loss(out, x0, labels, np.zeros(1, np.float32), cents, prediction="x")
  assert int(aux["num_valid"]) == 3
  np.testing.assert_allclose(aux["decode_accuracy"], 2 / 3, rtol=1e-6)
  # vanilla FM loss: only the wrong pixel errs, by |mu_3 - mu_1|^2 over 3 channels x 3 valid pixels.
  np.testing.assert_allclose(aux["fm_loss"], np.sum((cents[3] - cents[1]) ** 2) / 9, rtol=1e-6)
  assert float(loss) > float(aux["fm_loss"])
  assert int(aux["num_bad_labels"]) == 0


def test_bf16_output_is_computed_in_float32():
  cents = centroids_lib.kronecker_centroids(19)
  out, x0, labels, t = make_inputs(np.random.default_rng(5), 19, dtype=np.float32)
  loss16, _ = flow.flowseg_loss(jnp.asarray(out, jnp.bfloat16), x0, labels, t, cents)
  rounded = np.asarray(jnp.asarray(out, jnp.bfloat16).astype(jnp.float32))
  loss32, _ = flow.flowseg_loss(rounded, x0, labels, t, cents)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=1e-6)


def test_jit_and_bad_labels_under_jit_are_masked_and_counted():
  cents = centroids_lib.kronecker_centroids(4)
  out, x0, labels, t = make_inputs(np.random.default_rng(2), 4, dtype=np.float32)
  fn = jax.jit(lambda *a: flow.flowseg_loss(*a))
  loss, aux = fn(out, x0, labels, t, cents)
  np.testing.assert_allclose(loss, flow.flowseg_loss(out, x0, labels, t, cents)[0], rtol=1e-6)
  bad = labels.copy()
  bad[0, 0, 0] = 9
  _, aux_bad = fn(out, x0, bad, t, cents)
  assert int(aux_bad["num_bad_labels"]) == 1
  assert int(aux_bad["num_valid"]) == int(aux["num_valid"]) - (labels[0, 0, 0] != 255)


def test_bad_input_errors():
  cents = centroids_lib.kronecker_centroids(4)
  out, x0, labels, t = make_inputs(np.random.default_rng(0), 4, dtype=np.float32)
  bad = labels.copy()
  bad[0, 1, 1] = 7
  with pytest.raises(ValueError, match=r"outside \[0, 4\).*\[7\]"):
    flow.flowseg_loss(out, x0, bad, t, cents)
  with pytest.raises(ValueError, match="labels must be"):
    flow.flowseg_loss(out, x0, labels[0], t, cents)
  with pytest.raises(ValueError, match="out must be"):
    flow.flowseg_loss(out[0], x0[0], labels, t, cents)
  with pytest.raises(ValueError, match="t must be"):
    flow.flowseg_loss(out, x0, labels, t[:1], cents)
  with pytest.raises(ValueError, match="x0 shape"):
    flow.flowseg_loss(out, x0[:, :2], labels, t, cents)
  with pytest.raises(ValueError, match="centroids must be"):
    flow.flowseg_loss(out, x0, np.zeros_like(labels), t, cents[:1])
  with pytest.raises(ValueError, match="transform must be"):
    flow.flowseg_loss(out, x0, labels, t, cents, transform="cube")
  with pytest.raises(ValueError, match="prediction must be"):
    flow.flowseg_loss(out, x0, labels, t, cents, prediction="eps")
  with pytest.raises(ValueError, match="at least 2 classes"):
    centroids_lib.kronecker_centroids(1)
  with pytest.raises(TypeError, match="integers"):
    flow.flowseg_loss(out, x0, labels.astype(np.float32), t, cents)


def test_t_samplers():
  key = jax.random.key(0)
  u = np.asarray(flow.sample_t(key, (20000,), distribution="uniform"))
  assert 0 <= u.min() and u.max() < 1
  np.testing.assert_allclose(u.mean(), 0.5, atol=0.01)
  ln = np.asarray(flow.sample_t(key, (20000,), distribution="logit_normal", mean=0.5, std=0.8))
  logit = np.log(ln / (1 - ln))
  np.testing.assert_allclose([logit.mean(), logit.std()], [0.5, 0.8], atol=0.02)
  shifted = np.asarray(flow.sample_t(key, (20000,), distribution="uniform", shift=3.0))
  np.testing.assert_allclose(shifted, u / (u + (1 - u) * 3.0), rtol=1e-6)
  assert shifted.mean() < u.mean()
  with pytest.raises(ValueError, match="t distribution"):
    flow.sample_t(key, (2,), distribution="beta")
