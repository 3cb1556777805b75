"""Prompt tokenisation, encoding (against transformers.Qwen3Model) and the on-disk cache."""

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


def test_cache_computes_once_and_refuses_stale(encoder_and_hf, tmp_path, monkeypatch):
  enc, _ = encoder_and_hf
  emb, mask = prompts.cached_prompt_embeddings(tmp_path, PROMPTS, enc)
  files = list(tmp_path.iterdir())
  assert len(files) == 1 and files[0].name.startswith("prompts-")

  def fail(*_):
    raise AssertionError("the encoder ran although the cache exists")

  monkeypatch.setattr(prompts.TextEncoder, "__call__", fail)
  emb2, mask2 = prompts.cached_prompt_embeddings(tmp_path, PROMPTS, enc)
  np.testing.assert_array_equal(emb2, emb)
  np.testing.assert_array_equal(mask2, mask)
  # Another prompt order is another key (another file), never a silent reuse.
  key = prompts.cache_key(PROMPTS[::-1], enc.identity, enc.max_length, enc.embed_dim)
  assert not (tmp_path / prompts.cache_path(tmp_path, key)).exists()
  with pytest.raises(prompts.StalePromptCacheError, match="prompts differ"):
    prompts.load_prompt_cache(files[0], PROMPTS[:3])
  with pytest.raises(prompts.StalePromptCacheError, match="encoder"):
    prompts.load_prompt_cache(files[0], PROMPTS, identity="another encoder")
  with pytest.raises(prompts.StalePromptCacheError, match="embed_dim 40 != expected 2048"):
    prompts.load_prompt_cache(files[0], embed_dim=2048)


def test_bfloat16_storage_and_identity(encoder_and_hf, tmp_path):
  enc, _ = encoder_and_hf
  emb, mask = enc(PROMPTS[:2])
  path = tmp_path / "c.npz"
  prompts.save_prompt_cache(
    path, PROMPTS[:2], emb, mask, identity=enc.identity, storage_dtype="bfloat16"
  )
  back, _, cached = prompts.load_prompt_cache(path, PROMPTS[:2], identity=enc.identity)
  assert cached == PROMPTS[:2] and back.dtype == np.float32
  np.testing.assert_allclose(back, emb, rtol=1 / 128, atol=1e-6)  # 8-bit mantissa
  assert 0 < np.abs(back - emb).max()
  with pytest.raises(ValueError, match="storage_dtype"):
    prompts.save_prompt_cache(path, PROMPTS[:2], emb, mask, identity="x", storage_dtype="int8")


def test_a_cache_model_segments_a_sentence_it_was_not_cached_for(tmp_path):
  """A model on frozen Qwen3 features encodes a new sentence with its encoder at inference; the
  prompt list's cache is read only when training needs it, and gives the same features."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from flowseg_jax import defaults, inference, tasks
  from flowseg_jax.data import synthetic

  qwen3_testutil.make_model_dir(tmp_path / "qwen3")
  cfg = defaults.load_config_file("configs/rlfseg/demo.py", "smoke")
  cfg.prompted.condition = "cache"
  cfg.prompted.encoder_dir = str(tmp_path / "qwen3")
  cfg.prompted.cache_dir = str(tmp_path / "cache")
  task = tasks.create_task(cfg)
  params = nn.unbox(task.model.init(jax.random.key(0), *task.init_inputs((32, 32))))["params"]
  params["t2i"]["final_layer"]["kernel"] += 0.5  # the prompt made to matter
  seg = inference.Segmenter(cfg, params, task=task)
  image = synthetic.make_example(2, num_classes=8, size=(32, 32))[0]
  sentence = "the big dog on the left"
  mask = seg(image, prompt=sentence)
  assert mask.shape == (32, 32) and task._features is None  # no prompt-list cache was built
  want = prompts.TextEncoder.from_pretrained(tmp_path / "qwen3", max_length=8, embed_dim=32)
  np.testing.assert_allclose(seg.conditions([sentence]), want([sentence])[0], atol=1e-6)
  x, t = jnp.zeros((1, 32, 32, 3)), jnp.asarray([0.5])
  by_id = task.apply(params, x, t, jnp.asarray([3], jnp.int32))  # training's path: the cache
  assert any((tmp_path / "cache").iterdir())
  np.testing.assert_allclose(by_id, task.apply(params, x, t, seg.conditions([3])), atol=1e-6)
