"""The procedural dataset: determinism, label statistics, texture (not colour) carries the class."""

import time

import numpy as np
import pytest

from flowseg_jax.data import synthetic


def _variants(tile: np.ndarray) -> np.ndarray:
  """Cyclic shifts, complements and horizontal mirrors of a 4x4 binary tile: (64, 16)."""
  out = []
  for t0 in (tile, tile[:, ::-1]):
    for dy in range(4):
      for dx in range(4):
        t = np.roll(t0, (dy, dx), axis=(0, 1)).ravel()
        out += [t, 1 - t]
  return np.asarray(out)


def test_class_tiles_are_distinct_under_shifts_swaps_and_mirror():
  tiles = synthetic.class_tiles().astype(np.int64)
  assert tiles.shape == (255, 4, 4)
  variants = np.stack([_variants(t) for t in tiles])  # (255, 64, 16)
  flat = tiles.reshape(255, 1, 16)
  # dist[i, j] = min over symmetries of Hamming(tile_i, variant of tile_j).
  dist = np.abs(flat[:, None, :, :] - variants[None, :, :, :]).sum(-1).min(-1)
  np.fill_diagonal(dist, 99)
  assert dist.min() >= 2
  assert dist[:29, :29].min() >= 4  # the first classes (small demos) are far apart
  assert dist[:45, :45].min() >= 3


def test_make_example_is_deterministic_and_well_formed():
  a = synthetic.make_example(5, num_classes=20, size=(48, 40), seed=3)
  b = synthetic.make_example(5, num_classes=20, size=(48, 40), seed=3)
  c = synthetic.make_example(6, num_classes=20, size=(48, 40), seed=3)
  d = synthetic.make_example(5, num_classes=20, size=(48, 40), seed=4)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
  image, label = a
  assert image.shape == (48, 40, 3) and image.dtype == np.uint8
  assert label.shape == (48, 40) and label.dtype == np.uint8
  assert np.isin(label, np.append(np.arange(20), 255)).all()
  with pytest.raises(ValueError, match="num_classes"):
    synthetic.make_example(0, num_classes=256)


@pytest.fixture(scope="module")
def examples():
  return [synthetic.make_example(i, num_classes=150, size=(64, 64), seed=0) for i in range(300)]


def test_label_statistics(examples):
  labels = np.stack([lab for _, lab in examples])
  ignored = (labels == 255).mean()
  assert 0.05 <= ignored <= 0.15, ignored
  counts = np.bincount(labels[labels != 255].ravel(), minlength=150)
  assert (counts > 0).all()  # every class occurs
  # Overlapping objects of varied scale: several regions per image, region areas spread widely.
  regions = [len(np.unique(lab)) for lab in labels]
  assert np.mean(regions) >= 3
  areas = np.concatenate([np.bincount(lab.ravel())[np.unique(lab)] for lab in labels]) / 64**2
  assert np.quantile(areas, 0.1) < 0.05 and np.quantile(areas, 0.9) > 0.3


def _interior_patches(examples, num_classes):
  """4x4 patches fully inside one labelled region: (patches (P, 16, 3), classes (P,))."""
  patches, cls = [], []
  for image, label in examples:
    for y in range(0, 60, 4):
      for x in range(0, 60, 4):
        lab = label[y : y + 4, x : x + 4]
        if lab[0, 0] < num_classes and (lab == lab[0, 0]).all():
          patches.append(image[y : y + 4, x : x + 4].reshape(16, 3).astype(np.float64))
          cls.append(int(lab[0, 0]))
  return np.stack(patches), np.asarray(cls)


