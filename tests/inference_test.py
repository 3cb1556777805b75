"""The Segmenter: a real photograph in three lines, input kinds, determinism, and what it restores."""

import json
import os
import shutil

import jax
import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from flowseg_jax import (
  centroids,
  inference,
  inference_host,
  main,
  sampling,
  sharding,
  tasks,
  train_state,
)
from flowseg_jax.run import files
from tests.train_test import REPO, tiny_config

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)


@pytest.fixture(scope="module")
def workdir(trained_workdir):
  return trained_workdir


@pytest.fixture(scope="module")
def seg(workdir):
  return inference.Segmenter.from_workdir(workdir)


def _reference_labels(config, params, rgb):
  """The same inference written out by hand: resize, Euler ODE, bilinear back, full argmin."""
  task = tasks.create_task(config)
  size = tuple(config.input.image_size)
  x0 = np.asarray(Image.fromarray(rgb).resize(size[::-1], Image.Resampling.BILINEAR), np.float32)
  x0 = x0 / 127.5 - 1.0
  y = np.full((1,), task.cond_label, np.int32)
  x1 = sampling.sample(
    lambda x, t: task.model.apply({"params": params}, x, t, y),
    x0[None],
    num_steps=config.eval.num_steps,
    prediction=config.objective.prediction,
  )[0]
  h, w = rgb.shape[:2]
  up = np.stack(
    [
      np.asarray(Image.fromarray(np.asarray(x1[..., c]), mode="F").resize((w, h), Image.BILINEAR))
      for c in range(3)
    ],
    -1,
  )
  mu = np.asarray(task.centroids[: task.num_classes])
  return np.argmin(((up[:, :, None, :] - mu) ** 2).sum(-1), axis=-1)


def test_segments_a_photograph_in_three_lines(workdir, tmp_path):
  from flowseg_jax import Segmenter

  seg = Segmenter.from_workdir(workdir)
  labels = seg(PHOTO)

  photo = np.asarray(Image.open(PHOTO).convert("RGB"))
  assert labels.shape == photo.shape[:2] == (600, 512)
  assert labels.dtype == np.int32
  assert labels.min() >= 0 and labels.max() < seg.num_classes
  # Independent path: same result pixel for pixel (ties aside, which a photo does not hit).
  np.testing.assert_array_equal(labels, _reference_labels(seg.config, seg.params, photo))
  # `flowseg predict` writes exactly these labels.
  assert (
    main.run(["predict", f"--workdir={workdir}", f"--input={PHOTO}", f"--output={tmp_path}"]) == 0
  )
  written = np.asarray(Image.open(tmp_path / "grace_hopper_label.png"))
  np.testing.assert_array_equal(written, labels)
  mask = np.asarray(Image.open(tmp_path / "grace_hopper_mask.png"))
  np.testing.assert_array_equal(mask, seg.colourise(labels))
  np.testing.assert_array_equal(mask, seg.palette[labels])


def test_same_labels_on_one_and_eight_devices(workdir, seg):
  one = inference.Segmenter.from_workdir(
    workdir, mesh=sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  )
  assert one.mesh.size == 1 and seg.mesh.size == 8
  photo = np.asarray(Image.open(PHOTO).convert("RGB"))
  small = photo[::7, ::5]
  for a, b in zip(
    one.segment_batch([photo, small]), seg.segment_batch([photo, small]), strict=True
  ):
    np.testing.assert_array_equal(a, b)


def test_restores_ema_weights_only(workdir, seg):
  _, _, state, step = train_state.restore_train_state(tiny_config(), workdir)
  assert seg.step == step == 6
  same = jax.tree.map(
    lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
    seg.params,
    state.ema_params["denoiser"],
  )
  assert all(jax.tree.leaves(same))
  online = inference.Segmenter.from_workdir(workdir, use_ema=False)
  differs = jax.tree.map(
    lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), online.params, seg.params
  )
  assert any(jax.tree.leaves(differs))  # EMA (decay 0.99) and online weights differ after 6 steps


