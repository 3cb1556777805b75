"""Prompt tokenisation, encoding (against transformers.Qwen3Model) and the split feature cache."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="transformers is not installed (the `text` extra)")
pytest.importorskip("tokenizers", reason="tokenizers is not installed (the `text` extra)")

from flowseg_jax.tasks import prompts  # noqa: E402
from tests import qwen3_testutil  # noqa: E402

PROMPTS = ["the cat", "a big red ball on the left of the man", "dog", "zebra dog"]


@pytest.fixture(scope="module")
def encoder_and_hf(tmp_path_factory):
  path = tmp_path_factory.mktemp("qwen3")
  hf = qwen3_testutil.make_model_dir(path)
  enc = prompts.TextEncoder.from_pretrained(path, max_length=6, embed_dim=40, batch_size=3)
  return enc, hf


def test_tokenize_cut_and_right_pad(encoder_and_hf):
  enc, _ = encoder_and_hf
  ids, mask = enc.tokenize(PROMPTS)
  v = qwen3_testutil.VOCAB
  assert enc.pad_id == v["<|endoftext|>"] == 0
  np.testing.assert_array_equal(ids[0], [v["the"], v["cat"], 0, 0, 0, 0])
  np.testing.assert_array_equal(mask[0], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(ids[1], [v[w] for w in "a big red ball on the".split()])  # cut
  assert mask[1].all()
  np.testing.assert_array_equal(ids[3, :2], [v["<unk>"], v["dog"]])


def test_embeddings_match_transformers_and_fit_features(encoder_and_hf):
  enc, hf = encoder_and_hf
  emb, mask = enc(PROMPTS)  # 4 prompts in batches of 3: a padded last batch
  assert emb.shape == (4, 6, 40) and emb.dtype == np.float32
  ids, want_mask = enc.tokenize(PROMPTS)
  np.testing.assert_array_equal(mask, want_mask)
  with torch.no_grad():
    want = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
  want = want.last_hidden_state.numpy()
  np.testing.assert_allclose(emb[..., :32], want, atol=1e-5, rtol=0)  # padded positions too
  assert np.all(emb[..., 32:] == 0)  # 32 features zero-padded to 40
  np.testing.assert_array_equal(prompts.fit_features(emb, 16), emb[..., :16])


def test_a_cache_model_trains_on_streamed_features_and_segments_a_new_sentence(tmp_path, capsys):
  """`flowseg cache-text` encodes a split's prompts with the Qwen3 of encoder_dir into its cache
  (bfloat16 rows); training batches carry those features; at inference the model encodes a
  sentence it never saw with the same encoder, and the cached features of a prompt of the list
  are the encoder's (to bfloat16's precision)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from flowseg_jax import defaults, inference, main, tasks
  from flowseg_jax.data import pipeline, synthetic
  from flowseg_jax.data import text_cache as text_cache_lib

  qwen3_testutil.make_model_dir(tmp_path / "qwen3")
  overrides = [
    "--config.prompted.condition=cache",
    f"--config.prompted.encoder_dir={tmp_path / 'qwen3'}",
    f"--config.input.text_features={tmp_path / 'features'}",
  ]
  spec = "configs/rlfseg/demo.py:smoke"
  assert main.run(["cache-text", f"--config={spec}", "--split=train", *overrides]) == 0
  out = capsys.readouterr().out
  assert "train: chunk 1/1" in out and "sentences of 'train' are cached" in out
  cfg = defaults.load_config_file("configs/rlfseg/demo.py", "smoke")
  main.apply_overrides(cfg, main.split_overrides(overrides)[1])
  task = tasks.create_task(cfg)
  with pytest.raises(text_cache_lib.StaleFeatureCacheError, match="validation"):
    task.check_inputs(["train", cfg.input.eval_split])  # not built yet: one line says so
  task.check_inputs(["train"])
  want = prompts.TextEncoder.from_pretrained(tmp_path / "qwen3", max_length=8, embed_dim=32)
  batch = next(pipeline.create_train_iterator(cfg.input, seed=0))
  texts = [task.prompts[int(p)] for p in batch["prompt"]]
  np.testing.assert_allclose(batch["text"], want(texts)[0], rtol=1 / 64, atol=1e-2)  # bfloat16
  assert task.condition(batch) is batch["text"]
  params = nn.unbox(task.model.init(jax.random.key(0), *task.init_inputs((32, 32))))["params"]
  params["t2i"]["final_layer"]["kernel"] += 0.5  # the prompt made to matter
  seg = inference.Segmenter(cfg, params, task=task)
  image = synthetic.make_example(2, num_classes=8, size=(32, 32))[0]
  sentence = "the big dog on the left"
  assert seg(image, prompt=sentence).shape == (32, 32)
  np.testing.assert_allclose(seg.conditions([sentence]), want([sentence])[0], atol=1e-6)
  x, t = jnp.zeros((1, 32, 32, 3)), jnp.asarray([0.5])
  streamed = task.apply(params, x, t, jnp.asarray(batch["text"][:1]))  # training's path
  encoded = task.apply(params, x, t, seg.conditions([texts[0]]))
  np.testing.assert_allclose(streamed, encoded, atol=0.05)
  with pytest.raises(ValueError, match="not prompt ids"):
    task.apply(params, x, t, jnp.asarray([3], jnp.int32))
