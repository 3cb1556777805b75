"""The on-device confusion matrix and decoders against plain NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowseg_jax import centroids, inference_host, scoring, sharding


def bincount_reference(predictions, labels, n):
  """The confusion matrix written out with np.bincount in int64 (rows = label)."""
  p, g = np.asarray(predictions, np.int64).ravel(), np.asarray(labels, np.int64).ravel()
  keep = (g != 255) & (g >= 0) & (g < n) & (p >= 0) & (p < n)
  return np.bincount(g[keep] * n + p[keep], minlength=n * n).reshape(n, n)


def views_reference(views, mu, tau=1.0, eps=1e-6):
  """The mean over views of the potential's class probabilities, in float64, then the argmax."""
  d = np.square(np.asarray(views, np.float64)[..., None, :] - np.asarray(mu, np.float64)).sum(-1)
  log_w = -np.log(d + eps) / tau
  log_p = log_w - np.logaddexp.reduce(log_w, axis=-1, keepdims=True)
  return np.argmax(np.exp(log_p).sum(0), axis=-1)


@pytest.mark.parametrize("n", [3, 150])
def test_confusion_counts_equal_numpy_bincount(n):
  """Random labels over every class plus ignored pixels, random predictions with a few out of
  range: the jitted int32 counts and the host int64 wrapper equal np.bincount's."""
  rng = np.random.default_rng(n)
  labels = rng.integers(0, n, (4, 33, 17)).astype(np.int32)
  labels[rng.uniform(size=labels.shape) < 0.2] = 255
  predictions = rng.integers(-1, n + 1, labels.shape).astype(np.int32)
  want = bincount_reference(predictions, labels, n)
  assert set(np.unique(labels)) == set(range(n)) | {255} or n > 100
  got = jax.jit(functools.partial(scoring.confusion_counts, num_classes=n))(predictions, labels)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, want)
  host = scoring.confusion_matrix(predictions, labels, n)
  assert host.dtype == np.int64
  np.testing.assert_array_equal(host, want)
  assert want.sum() == ((labels != 255) & (predictions >= 0) & (predictions < n)).sum()


def test_confusion_counts_refuse_more_pixels_than_int32_holds():
  too_many = jax.ShapeDtypeStruct((2**16, 2**15), jnp.int32)  # 2^31 pixels, nothing allocated
  with pytest.raises(ValueError, match="overflow int32"):
    jax.eval_shape(functools.partial(scoring.confusion_counts, num_classes=2), too_many, too_many)


def test_host_wrapper_splits_large_inputs_into_padded_calls():
  """More pixels than one call holds: several padded calls, summed in int64."""
  rng = np.random.default_rng(1)
  size = scoring.MAX_PIXELS_PER_DEVICE + 12345
  labels = rng.integers(0, 5, size)
  labels[:100] = 255
  predictions = rng.integers(0, 5, size)
  got = scoring.confusion_matrix(predictions, labels, 5)
  np.testing.assert_array_equal(got, bincount_reference(predictions, labels, 5))
  assert got.sum() == size - 100


def test_padded_sizes():
  assert scoring.padded_size(1, 1) == scoring.MIN_PIXELS_PER_DEVICE
  assert scoring.padded_size(5000, 1) == 8192
  assert scoring.padded_size(5000, 4) == 4 * scoring.MIN_PIXELS_PER_DEVICE
  assert scoring.padded_size(10**9, 2) == 2 * scoring.MAX_PIXELS_PER_DEVICE


@pytest.mark.parametrize("n,tau", [(12, 1.0), (40, 1.0), (40, 0.25)])
def test_decode_views_equals_the_float64_rule(n, tau):
  """Mean probability over 3 views (40 classes: three class chunks) against float64; one view is
  the nearest centroid."""
  mu = centroids.kronecker_centroids(n)
  rng = np.random.default_rng(n)
  views = rng.uniform(-1.1, 1.1, (3, 25, 31, 3)).astype(np.float32)
  got = np.asarray(centroids.decode_views(views, mu, tau=tau))
  np.testing.assert_array_equal(got, views_reference(views, mu, tau=tau))
  one = np.asarray(centroids.decode_views(views[:1], mu, tau=tau))
  np.testing.assert_array_equal(one, inference_host.decode_colours_host(views[0], mu))


def test_decode_views_on_the_class_colours_with_a_small_tau():
  """tau 0.05 on a class colour: weights (1e-6)^-20, far beyond float32, hence the log space."""
  mu = centroids.kronecker_centroids(9)
  views = np.stack([mu, mu[::-1]])[:, None]  # (2 views, 1, 9 pixels, 3)
  views[1] = views[0]
  np.testing.assert_array_equal(centroids.decode_views(views, mu, tau=0.05), [np.arange(9)])


class _Task:
  """What the scorer reads of a task (hashable, as the compiled scorer is cached per task)."""

  def __init__(self, n):
    self.num_classes = n
    self.decode_centroids = centroids.kronecker_centroids(n)
    self.objective = type("Objective", (), {"tau": 1.0, "eps": 1e-6})()


@pytest.mark.parametrize("num_views,num_devices", [(1, 1), (2, 8)])
def test_pixel_scorer_counts_annotated_pixels_once_and_never_the_padding(num_views, num_devices):
  """Images of many sizes, one without an annotation; on one device the large one spans two
  calls. Labels per image are the host decoder's, the int64 matrix is np.bincount's over the
  annotated images only: the padding of each call counts nowhere."""
  n = 7
  task = _Task(n)
  mesh = sharding.make_mesh(-1, 1, devices=jax.devices()[:num_devices])
  rng = np.random.default_rng(3)
  sizes = [(40, 50), (7, 9), (600, 500), (1, 1)]
  images = [rng.uniform(-1, 1, (num_views, h, w, 3)).astype(np.float32) for h, w in sizes]
  annotations = [rng.integers(0, n, s).astype(np.int32) for s in sizes]
  annotations[0][:5] = 255
  annotations[2] = None
  confusion = np.full((n, n), 2**31, np.int64)  # a sum already past int32
  scorer = scoring.PixelScorer(task, mesh, num_views, confusion)
  for i, (colours, label) in enumerate(zip(images, annotations, strict=True)):
    scorer.add(i, colours, label)
  assert scorer.full == (num_devices == 1)  # 600 x 500 > one call of one device
  out = scorer.flush()
  assert [k for k, _ in out] == [0, 1, 2, 3] and scorer.flush() == []
  want = np.full((n, n), 2**31, np.int64)
  for (_, labels), colours, label in zip(out, images, annotations, strict=True):
    ref = views_reference(colours, task.decode_centroids)
    if num_views == 1:
      ref = inference_host.decode_colours_host(colours[0], task.decode_centroids)
    np.testing.assert_array_equal(labels, ref)
    if label is not None:
      want += bincount_reference(labels, label, n)
  np.testing.assert_array_equal(confusion, want)
  assert confusion.sum() - n * n * 2**31 == 40 * 50 - 5 * 50 + 7 * 9 + 1
  with pytest.raises(ValueError, match="annotation"):
    scorer.add(9, images[0], annotations[1])
  with pytest.raises(ValueError, match="int64"):
    scoring.PixelScorer(task, mesh, num_views, np.zeros((n, n), np.int32))
