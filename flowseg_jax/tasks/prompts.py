"""Prompt embeddings for PixNerd-T2I: tokenise, run the Qwen3 text encoder once, cache on disk.

PixNerd-T2I's condition is the Qwen3 last hidden state over exactly `max_length` tokens (128):
prompts are tokenised without special tokens, cut to 128 tokens and right-padded with the pad
token to 128 (attention mask 0 on the padding), encoded, and the features padded with zeros or
cut to `embed_dim` (2048), as the official conditioner does. Padded positions keep the values the
encoder computes there (the T2I model attends to them; they are not zeroed).

Training never runs the language model per step: `cached_prompt_embeddings` computes the
embeddings of a prompt set once and stores them in `<cache_dir>/prompts-<key>.npz`, where the key
hashes the prompts, the encoder's identity and the shaping parameters. `load_prompt_cache`
refuses (`StalePromptCacheError`, saying what differs) a file made for other prompts, another
encoder or other shapes.

A small encoder for CPU work (`condition='text'`): `word_tokenizer` builds a word-level
`tokenizers.Tokenizer` in code from a vocabulary list (no download; the same list gives the same
ids), and `builtin_encoder_config` a small Qwen3 (`models.qwen3`) whose width is the T2I model's
text width; the prompted denoiser trains it jointly (models/prompted.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax import storage

CACHE_FORMAT = 1
TEXT_LENGTH = 128
TEXT_DIM = 2048
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
_DEFAULT_PAD = "<|endoftext|>"  # Qwen3's pad token
WORD_PAD, WORD_UNK = "[PAD]", "[UNK]"  # ids 0 and 1 of `word_tokenizer`


class StalePromptCacheError(ValueError):
  """A prompt cache made for other prompts, another encoder or other shapes."""


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


def cache_key(prompts: Sequence[str], identity: str, max_length: int, embed_dim: int) -> str:
  """sha256 of the prompt list (order matters), encoder identity and shapes."""
  payload = json.dumps(
    dict(
      format=CACHE_FORMAT,
      prompts=list(prompts),
      encoder=identity,
      max_length=max_length,
      embed_dim=embed_dim,
    ),
    ensure_ascii=False,
  )
  return hashlib.sha256(payload.encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: str) -> str:
  return storage.join(os.fspath(cache_dir), f"prompts-{key[:24]}.npz")


def save_prompt_cache(
  path: str | os.PathLike,
  prompts: Sequence[str],
  embeddings: np.ndarray,
  mask: np.ndarray,
  *,
  identity: str,
  storage_dtype: str = "float32",
) -> None:
  """Writes the cache atomically (storage.write_atomic: local or e.g. gs://)."""
  if storage_dtype not in STORAGE_DTYPES:
    raise ValueError(f"storage_dtype={storage_dtype!r}; expected one of {STORAGE_DTYPES}.")
  n, length, dim = embeddings.shape
  if len(prompts) != n or mask.shape != (n, length):
    raise ValueError(
      f"{len(prompts)} prompts, embeddings {embeddings.shape}, mask {mask.shape} do not agree."
    )
  stored = np.asarray(jnp.asarray(embeddings).astype(storage_dtype))
  if storage_dtype == "bfloat16":  # .npz has no bfloat16: keep the bits
    stored = stored.view(np.uint16)
  meta = dict(
    format=CACHE_FORMAT,
    key=cache_key(prompts, identity, length, dim),
    encoder=identity,
    max_length=length,
    embed_dim=dim,
    storage_dtype=storage_dtype,
  )
  storage.path(path).parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(
    buffer,
    embeddings=stored,
    mask=mask.astype(np.int8),
    prompts=np.asarray(list(prompts), dtype=str),
    meta=np.asarray(json.dumps(meta)),
  )
  storage.write_atomic(path, buffer.getvalue())


def load_prompt_cache(
  path: str | os.PathLike,
  prompts: Sequence[str] | None = None,
  *,
  identity: str | None = None,
  max_length: int | None = None,
  embed_dim: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """Reads a cache: (embeddings float32 (N, L, D), mask int32 (N, L), prompts).

  Every expectation given (prompts, encoder identity, shapes) is checked.

  Raises:
    FileNotFoundError: no such file.
    StalePromptCacheError: the file was made for other prompts / encoder / shapes.
  """
  path = os.fspath(path)
  if not storage.path(path).is_file():
    raise FileNotFoundError(f"Prompt cache {path} does not exist.")
  with np.load(io.BytesIO(storage.path(path).read_bytes()), allow_pickle=False) as f:
    meta = json.loads(str(f["meta"]))
    stored, mask, cached = (
      f["embeddings"],
      f["mask"].astype(np.int32),
      [str(p) for p in f["prompts"]],
    )
  if meta.get("format") != CACHE_FORMAT:
    raise StalePromptCacheError(
      f"{path}: cache format {meta.get('format')}, expected {CACHE_FORMAT}."
    )
  problems = []
  if identity is not None and meta["encoder"] != identity:
    problems.append(f"encoder {meta['encoder'][:16]}… != expected {identity[:16]}…")
  for name, want in (("max_length", max_length), ("embed_dim", embed_dim)):
    if want is not None and meta[name] != want:
      problems.append(f"{name} {meta[name]} != expected {want}")
  if prompts is not None and list(prompts) != cached:
    diff = next((i for i, (a, b) in enumerate(zip(prompts, cached)) if a != b), None)
    where = f"first difference at index {diff}" if diff is not None else "different lengths"
    problems.append(f"prompts differ ({len(cached)} cached vs {len(prompts)} asked; {where})")
  if problems:
    raise StalePromptCacheError(
      f"Stale prompt cache {path}: " + "; ".join(problems) + ". Delete it or rebuild it."
    )
  if meta["key"] != cache_key(cached, meta["encoder"], meta["max_length"], meta["embed_dim"]):
    raise StalePromptCacheError(f"{path}: its key does not match its contents (edited file?).")
  if meta["storage_dtype"] == "bfloat16":
    stored = stored.view(jnp.bfloat16)
  return stored.astype(np.float32), mask, cached


def cached_prompt_embeddings(
  cache_dir: str | os.PathLike,
  prompts: Sequence[str],
  encoder: TextEncoder,
  *,
  storage_dtype: str = "float32",
) -> tuple[np.ndarray, np.ndarray]:
  """(embeddings (N, L, D) float32, mask (N, L)) of `prompts`, computed once per prompt set.

  The first call runs the encoder and writes `cache_path(cache_dir, key)`; later calls with the
  same prompts and encoder read the file.
  """
  key = cache_key(prompts, encoder.identity, encoder.max_length, encoder.embed_dim)
  path = cache_path(cache_dir, key)
  expect = dict(
    identity=encoder.identity, max_length=encoder.max_length, embed_dim=encoder.embed_dim
  )
  if storage.path(path).is_file():
    embeddings, mask, _ = load_prompt_cache(path, prompts, **expect)
    return embeddings, mask
  embeddings, mask = encoder(prompts)
  save_prompt_cache(
    path, prompts, embeddings, mask, identity=encoder.identity, storage_dtype=storage_dtype
  )
  embeddings, mask, _ = load_prompt_cache(path, prompts, **expect)  # what later runs will see
  return embeddings, mask
