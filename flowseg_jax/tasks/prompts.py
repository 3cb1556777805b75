"""Prompt embeddings for PixNerd-T2I: tokenise, run the Qwen3 text encoder, cache a split on disk.

PixNerd-T2I's condition is the Qwen3 last hidden state over exactly `max_length` tokens (128):
prompts are tokenised without special tokens, cut to 128 tokens and right-padded with the pad
token to 128 (attention mask 0 on the padding), encoded, and the features padded with zeros or
cut to `embed_dim` (2048), as the official conditioner does. Padded positions keep the values the
encoder computes there (the T2I model attends to them; they are not zeroed).

Training never runs the language model: `build_split_features` (the `flowseg cache-text` command)
encodes a split's sentences once into its on-disk cache (`data.text_cache`), from which the data
loader reads each example's features.

A small encoder for CPU work (`condition='text'`): `word_tokenizer` builds a word-level
`tokenizers.Tokenizer` in code from a vocabulary list (no download; the same list gives the same
ids), and `builtin_encoder_config` a small Qwen3 (`models.qwen3`) whose width is the T2I model's
text width; the prompted denoiser trains it jointly (models/prompted.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import storage

TEXT_LENGTH = 128
TEXT_DIM = 2048
_DEFAULT_PAD = "<|endoftext|>"  # Qwen3's pad token
WORD_PAD, WORD_UNK = "[PAD]", "[UNK]"  # ids 0 and 1 of `word_tokenizer`


@dataclasses.dataclass
class TextEncoder:
  """A tokenizer (`tokenizers.Tokenizer`) and a Flax text model returning (B, L, D) states.

  Attributes:
    tokenizer: tokenises one prompt (`encode(text, add_special_tokens=False).ids`).
    model: a linen module, `model.apply({'params': params}, ids, mask)` -> (B, L, D).
    params: its parameters.
    identity: a string that names the encoder's weights and tokenizer (part of the cache key).
    pad_id: token id used for padding.
    max_length: tokens per prompt after cutting/padding.
    embed_dim: features after zero-padding/cutting.
    batch_size: prompts per encoder call.
  """

  tokenizer: Any
  model: Any
  params: Any
  identity: str
  pad_id: int
  max_length: int = TEXT_LENGTH
  embed_dim: int = TEXT_DIM
  batch_size: int = 16

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, dtype=jnp.float32, **kw) -> TextEncoder:
    """A Hugging Face Qwen3 directory (config.json, safetensors, tokenizer.json)."""
    from tokenizers import Tokenizer

    from flowseg_jax.convert import qwen3 as convert_qwen3

    path = storage.local_only(path, "text encoder folder", "its safetensors are memory-mapped")
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_path):
      raise FileNotFoundError(f"{tok_path} not found (the `tokenizers` file of the encoder).")
    tokenizer = Tokenizer.from_file(tok_path)
    pad = _DEFAULT_PAD
    tok_cfg = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
      with open(tok_cfg) as f:
        pad = _token_text(json.load(f).get("pad_token")) or pad
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
      raise ValueError(f"{path}: pad token {pad!r} is not in the tokenizer's vocabulary.")
    model, params = convert_qwen3.load_hf(path, dtype=dtype)
    return cls(tokenizer, model, params, encoder_identity(path), pad_id, **kw)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), each (N, max_length) int32: cut to max_length, right-padded with pad_id."""
    ids = np.full((len(prompts), self.max_length), self.pad_id, np.int32)
    mask = np.zeros((len(prompts), self.max_length), np.int32)
    for i, prompt in enumerate(prompts):
      tokens = self.tokenizer.encode(prompt, add_special_tokens=False).ids[: self.max_length]
      ids[i, : len(tokens)] = tokens
      mask[i, : len(tokens)] = 1
    return ids, mask

  def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (N, max_length, embed_dim) float32, mask (N, max_length) int32)."""
    ids, mask = self.tokenize(prompts)
    apply = functools.partial(_apply_encoder, self.model)
    out = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = slice(start, start + self.batch_size)
      n = len(ids[chunk])
      pad = self.batch_size - n  # fixed batch shape: one compilation
      i = np.pad(ids[chunk], ((0, pad), (0, 0)), constant_values=self.pad_id)
      m = np.pad(mask[chunk], ((0, pad), (0, 0)))
      out.append(np.asarray(apply(self.params, i, m), np.float32)[:n])
    hidden = np.concatenate(out) if out else np.zeros((0, self.max_length, 0), np.float32)
    return fit_features(hidden, self.embed_dim), mask


@functools.partial(jax.jit, static_argnums=0)
def _apply_encoder(model, params, ids, mask):  # compiled once per architecture and batch shape
  return model.apply({"params": params}, ids, mask)


def _word_pre_tokenizer():
  from tokenizers import normalizers, pre_tokenizers

  return normalizers.Lowercase(), pre_tokenizers.Whitespace()


def prompt_words(prompts: Sequence[str]) -> list[str]:
  """The sorted distinct words of `prompts` as `word_tokenizer` splits them (lowercased; runs of
  letters/digits and runs of punctuation are words)."""
  lower, split = _word_pre_tokenizer()
  words = set()
  for prompt in prompts:
    words.update(w for w, _ in split.pre_tokenize_str(lower.normalize_str(prompt)))
  return sorted(words)


def word_tokenizer(vocabulary: Sequence[str]):
  """A word-level `tokenizers.Tokenizer`: [PAD] = 0, [UNK] = 1 (any word not in the vocabulary),
  then the vocabulary's distinct words, sorted (ids do not depend on the list's order)."""
  from tokenizers import Tokenizer, models

  words = prompt_words(vocabulary)
  if not words:
    raise ValueError("config.prompted.text.vocabulary is empty: the word tokenizer needs words")
  vocab = {WORD_PAD: 0, WORD_UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
  tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=WORD_UNK))
  tokenizer.normalizer, tokenizer.pre_tokenizer = _word_pre_tokenizer()
  return tokenizer


def builtin_encoder_config(cfg, vocab_size: int, width: int):
  """`models.qwen3.Qwen3Config` of `config.prompted.text`: hidden size `width` (the T2I model's
  text width, so no padding or cutting of features is needed)."""
  from flowseg_jax.models.qwen3 import Qwen3Config

  return Qwen3Config(
    vocab_size=vocab_size,
    hidden_size=width,
    intermediate_size=int(cfg.intermediate_size),
    num_hidden_layers=int(cfg.num_layers),
    num_attention_heads=int(cfg.num_heads),
    num_key_value_heads=int(cfg.num_kv_heads),
    head_dim=int(cfg.head_dim),
    rope_theta=float(cfg.rope_theta),
  )


def _token_text(token) -> str | None:
  if isinstance(token, dict):
    return token.get("content")
  return token


def fit_features(hidden: np.ndarray, embed_dim: int) -> np.ndarray:
  """Zero-pads or cuts the last axis to embed_dim (the official conditioner's rule)."""
  d = hidden.shape[-1]
  if d >= embed_dim:
    return hidden[..., :embed_dim]
  return np.pad(hidden, [(0, 0)] * (hidden.ndim - 1) + [(0, embed_dim - d)])


def encoder_identity(path: str | os.PathLike) -> str:
  """sha256 over a model directory's config.json and tokenizer files and the names and sizes of
  its weight files (a changed checkpoint, tokenizer or architecture changes the identity)."""
  path = os.fspath(path)
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    full = os.path.join(path, name)
    if not os.path.isfile(full):
      continue
    if name.endswith(".json") or name.endswith(".txt"):
      with open(full, "rb") as f:
        h.update(name.encode() + b"\0" + f.read() + b"\0")
    elif name.endswith(".safetensors"):
      h.update(f"{name}\0{os.path.getsize(full)}\0".encode())
  return h.hexdigest()


def build_split_features(
  config, split: str, *, chunk_size: int = 1024, storage_dtype: str = "bfloat16", **kw
) -> dict:
  """Encodes every sentence of `split` of `config.input` with the Qwen3 of
  `config.prompted.encoder_dir` into `<config.input.text_features>/<split>/` (`data.text_cache.build`:
  chunked, with progress, resuming a stopped build); shapes are the T2I model's (text_length,
  text_dim). `kw`: batch_size (sentences per encoder call), log, after_chunk. Returns the manifest."""
  from flowseg_jax.data import datasets, text_cache
  from flowseg_jax.models import pixnerd_t2i

  cfg = config.prompted
  if not config.input.get("text_features") or not cfg.encoder_dir:
    raise ValueError(
      "building text features needs config.input.text_features (the cache folder) and "
      "config.prompted.encoder_dir (a Qwen3 Hugging Face directory)"
    )
  t2i = pixnerd_t2i.make_model(cfg.variant, **cfg.overrides.to_dict())
  encoder = TextEncoder.from_pretrained(
    cfg.encoder_dir,
    max_length=t2i.text_length,
    embed_dim=t2i.text_dim,
    batch_size=int(kw.pop("batch_size", 64)),
  )
  keys, sentences = datasets.split_sentences(config.input, split)
  return text_cache.build(
    text_cache.split_dir(config.input.text_features, split),
    keys,
    sentences,
    encoder,
    split=split,
    chunk_size=chunk_size,
    storage_dtype=storage_dtype,
    **kw,
  )
