"""Test-time augmentation: flip and multi-scale views, each run as the plain sampler would run it,
and decoded by the mean of the potential's class probabilities over views."""

import numpy as np
import pytest

from flowseg_jax import centroids, inference, inference_host, train
from flowseg_jax.data import transforms
from tests.train_test import tiny_config


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tta"))
  train.train_and_evaluate(tiny_config(), workdir)
  return inference.Segmenter.from_workdir(workdir)


def _with(seg, **eval_overrides):
  """The same weights and task under other eval settings."""
  config = seg.config.copy_and_resolve_references()
  config.unlock()
  for key, value in eval_overrides.items():
    config.eval[key] = value
  return inference.Segmenter(config, seg.params, task=seg.task, mesh=seg.mesh)


def _views(seg, img, tta=None, mode=None):
  [(_, out, labels, _)] = list(seg.segment_stream([(0, img, None)], 1, tta=tta, mode=mode))
  return out, labels


def _decode(seg, views, size):
  """The views resized to the image's size and decoded together (the rule: scoring_test)."""
  obj = seg.task.objective
  resized = np.stack([inference_host.resize_colours(v, size) for v in views])
  return np.asarray(centroids.decode_views(resized, seg.centroids, tau=obj.tau, eps=obj.eps))


def test_flip_averages_a_window_and_its_mirror(seg):
  """tta='flip': the colours are the mean of the plain pass and the mirrored pass mirrored back,
  and the labels the class of highest mean probability over the two."""
  image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # one window
  plain, _ = _views(seg, image)
  mirrored, _ = _views(seg, image[:, ::-1].copy())
  both, labels = _views(seg, image, "flip")
  np.testing.assert_allclose(both, (plain + mirrored[:, ::-1]) / 2, atol=1e-6)
  np.testing.assert_array_equal(labels, _decode(seg, [plain, mirrored[:, ::-1]], (32, 32)))
  np.testing.assert_array_equal(labels, seg(image, tta="flip"))
  with pytest.raises(ValueError, match="return_confidence"):
    seg(image, tta="flip", return_confidence=True)
  with pytest.raises(ValueError, match="tta"):
    seg(image, tta="ms_flop")


def test_ms_flip_is_flip_at_each_scale(seg):
  """ms_flip at scales (1, 2) on a 32x32 model: scale 1 is the flip pair; scale 2 is the 64x64
  image cut into windows, i.e. slide mode with a 64 short side, and its mirror; the labels decode
  all four views' probabilities at the image's size (36x36: every view is resized)."""
  image = np.random.default_rng(5).integers(0, 256, (36, 36, 3), dtype=np.uint8)
  stride = (32, 32)  # windows at 0 and 32 of 64: the grid is its own mirror
  ms = _with(seg, tta="ms_flip", tta_scales=(1.0, 2.0), slide_stride=stride)
  slide = _with(seg, mode="slide", slide_short_side=64, slide_stride=stride)
  s1, m1 = _views(seg, image)[0], _views(seg, image[:, ::-1].copy())[0][:, ::-1]
  s2, m2 = _views(slide, image)[0], _views(slide, image[:, ::-1].copy())[0][:, ::-1]
  assert s2.shape == (64, 64, 3)  # square: slide's aspect-keeping resize is whole mode's stretch
  colours, labels = _views(ms, image)
  np.testing.assert_array_equal(labels, _decode(seg, [s1, m1, s2, m2], (36, 36)))
  np.testing.assert_array_equal(labels, ms(image))  # the config's tta is the Segmenter's default
  # Pictures: the mean colour at the scale-1 view's size.
  want = np.mean([s1, m1, *(inference_host.resize_colours(v, (32, 32)) for v in (s2, m2))], 0)
  np.testing.assert_allclose(colours, want, atol=1e-6)
  # ms_flip with the one scale 1 is flip.
  one = _with(seg, tta="ms_flip", tta_scales=(1.0,))
  np.testing.assert_array_equal(one(image), seg(image, tta="flip"))


def test_a_view_below_the_window_is_padded_grey(seg):
  """Scale 0.5 of a 32x32 model: the image at 16x16 in the corner of a zero (grey) 32x32 input,
  one window; only the 16x16 corner is read back. Slide mode scales its own base size."""
  rgb = np.random.default_rng(6).integers(0, 256, (50, 40, 3), dtype=np.uint8)
  image, corners, valid = inference_host.network_input(rgb, seg.config, "whole", 0.5)
  assert image.shape == (32, 32, 3) and corners == [(0, 0)] and valid == (16, 16)
  want = transforms.normalize_image(transforms.resize_image(rgb, (16, 16)))
  np.testing.assert_array_equal(image[:16, :16], want)
  assert not image[16:].any() and not image[:, 16:].any()
  # slide, short side 32: the base is 40x32; at 1.5 it is 60x48, cut into 32x32 windows.
  image, corners, valid = inference_host.network_input(rgb, seg.config, "slide", 1.5)
  assert image.shape == (60, 48, 3) and valid == (60, 48)
  assert corners == list(inference_host.slide_windows(60, 48, (32, 32), (21, 21)))
  for bad in [(), (0.5, 0.0)]:
    with pytest.raises(ValueError, match="tta_scales"):
      _with(seg, tta="ms_flip", tta_scales=bad)(rgb)
