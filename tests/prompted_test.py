"""The prompted (RLFSeg) task: data, network call, loss, training, Segmenter(prompt=), CLI."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from flowseg_jax import (
  centroids,
  defaults,
  flow,
  inference,
  inference_host,
  main,
  tasks,
  train,
  train_step,
)
from flowseg_jax.data import datasets, pipeline, prompted, synthetic
from flowseg_jax.evaluators import refer_iou


def _config(arg="smoke"):
  return defaults.load_config_file("configs/rlfseg/demo.py", arg)


def test_one_prompted_example_per_class_present():
  cfg = _config()
  src, label_map = datasets.make_semantic_source(cfg.input, "train", False)
  psrc = prompted.PromptedSource(src, label_map, 8, min_pixels=16)
  expect = []
  for i in range(len(src)):
    _, label = synthetic.make_example(i, num_classes=8, size=(32, 32), seed=0)
    counts = np.bincount(label.ravel(), minlength=256)[:8]
    expect += [(i, c) for c in np.flatnonzero(counts >= 16)]
  assert [tuple(r) for r in psrc.index] == expect
  rec = psrc[3]
  i, c = expect[3]
  _, label = synthetic.make_example(i, num_classes=8, size=(32, 32), seed=0)
  np.testing.assert_array_equal(rec["label"] == 1, label == c)
  np.testing.assert_array_equal(rec["label"] == 255, label == 255)
  assert int(rec["prompt"]) == c
  assert datasets.prompt_list(cfg.input)[c] == f"a photo of texture_{c:03d}"


def test_zero_shot_split_keeps_train_and_eval_classes_apart():
  cfg = _config("smoke,zeroshot")
  train_ids = {int(r["prompt"]) for r in datasets.make_source(cfg.input, "train", False)[0]}
  eval_ids = {int(r["prompt"]) for r in datasets.make_source(cfg.input, "validation", False)[0]}
  assert train_ids <= {0, 1, 2, 3, 4, 5} and eval_ids <= {6, 7} and train_ids and eval_ids


def test_image_grouped_order_keeps_each_images_examples_together():
  cfg = _config()
  src = datasets.make_source(cfg.input, "train", False)[0]
  order = prompted.ImageGroupedOrder(src, seed=3)
  n = len(src)
  e0, e1 = order.order(0).copy(), order.order(1).copy()
  for epoch in (e0, e1):  # every record once per epoch, one image's records contiguous
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    images = src.image_ids()[epoch]
    starts = np.flatnonzero(np.r_[True, images[1:] != images[:-1]])
    assert len(starts) == len(np.unique(images))
  assert not np.array_equal(e0, e1)  # reshuffled every epoch
  np.testing.assert_array_equal(prompted.ImageGroupedOrder(src, seed=3).order(1), e1)
  assert order(n + 2)["name"] == src[int(e1[2])]["name"]
  cfg.input.prompted.group_by_image = True
  batch = next(pipeline.create_train_iterator(cfg.input, seed=0, process_count=1, process_index=0))
  first = prompted.ImageGroupedOrder(src, seed=0).order(0)[: len(batch["prompt"])]
  names = [src[int(i)]["name"].split(":")[0] for i in first]
  assert len(set(names)) < len(names)  # a batch holds one image under several prompts
  assert [int(src[int(i)]["prompt"]) for i in first] == batch["prompt"].tolist()


def test_wrong_prompts_are_another_examples_and_never_the_own():
  ids = [3, 3, 5, 1, 3, 5, 2, 2]
  wrong = refer_iou.wrong_prompts(ids, 8)
  assert all(w != i for w, i in zip(wrong, ids, strict=True))
  assert wrong.tolist() == [5, 5, 2, 2, 5, 3, 5, 1]  # example i + 4, or the next that differs
  assert refer_iou.wrong_prompts([7, 7], 8).tolist() == [0, 0]
  with pytest.raises(ValueError, match="two prompts"):
    refer_iou.wrong_prompts([0, 0], 1)


class _OracleSegmenter:
  """Predicts exactly the prompted class's pixels (from the semantic labels): a model that uses
  its prompt perfectly."""

  def __init__(self, config):
    self.config = config
    self.prompts = datasets.prompt_list(config.input)
    src, _ = datasets.make_semantic_source(config.input, "validation", False)
    self.labels = {np.asarray(r["image"]).tobytes(): np.asarray(r["label"]) for r in src}

  def segment_stream(self, items, num_items, *, num_steps=None, mode=None, adaptive=None):
    for key, rgb, pid in items:
      yield key, None, (self.labels[np.asarray(rgb).tobytes()] == pid).astype(np.int32), 1.0


def test_wrong_prompt_giou_drops_for_a_model_that_uses_its_prompt():
  cfg = _config()
  cfg.input.synthetic.num_eval = 16
  cfg.prompted.eval_wrong_prompt = True
  evaluator = refer_iou.ReferIouEvaluator(_OracleSegmenter(cfg))
  r = evaluator.run(evaluator.settings())
  assert r["giou"] == pytest.approx(1.0) and r["ciou"] == pytest.approx(1.0)
  assert r["wrong_ciou"] == 0.0  # another class's region never overlaps the target
  assert r["wrong_giou"] == 0.0


def test_semantic_task_calls_the_model_as_before():
  cfg = defaults.load_config_file("configs/demo.py", "smoke")
  task = tasks.create_task(cfg)
  x = jnp.ones((2, 8, 8, 3)) * 0.1
  t = jnp.asarray([0.2, 0.7])
  params = task.model.init(jax.random.key(0), x, t, jnp.zeros((2,), jnp.int32))["params"]
  y = jnp.full((2,), task.model.num_classes, jnp.int32)
  np.testing.assert_array_equal(
    task.apply(params, x, t, task.condition({"image": x})),
    task.model.apply({"params": params}, x, t, y),
  )


@pytest.fixture(scope="module")
def prompted_setup():
  setup = train_step.TrainSetup(_config())
  params = setup.init_params(jax.random.key(0))
  return setup, nn.unbox(params)


def test_prompted_loss_is_flowseg_loss_with_two_centroids(prompted_setup):
  setup, params = prompted_setup
  np.testing.assert_array_equal(np.asarray(setup.task.centroids), [[-1, -1, -1], [1, 1, 1]])
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.choice([0, 1, 255], (2, 32, 32)), jnp.int32)
  prompts = jnp.asarray([1, 6], jnp.int32)
  key = jax.random.key(3)
  total = jnp.sum(labels != 255)
  loss, _ = train_step.loss_fn(params, None, images, labels, key, total, prompts, setup=setup)
  obj = setup.config.objective
  t = flow.sample_t(key, (2,), distribution=obj.t_distribution, mean=obj.t_mean, std=obj.t_std)
  x_t = flow.interpolant(images, labels, t, setup.task.centroids)
  out = setup.task.apply(params["denoiser"], x_t, t, prompts)
  want, _ = flow.flowseg_loss(
    out, images, labels, t, setup.task.centroids, **setup.task.objective.loss_options()
  )
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
  assert not obj.reshape  # RLFSeg's plain rectified-flow target by default
  # The prompt conditions the network (the zero-initialised final layer made non-zero).
  net = jax.tree.map(lambda a: a, params["denoiser"])
  final = net["t2i"]["final_layer"]
  final["kernel"] = jnp.ones_like(final["kernel"])
  a = setup.task.apply(net, x_t, t, prompts)
  b = setup.task.apply(net, x_t, t, prompts[::-1])
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_training_gradient_reaches_exactly_the_batchs_prompt_rows(prompted_setup):
  """The loss trains the table rows of the batch's prompts and no other: prompts are routed to
  their own text features, and those features reach the output (zero-initialised final layer
  made non-zero, as after the first steps)."""
  setup, params = prompted_setup
  params = jax.tree.map(lambda a: a, params)
  final = params["denoiser"]["t2i"]["final_layer"]
  final["kernel"] = 0.1 * jnp.ones_like(final["kernel"])
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.choice([0, 1], (2, 32, 32)), jnp.int32)
  prompts = jnp.asarray([2, 5], jnp.int32)

  def loss(p):
    return train_step.loss_fn(
      p, None, images, labels, jax.random.key(0), jnp.sum(labels != 255), prompts, setup=setup
    )[0]

  grad = np.asarray(jax.grad(loss)(params)["denoiser"]["prompt_table"])
  norms = np.linalg.norm(grad.reshape(grad.shape[0], -1), axis=1)
  assert norms[2] > 1e-6 and norms[5] > 1e-6, norms
  np.testing.assert_array_equal(np.delete(norms, [2, 5]), 0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rlfseg"))
  result = train.train_and_evaluate(_config("smoke,refine"), workdir)
  return workdir, result


def test_training_reports_prompted_metrics_and_refines(trained):
  workdir, result = trained
  assert 0 <= result["giou"] <= 1 and 0 <= result["ciou"] <= 1
  assert 0 <= result["wrong_giou"] <= 1  # config.prompted.eval_wrong_prompt is on by default
  assert result["baseline_ciou"] == 0.0  # all background: no intersection anywhere
  with open(os.path.join(workdir, "eval", "step_6.json")) as f:
    saved = json.load(f)
  assert saved["giou"] == pytest.approx(result["giou"]) and saved["num_steps"] == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert "refined_pixels" in rows[-1]


def test_segmenter_takes_prompts(trained):
  workdir, _ = trained
  seg = inference.Segmenter.from_workdir(workdir)
  image = synthetic.make_example(5, num_classes=8, size=(40, 24))[0]
  by_text = seg(image, prompt="A photo of  TEXTURE_002")
  by_id = seg(image, prompt=2)
  assert by_text.shape == (40, 24) and set(np.unique(by_text)) <= {0, 1}
  np.testing.assert_array_equal(by_text, by_id)
  with pytest.raises(ValueError, match="a photo of texture_000"):
    seg(image, prompt="a photo of a cat")
  with pytest.raises(ValueError, match="needs a prompt"):
    seg(image)
  one = seg(image, prompt=2, num_steps=1, adaptive=True)
  assert one.shape == (40, 24)


def test_cli_predict_with_prompt(trained, tmp_path):
  workdir, _ = trained
  img = tmp_path / "in.png"
  Image.fromarray(synthetic.make_example(1, num_classes=8, size=(32, 32))[0]).save(img)
  out = tmp_path / "out"
  argv = ["predict", "--workdir", workdir, "--input", str(img), "--output", str(out)]
  assert main.run(argv + ["--prompt", "a photo of texture_001"]) == 0
  label = np.asarray(Image.open(out / "in_label.png"))
  assert label.shape == (32, 32) and set(np.unique(label)) <= {0, 1}
  assert main.run(argv) == 2  # a prompted run needs --prompt


def test_centroid_table_is_kronecker_two():
  np.testing.assert_array_equal(centroids.kronecker_centroids(2), [[-1, -1, -1], [1, 1, 1]])


def test_every_segmenter_method_honours_its_prompt(trained):
  """__call__, segment_batch, segment_prompts and trajectory each segment with the prompt they are
  given (checked against the ODE run by hand with that prompt), and refuse a missing one."""
  workdir, _ = trained
  seg = inference.Segmenter.from_workdir(workdir)
  params = jax.tree.map(lambda a: a, seg.params)  # the prompt made to matter, as in the loss test
  final = params["t2i"]["final_layer"]
  final["kernel"] = 0.5 * jnp.ones_like(final["kernel"])
  seg = inference.Segmenter(seg.config, params, task=seg.task, mesh=seg.mesh)
  task = seg.task
  image = synthetic.make_example(5, num_classes=8, size=(40, 24))[0]
  x0 = inference_host.network_input(image, seg.config, "whole")[0]

  def by_hand(prompt_id):
    cond = jnp.full((1,), prompt_id, jnp.int32)
    apply_fn = lambda x, t: task.apply(params, x, t, cond)
    colours = np.asarray(task.sampler_options().sample(apply_fn, jnp.asarray(x0[None])))[0]
    return colours, seg.decode(colours, image.shape[:2])

  (c2, want2), (c5, want5) = by_hand(2), by_hand(5)
  assert (want2 != want5).any()  # the two prompts give different masks: the test can tell
  np.testing.assert_array_equal(seg(image, prompt=2), want2)
  np.testing.assert_array_equal(seg(image, prompt=seg.prompts[5]), want5)
  for got, want in zip(seg.segment_batch([image, image], prompts=[5, 2]), [want5, want2]):
    np.testing.assert_array_equal(got, want)
  got = seg.segment_prompts([image, image], [seg.prompts[2], 5])
  np.testing.assert_array_equal(got[0], want2)
  np.testing.assert_array_equal(got[1], want5)
  np.testing.assert_allclose(seg.trajectory(image, prompt=5)[-1], c5, atol=1e-5)
  np.testing.assert_allclose(seg.trajectory(image, prompt=2)[-1], c2, atol=1e-5)
  for call in (
    lambda: seg(image),
    lambda: seg.segment_batch([image]),
    lambda: seg.trajectory(image),
    lambda: seg.segment_batch([image, image], prompts=[2, None]),
  ):
    with pytest.raises(ValueError, match="needs a prompt"):
      call()
  with pytest.raises(ValueError, match="one per image"):
    seg.segment_prompts([image, image], [2])