def test_repa_config_needs_no_teacher(workdir, tmp_path, seg):
  """A REPA run's workdir predicts without its DINOv2 teacher (here: a teacher path that is gone)."""
  copy = str(tmp_path / "repa_run")
  shutil.copytree(workdir, copy)
  with open(os.path.join(copy, "config.json")) as f:
    config = json.load(f)
  config["repa"].update(enabled=True, teacher_dir="/nonexistent/dinov2", align_layer=2)
  with open(os.path.join(copy, "config.json"), "w") as f:
    json.dump(config, f)
  repa_seg = inference.Segmenter.from_workdir(copy)
  assert repa_seg.config.repa.enabled
  image = np.asarray(Image.open(PHOTO).convert("RGB"))[::9, ::9]
  np.testing.assert_array_equal(repa_seg(image), seg(image))


def test_input_kinds_batches_and_errors(seg):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
  grey = rng.integers(0, 256, (29, 31), dtype=np.uint8)
  rgba = np.concatenate([rgb, np.full((37, 45, 1), 7, np.uint8)], axis=-1)
  from_array = seg(rgb)
  assert from_array.shape == (37, 45)
  np.testing.assert_array_equal(seg(Image.fromarray(rgb)), from_array)
  np.testing.assert_array_equal(seg(rgba), from_array)  # alpha dropped
  np.testing.assert_array_equal(seg(grey), seg(np.repeat(grey[..., None], 3, -1)))
  np.testing.assert_array_equal(seg(grey[..., None]), seg(grey))
  batch = seg.segment_batch([rgb, grey, rgba] * 4)  # 12 images, 8 devices: padded calls
  assert [b.shape for b in batch[:3]] == [(37, 45), (29, 31), (37, 45)]
  for got, want in zip(batch, [from_array, seg(grey), from_array] * 4, strict=True):
    np.testing.assert_array_equal(got, want)
  config = seg.config.copy_and_resolve_references()
  config.eval.slide_short_side, config.eval.slide_stride = 48, (16, 16)
  slide = inference.Segmenter(config, seg.params, mesh=seg.mesh)(rgb, mode="slide")
  assert slide.shape == (37, 45) and slide.dtype == np.int32
  config.eval.slide_stride = (341, 341)  # mmseg's ADE20K stride on a 32² model: gaps
  with pytest.raises(ValueError, match=r"slide_stride=\(341, 341\) must be positive and at most"):
    inference.Segmenter(config, seg.params, mesh=seg.mesh)(rgb, mode="slide")
  with pytest.raises(ValueError, match="uint8"):
    seg(rgb.astype(np.float32))
  with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
    seg(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ValueError, match="missing.jpg"):
    seg("missing.jpg")
  with pytest.raises(ValueError, match="mode"):
    seg(rgb, mode="tiles")


def test_confidence_is_the_margin_to_the_runner_up_class():
  """1 on a class colour, 0 halfway to another class, falling in between; the labels are those of
  the plain decode; everywhere it is the margin as defined, against a brute-force runner-up."""
  mu = centroids.kronecker_centroids(5)
  a, b = mu[1], mu[3]  # a pair whose midpoint has no other centroid nearer (checked below)
  s = np.linspace(0.0, 0.5, 6, dtype=np.float32)[:, None]
  colours = ((1 - s) * a + s * b)[None]  # (1, 6, 3): from mu_1 to the midpoint of mu_1, mu_3
  labels, confidence = inference_host.decode_colours_host(colours, mu, confidence=True)
  np.testing.assert_array_equal(labels, inference_host.decode_colours_host(colours, mu))
  assert (labels[0, :-1] == 1).all()
  np.testing.assert_allclose(confidence[0, [0, -1]], [1.0, 0.0], atol=1e-5)
  assert (np.diff(confidence[0]) < 0).all()  # falls all the way from mu_1 to the midpoint
  # Off the segment: the margin as defined, against a brute-force runner-up.
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (7, 9, 3)).astype(np.float32)
  labels, confidence = inference_host.decode_colours_host(x, mu, confidence=True)
  d = np.linalg.norm(x[..., None, :] - mu, axis=-1)
  order = np.argsort(d, axis=-1, kind="stable")
  first, second = order[..., 0], order[..., 1]
  want = (np.take_along_axis(d, second[..., None], -1)[..., 0] - d.min(-1)) / np.linalg.norm(
    mu[first] - mu[second], axis=-1
  )
  np.testing.assert_array_equal(labels, first)
  np.testing.assert_allclose(confidence, want, atol=1e-5)
  assert ((confidence >= 0) & (confidence <= 1)).all()


