"""Free-text prompts: the word tokenizer, the `text` demo variant (a small Qwen3 trained with the
denoiser), sentences never seen in training through the Segmenter and the CLI, and the prompt-use
metric."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("tokenizers", reason="tokenizers is not installed (the `text` extra)")

from flowseg_jax import defaults, inference, inference_host, main, tasks
from flowseg_jax.data import datasets, synthetic
from flowseg_jax.evaluators import refer_iou
from flowseg_jax.tasks import prompts

UNSEEN = "find the dog on the left"  # in no prompt list; 'dog', 'on', 'left': [UNK]


def _config(arg="text,smoke"):
  return defaults.load_config_file("configs/rlfseg/demo.py", arg)


def test_word_tokenizer_is_built_in_code_and_deterministic():
  words = ["the", "Red", "ball", "a", "ball"]
  tok = prompts.word_tokenizer(words)
  assert tok.to_str() == prompts.word_tokenizer(list(reversed(words))).to_str()
  assert tok.get_vocab() == {"[PAD]": 0, "[UNK]": 1, "a": 2, "ball": 3, "red": 4, "the": 5}
  assert tok.encode("The red, BALL zebra", add_special_tokens=False).ids == [5, 4, 1, 3, 1]
  assert prompts.prompt_words(["The red, ball"]) == [",", "ball", "red", "the"]
  with pytest.raises(ValueError, match="vocabulary is empty"):
    prompts.word_tokenizer([])


def test_text_variant_prompts_are_phrasings_of_named_classes():
  cfg = _config()
  names = cfg.input.prompted.names
  plist = datasets.prompt_list(cfg.input)
  assert len(plist) == 5 * 8 and plist[8 + 6] == f"the {names[6]} region"
  assert plist[3 * 8 + 2] == "the grey checked object"  # the first held-out phrasing
  for split, allowed in (("train", {0, 1, 2}), ("validation", {3, 4})):
    src = datasets.make_source(cfg.input, split, False)[0]
    for (i, c), rec in zip(src.index, src, strict=True):
      template, cls = divmod(int(rec["prompt"]), 8)
      assert cls == c and template in allowed
      assert template == sorted(allowed)[(i + c) % len(allowed)]
  task = tasks.create_task(cfg)
  ids, mask = task.tokens
  assert ids.shape == (40, 8) and mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
  assert set(cfg.prompted.text.vocabulary) >= {"olive", "zigzag", "find", "shape"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("rlfseg_text"))
  argv = ["train", "--config", "configs/rlfseg/demo.py:text,smoke", "--workdir", workdir]
  assert main.run(argv) == 0
  return workdir


def _prompt_matters(seg):
  """The Segmenter with the zero-initialised final layer made non-zero (as after training), so
  that a prompt changes the mask and the tests can tell prompts apart."""
  params = jax.tree.map(lambda a: a, seg.params)
  final = params["t2i"]["final_layer"]
  final["kernel"] = 0.5 * jnp.ones_like(final["kernel"])
  return inference.Segmenter(seg.config, params, task=seg.task, mesh=seg.mesh)


def test_training_writes_prompt_use_next_to_wrong_prompt(trained):
  with open(os.path.join(trained, "eval", "step_6.json")) as f:
    saved = json.load(f)
  for key in ("giou", "wrong_giou", "use_own_giou", "use_other_giou", "prompt_use"):
    assert 0 <= abs(saved[key]) <= 1, key
  assert saved["prompt_use"] == pytest.approx(saved["use_own_giou"] - saved["use_other_giou"])
  assert all(p in datasets.prompt_list(_config().input)[24:] for p in saved["confusion"]["prompts"])


def test_segmenter_segments_a_sentence_never_seen_in_training(trained):
  seg = _prompt_matters(inference.Segmenter.from_workdir(trained))
  task, params = seg.task, seg.params
  assert task.encodes_text and UNSEEN not in seg.prompts
  image = synthetic.make_example(5, num_classes=8, size=(40, 24))[0]
  x0 = inference_host.network_input(image, seg.config, "whole")[0]

  def by_hand(text):  # the own encoder over the text's tokens, then the ODE, by hand
    ids, mask = task._text_encoder(None).tokenize([text])
    feats = task.model.apply({"params": params}, ids, mask, method=task.model.encode)
    apply_fn = lambda x, t: task.apply(params, x, t, feats)
    colours = np.asarray(task.sampler_options().sample(apply_fn, jnp.asarray(x0[None])))[0]
    return colours, seg.decode(colours, image.shape[:2])

  (c_new, want_new), (_, want_known) = by_hand(UNSEEN), by_hand(seg.prompts[6])
  assert (want_new != want_known).any()  # the test can tell the two prompts apart
  got = seg(image, prompt=UNSEEN)
  assert got.shape == (40, 24) and set(np.unique(got)) <= {0, 1}
  np.testing.assert_array_equal(got, want_new)
  np.testing.assert_array_equal(seg(image, prompt=UNSEEN), got)  # deterministic
  np.testing.assert_array_equal(seg(image, prompt=6), want_known)  # an id is its list's text
  batch = seg.segment_batch([image, image], prompts=[seg.prompts[6], UNSEEN])
  np.testing.assert_array_equal(batch[0], want_known)
  np.testing.assert_array_equal(batch[1], want_new)
  np.testing.assert_allclose(seg.trajectory(image, prompt=UNSEEN)[-1], c_new, atol=1e-5)
  # Training's path (prompt ids -> tokens -> encoder inside the step) gives the same features.
  x = jnp.asarray(x0[None])
  t = jnp.asarray([0.3])
  np.testing.assert_allclose(
    task.apply(params, x, t, jnp.asarray([6], jnp.int32)),
    task.apply(params, x, t, seg.conditions([seg.prompts[6]])),
    atol=1e-5,
  )


def test_a_text_model_folder_segments_new_sentences_as_its_workdir(trained, tmp_path):
  """`flowseg export` of a text model keeps its tokenizer's vocabulary and encoder weights: the
  folder segments a sentence never seen in training exactly as the workdir does."""
  out = str(tmp_path / "model")
  assert main.run(["export", "--workdir", trained, "--out", out]) == 0
  image = synthetic.make_example(3, num_classes=8, size=(32, 32))[0]
  from_workdir = _prompt_matters(inference.Segmenter.from_workdir(trained))
  from_folder = _prompt_matters(inference.Segmenter.from_pretrained(out))
  assert from_folder.task.encodes_text
  np.testing.assert_array_equal(from_folder.conditions([UNSEEN]), from_workdir.conditions([UNSEEN]))
  np.testing.assert_array_equal(
    from_folder(image, prompt=UNSEEN), from_workdir(image, prompt=UNSEEN)
  )


def test_prompt_features_are_cached_and_bounded(trained, monkeypatch):
  seg = inference.Segmenter.from_workdir(trained, prompt_cache_size=2)
  calls = []
  encode = seg.task.encode
  monkeypatch.setattr(
    seg.task, "encode", lambda p, texts: calls.append(list(texts)) or encode(p, texts)
  )
  first = seg.conditions(["a b", "a b", UNSEEN])
  assert calls == [["a b", UNSEEN]] and first.shape == (3, 8, 32)
  np.testing.assert_array_equal(first[0], first[1])
  again = seg.conditions([UNSEEN, "one pink ringed object"])
  assert calls[1:] == [["one pink ringed object"]]  # UNSEEN came from the cache
  np.testing.assert_array_equal(again[0], first[2])
  assert list(seg._prompt_features) == [UNSEEN, "one pink ringed object"]  # "a b" evicted


def test_every_method_needs_its_prompt(trained):
  seg = inference.Segmenter.from_workdir(trained)
  image = synthetic.make_example(5, num_classes=8, size=(32, 32))[0]
  for call in (
    lambda: seg(image),
    lambda: seg.segment_batch([image]),
    lambda: seg.segment_prompts([image, image], [UNSEEN, None]),
    lambda: seg.trajectory(image),
  ):
    with pytest.raises(ValueError, match="needs a prompt"):
      call()
  with pytest.raises(ValueError, match="non-empty text"):
    seg(image, prompt="  ")


def test_cli_predict_with_a_new_sentence(trained, tmp_path):
  img = tmp_path / "in.png"
  Image.fromarray(synthetic.make_example(1, num_classes=8, size=(32, 32))[0]).save(img)
  out = tmp_path / "out"
  argv = ["predict", "--workdir", trained, "--input", str(img), "--output", str(out)]
  assert main.run(argv + ["--prompt", UNSEEN]) == 0
  label = np.asarray(Image.open(out / "in_label.png"))
  assert label.shape == (32, 32) and set(np.unique(label)) <= {0, 1}
  assert main.run(argv) == 2  # still needs --prompt


def test_learned_table_refuses_an_unknown_prompt_in_one_line():
  task = tasks.create_task(_config("smoke"))
  assert not task.encodes_text
  with pytest.raises(ValueError) as e:
    task.condition_of(UNSEEN)
  message = str(e.value)
  assert "\n" not in message and "'a photo of texture_000'" in message and UNSEEN in message
  assert task.condition_of("a photo of texture_003") == 3


def test_prompt_confusion_on_a_hand_built_image():
  # One image of 10 pixels, pixel 9 ignored everywhere; three prompted examples.
  def mask(fg):
    m = np.zeros((1, 10), np.int32)
    m[0, list(fg)] = 1
    m[0, 9] = 255
    return m

  targets = np.stack([mask({0, 1}), mask({2, 3}), mask({4, 5, 6, 7})])
  preds = np.stack([mask({0, 1}), mask({2}), mask({0, 1, 4, 5, 9})]) == 1
  preds[2, 0, 9] = True  # predicted on the ignored pixel: not counted
  iou = refer_iou.pairwise_iou(preds, targets)
  np.testing.assert_allclose(iou, [[1, 0, 0], [0, 0.5, 0], [0.5, 0, 1 / 3]])
  conf = refer_iou.PromptConfusion.empty(4)
  conf = conf.add_image([0, 1, 2], preds, targets)
  conf = conf.add_image([3], preds[:1], targets[:1])  # one example: no pair
  conf = conf.add_image([1, 0], targets[[0, 0]] == 1, targets[[1, 0]])  # pred of 1 = mask of 0
  r = conf.compute(["p0", "p1", "p2", "p3"])
  # Pairs: 6 in the first image (own IoUs 1, .5, 1/3 twice each; cross IoUs sum .5), 2 in the
  # last (own: 0 for prompt 1, 1 for prompt 0; cross: 1 for prompt 1's pred on 0's mask, 0).
  assert r["use_pairs"] == 8
  assert r["use_own_giou"] == pytest.approx((2 * (1 + 0.5 + 1 / 3) + 0 + 1) / 8)
  assert r["use_other_giou"] == pytest.approx((0.5 + 1) / 8)
  assert r["prompt_use"] == pytest.approx(r["use_own_giou"] - r["use_other_giou"])
  assert r["confusion"]["prompts"] == ["p0", "p1", "p2"]
  assert r["confusion"]["giou"] == [[1.0, 0.0, 0.0], [0.5, 0.25, 0.0], [0.5, 0.0, 0.3333]]
  assert refer_iou.PromptConfusion.empty(3).compute(["a", "b", "c"]) == {}
  big = refer_iou.PromptConfusion.empty(refer_iou.MAX_CONFUSION_PROMPTS + 1)
  assert "confusion" not in big.add_image([0, 1], preds[:2], targets[:2]).compute([])


class _Fixed:
  """A Segmenter stand-in answering each prompt by a rule on the synthetic labels."""

  def __init__(self, config, rule):
    self.config, self.rule = config, rule
    self.prompts = datasets.prompt_list(config.input)
    src, _ = datasets.make_semantic_source(config.input, "validation", False)
    self.labels = {np.asarray(r["image"]).tobytes(): np.asarray(r["label"]) for r in src}

  def segment_stream(self, items, num_items, *, num_steps=None, mode=None, adaptive=None):
    for key, rgb, pid in items:
      labels = self.labels[np.asarray(rgb).tobytes()]
      yield key, None, self.rule(labels, int(pid) % 8).astype(np.int32), 1.0


@pytest.mark.parametrize(
  "rule, expect",
  [  # uses its prompt / answers with nothing / prompt-blind (always the image's first class)
    (lambda labels, c: labels == c, "uses"),
    (lambda labels, c: np.zeros_like(labels), "nothing"),
    (lambda labels, c: labels == np.min(labels), "blind"),
  ],
)
def test_prompt_use_tells_the_three_kinds_of_model_apart(rule, expect):
  cfg = _config("smoke")
  cfg.input.synthetic.num_eval = 16
  cfg.prompted.eval_wrong_prompt = True
  evaluator = refer_iou.ReferIouEvaluator(_Fixed(cfg, rule))
  r = evaluator.run(evaluator.settings())
  if expect == "uses":
    assert r["wrong_giou"] == 0 and r["prompt_use"] == pytest.approx(1.0)
  if expect == "nothing":  # the wrong-prompt figure alone would call this model prompt-aware
    assert r["wrong_giou"] == 0 and r["use_own_giou"] == 0 and r["prompt_use"] == 0
  if expect == "blind":
    assert r["wrong_giou"] > 0.2 and abs(r["prompt_use"]) < 0.2
  assert r["use_pairs"] > 16 and "prompt use" in evaluator.log_line(r)
