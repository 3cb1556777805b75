"""A tiny random Hugging Face Qwen3 directory (weights, config, tokenizer) for the text tests."""

import json
import os

WORDS = ["a", "cat", "dog", "the", "left", "right", "red", "ball", "on", "of", "man", "big"]
PAD = "<|endoftext|>"
VOCAB = {PAD: 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}


def tiny_config(**overrides):
  from transformers import Qwen3Config

  kw = dict(
    vocab_size=len(VOCAB) + 2,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention
    head_dim=16,
    max_position_embeddings=64,
    rope_theta=1000.0,
    rms_norm_eps=1e-6,
    pad_token_id=0,
  )
  return Qwen3Config(**{**kw, **overrides})


def randomize(module, seed=0):
  """Weights far from Hugging Face's small init: norm scales 1 +- 0.2, others N(0, 0.3)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.3 * noise)
  return module


def write_tokenizer(path):
  """A word-level `tokenizers` tokenizer (whitespace split) with Qwen's pad token."""
  from tokenizers import Tokenizer, models, pre_tokenizers

  tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"pad_token": PAD, "padding_side": "right"}, f)


def make_model_dir(path, *, causal_lm=False, shard=True, seed=0, **config):
  """Saves a random tiny Qwen3 (base or causal LM) with `save_pretrained`; returns the module."""
  import torch
  from transformers import Qwen3ForCausalLM, Qwen3Model

  torch.manual_seed(seed)
  cls = Qwen3ForCausalLM if causal_lm else Qwen3Model
  module = randomize(cls(tiny_config(**config)), seed).eval()
  module.save_pretrained(path, max_shard_size="20KB" if shard else "1GB")
  write_tokenizer(path)
  return module.model if causal_lm else module
