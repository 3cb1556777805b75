"""Encoding, chunked nearest-centroid decoding, palettes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowseg_jax import centroids as centroids_lib


def test_encode_decode_roundtrip_and_ignore():
  cents = centroids_lib.kronecker_centroids(171)
  labels = np.arange(171).reshape(1, 9, 19).astype(np.int32)
  labels[0, 0, 0] = 255
  colours = centroids_lib.encode_labels(labels, cents)
  np.testing.assert_array_equal(colours[0, 0, 0], cents[0])
  decoded = np.asarray(centroids_lib.decode_colours(colours, cents, chunk_size=16))
  expected = labels.copy()
  expected[0, 0, 0] = 0
  np.testing.assert_array_equal(decoded, expected)
  colours_void = centroids_lib.encode_labels(labels, cents, ignore_index=5)
  np.testing.assert_array_equal(colours_void[0, 0, 0], cents[5])


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 200])
def test_chunked_decode_equals_full_argmin(chunk_size):
  cents = centroids_lib.kronecker_centroids(150)
  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), minval=-1.3, maxval=1.3)
  full = jnp.argmin(centroids_lib.squared_distances(x, cents), axis=-1)
  np.testing.assert_array_equal(centroids_lib.decode_colours(x, cents, chunk_size=chunk_size), full)


def test_decode_ties_go_to_lower_index_across_chunks():
  cents = np.array([[0, 0, 0], [1, 0, 0], [2, 0, 0], [1, 0, 0]], np.float32)  # 1 and 3 coincide
  x = np.array([[1.0, 0, 0]], np.float32)
  assert int(centroids_lib.decode_colours(x, cents, chunk_size=2)[0]) == 1
  assert int(centroids_lib.decode_colours(x, cents, chunk_size=3)[0]) == 1


def test_decode_memory_is_bounded_by_chunk():
  """The compiled program's temporaries stay far below a (pixels x classes) distance array."""
  cents = centroids_lib.kronecker_centroids(171)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)

  def temp_bytes(chunk):
    fn = jax.jit(lambda y: centroids_lib.decode_colours(y, cents, chunk_size=chunk))
    return fn.lower(x).compile().memory_analysis().temp_size_in_bytes

  full = 64 * 64 * 171 * 4
  assert temp_bytes(16) < full / 4


def test_palette_and_uint8():
  cents = centroids_lib.kronecker_centroids(3)
  pal = centroids_lib.palette(cents)
  assert pal.dtype == np.uint8
  np.testing.assert_array_equal(pal[0], [0, 0, 0])
  np.testing.assert_array_equal(
    centroids_lib.to_uint8_image(np.array([-1.0, 1.0, 3.0])), [0, 255, 255]
  )


def test_class_centroids_with_ignore_class():
  c = centroids_lib.class_centroids(19, ignore_as_class=True)
  np.testing.assert_array_equal(c, centroids_lib.kronecker_centroids(20))


def test_check_labels():
  centroids_lib.check_labels(np.array([0, 3, 255]), 4)
  with pytest.raises(ValueError, match=r"\[4, 200\]"):
    centroids_lib.check_labels(np.array([0, 4, 200, 255]), 4)
  with pytest.raises(TypeError):
    centroids_lib.kronecker_centroids(2.0)
  with pytest.raises(ValueError, match="chunk_size"):
    centroids_lib.decode_colours(
      np.zeros((1, 3)), centroids_lib.kronecker_centroids(3), chunk_size=0
    )