def test_views_are_decoded_by_mean_probability_not_mean_colour():
  """Two views on class 0's and class 4's colours: their mean colour is nearest class 1 (a class
  neither view saw), the mean of the potential's probabilities picks one of the two. One view
  decodes as the plain nearest centroid."""
  mu = centroids.kronecker_centroids(5)
  views = np.stack([np.broadcast_to(mu[0], (2, 3, 3)), np.broadcast_to(mu[4], (2, 3, 3))])
  mean_colour = inference_host.decode_colours_host(views.mean(0), mu)
  assert (mean_colour == 1).all()
  by_probability = np.asarray(centroids.decode_views(views, mu))
  assert np.isin(by_probability, [0, 4]).all()
  rng = np.random.default_rng(2)
  one = rng.uniform(-1, 1, (1, 6, 7, 3)).astype(np.float32)
  np.testing.assert_array_equal(
    centroids.decode_views(one, mu), inference_host.decode_colours_host(one[0], mu)
  )


def test_segmenter_returns_confidence_with_the_same_labels(seg):
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (40, 28, 3), dtype=np.uint8)
  labels, confidence = seg(image, return_confidence=True)
  np.testing.assert_array_equal(labels, seg(image))
  assert confidence.shape == (40, 28) and confidence.dtype == np.float32
  assert 0 <= confidence.min() and confidence.max() <= 1
  pairs = seg.segment_batch([image, image[:20]], return_confidence=True)
  np.testing.assert_array_equal(pairs[0][1], confidence)
  assert pairs[1][0].shape == pairs[1][1].shape == (20, 28)


def test_trajectory_and_num_steps(seg):
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the model's own size: no resizing
  states = seg.trajectory(image, num_steps=3)
  assert states.shape == (4, 32, 32, 3) and states.dtype == np.float32
  np.testing.assert_allclose(states[0], image / 127.5 - 1.0, atol=1e-6)
  decoded = inference_host.decode_colours_host(states[-1], seg.centroids)
  np.testing.assert_array_equal(seg(image, num_steps=3), decoded)
  assert not np.allclose(states[1], states[0])  # the flow moves


def _listed(x):
  return list(x) if isinstance(x, tuple) else x


def test_config_json_round_trip(seg):
  """workdir/config.json comes back with its types: tuples, typed None fields, nested groups."""
  for spec in ("demo.py:smoke", "flowseg_ade20k.py:stage=1"):
    config = main.load_config(os.path.join(REPO, "configs", spec), None, [], from_workdir=False)
    back = files.config_from_json(config.to_json_best_effort())
    want, got = config.to_dict(), back.to_dict()
    # Lists of lists hold no type information: the rules' inner tuples come back as lists.
    assert [list(map(_listed, r)) for r in want.pop("sharding_rules")] == got.pop("sharding_rules")
    assert got == want
    assert isinstance(back.input.image_size, tuple) and isinstance(back.eval.slide_stride, tuple)
  back.input.data_dir = "/data/ade"  # a None-valued str field keeps its type
  with pytest.raises(TypeError):
    back.input.data_dir = 3
  assert seg.config.input.image_size == (32, 32)


def test_readme_quick_start_shows_the_three_lines():
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  quick = readme[readme.index("## Quick start") :]
  for line in (
    "from flowseg_jax import Segmenter",
    'seg = Segmenter.from_workdir("/tmp/flowseg_demo")',
    'labels = seg("photo.jpg")',
  ):
    assert line in quick, line


def test_semantic_segmenter_refuses_a_prompt(seg):
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="takes no prompt"):
    seg(image, prompt="a photo of a cat")
  with pytest.raises(ValueError, match="takes no prompt"):
    seg.trajectory(image, prompt=0)