def test_mean_colour_does_not_reveal_the_class_but_texture_does(examples):
  n = 150
  # Every other image mirrored (the flip augmentation): it must show the same classes.
  mixed = [
    (img[:, ::-1], lab[:, ::-1]) if i % 2 else (img, lab) for i, (img, lab) in enumerate(examples)
  ]
  patches, cls = _interior_patches(mixed, n)
  # Fit on the patches of the first 150 images, score on the other 150 (objects never straddle).
  half = len(_interior_patches(mixed[:150], n)[1])
  # Colour: nearest class-mean-colour classifier fitted on one half, scored on the other.
  mean = patches.mean(1)
  centroids = np.full((n, 3), 1e9)
  for k in np.unique(cls[:half]):
    centroids[k] = mean[:half][cls[:half] == k].mean(0)
  pred = np.argmin(((mean[half:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  colour_acc = (pred == cls[half:]).mean()
  assert colour_acc < 3.0 / n, colour_acc  # chance is 1/150
  # Texture: binarise each patch along its main colour axis and match against the class tiles
  # (up to shift and swap): a fixed local decoder, no learning.
  patches, cls = patches[::10], cls[::10]
  centred = patches - patches.mean(1, keepdims=True)
  axis = np.linalg.svd(centred, full_matrices=False)[2][:, 0]  # (P, 3)
  bits = (np.einsum("pnc,pc->pn", centred, axis) > 0).astype(np.int64)
  codes = (bits << np.arange(16)).sum(1)
  variants = np.stack([_variants(t) for t in synthetic.class_tiles()[:n].astype(np.int64)])
  variant_codes = (variants << np.arange(16)).sum(-1)  # (n, 64)
  popcount = np.asarray([bin(i).count("1") for i in range(1 << 16)])
  dist = popcount[codes[:, None, None] ^ variant_codes[None]].min(-1)  # (P, n)
  texture_acc = (dist.argmin(1) == cls).mean()
  assert texture_acc > 0.9, texture_acc


def test_generation_is_cheap():
  synthetic.make_example(0, num_classes=150, size=(64, 64))  # warm caches
  times = []
  for i in range(30):
    t = time.perf_counter()
    synthetic.make_example(i, num_classes=150, size=(64, 64))
    times.append(time.perf_counter() - t)
  assert np.median(times) < 0.005, np.median(times)


def test_source_splits_differ():
  train = synthetic.SyntheticSource(4, num_classes=10, size=(16, 16), seed=1, split="train")
  val = synthetic.SyntheticSource(4, num_classes=10, size=(16, 16), seed=1, split="validation")
  assert len(train) == 4 and train[0]["name"] == "synthetic_train_000000"
  assert not np.array_equal(train[0]["image"], val[0]["image"])
  np.testing.assert_array_equal(
    train[2]["label"], synthetic.make_example(2, num_classes=10, size=(16, 16), seed=1)[1]
  )
  with pytest.raises(IndexError):
    train[4]


def test_texel_scales_the_texture_but_not_the_labels():
  """texel k: each texture cell is k x k pixels; the shapes (labels) are those of texel 1."""
  img1, lab1 = synthetic.make_example(3, num_classes=8, size=(64, 64), seed=0)
  img2, lab2 = synthetic.make_example(3, num_classes=8, size=(64, 64), seed=0, texel=2)
  np.testing.assert_array_equal(lab1, lab2)
  assert not np.array_equal(img1, img2)
  # Inside one object, the pattern is constant on aligned 2x2 cells: the four pixels of a cell
  # differ only by the noise (std 5), while neighbouring cells of a pattern differ by >= 90.
  cells = lab2.reshape(32, 2, 32, 2)
  inside = (cells.min(axis=(1, 3)) == cells.max(axis=(1, 3))) & (cells[:, 0, :, 0] != 255)

  def cell_spread(img):
    cell = img.astype(np.float32).reshape(32, 2, 32, 2, 3)
    return (cell.max(axis=(1, 3)) - cell.min(axis=(1, 3))).max(-1)[inside]

  assert np.median(cell_spread(img2)) < 30
  assert np.median(cell_spread(img1)) > 60
  with pytest.raises(ValueError, match="texel"):
    synthetic.make_example(0, texel=0)


def test_class_colours_keep_the_layout_and_colour_each_class_alike():
  pairs = synthetic.class_colour_pairs()
  assert (
    pairs.shape == (255, 2, 3) and (np.linalg.norm(pairs[:, 0] - pairs[:, 1], axis=-1) >= 90).all()
  )
  plain_means, cued_means = {}, {}
  for i in range(40):
    plain, label = synthetic.make_example(i, num_classes=4, size=(32, 32))
    cued, cued_label = synthetic.make_example(i, num_classes=4, size=(32, 32), class_colours=True)
    np.testing.assert_array_equal(cued_label, label)  # same objects, shapes and labels
    for k in np.unique(label[label != 255]):
      plain_means.setdefault(k, []).append(plain[label == k].mean(0))
      cued_means.setdefault(k, []).append(cued[label == k].mean(0))
  for k in cued_means:
    # A class's mean colour spreads little across objects with class colours, widely without.
    want = pairs[k].mean(0)
    assert np.abs(np.mean(cued_means[k], 0) - want).max() < 25, (k, np.mean(cued_means[k], 0), want)
    assert np.std(cued_means[k], 0).max() < 0.5 * np.std(plain_means[k], 0).max()
  src = synthetic.SyntheticSource(2, num_classes=4, size=(16, 16), class_colours=True)
  np.testing.assert_array_equal(
    src[1]["image"], synthetic.make_example(1, num_classes=4, size=(16, 16), class_colours=True)[0]
  )
