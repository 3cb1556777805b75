"""Hugging Face Qwen3 checkpoints (config.json + safetensors) <-> flowseg_jax `Qwen3Model`.

`load_hf(dir)` reads `config.json`, the weights (`model.safetensors.index.json` and its shards,
or a single `model.safetensors`), drops the `model.` prefix of causal-LM checkpoints and their
`lm_head.weight` (the text encoder needs the last hidden state only), checks every name and shape
against the config (one error naming all missing / unexpected / mis-shaped tensors) and maps
Linear weights to Flax kernels (transposed). Tensors are read one at a time (bfloat16 included,
through the safetensors Flax reader) and converted to the requested dtype on the host.
`flax_to_hf` is the reverse map (Hugging Face `Qwen3Model` names).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowseg_jax.convert import common
from flowseg_jax.models.qwen3 import Qwen3Config, Qwen3Model

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Tensors of causal-LM checkpoints that the base model does not have.
_IGNORED = ("lm_head.weight",)


def _entries(model: Qwen3Model) -> Iterator[common.Entry]:
  cfg = model.config
  yield "embed_tokens.weight", ("embed_tokens", "embedding"), None, "copy"
  projections = ("q_proj", "k_proj", "v_proj", "o_proj")
  for i in range(cfg.num_hidden_layers):
    pre, layer = f"layers.{i}.", f"layers_{i}"
    yield pre + "input_layernorm.weight", (layer, "input_layernorm", "scale"), None, "copy"
    for proj in projections:
      yield f"{pre}self_attn.{proj}.weight", (layer, "self_attn", proj, "kernel"), None, "linear"
      if cfg.attention_bias:
        yield f"{pre}self_attn.{proj}.bias", (layer, "self_attn", proj, "bias"), None, "copy"
    for norm in ("q_norm", "k_norm"):
      yield f"{pre}self_attn.{norm}.weight", (layer, "self_attn", norm, "scale"), None, "copy"
    post = "post_attention_layernorm"
    yield f"{pre}{post}.weight", (layer, post, "scale"), None, "copy"
    for proj in ("gate_proj", "up_proj", "down_proj"):
      yield f"{pre}mlp.{proj}.weight", (layer, "mlp", proj, "kernel"), None, "linear"
  yield "norm.weight", ("norm", "scale"), None, "copy"


def _layout(w, kind: str):
  return w.T if kind == "linear" else w


def abstract_params(model: Qwen3Model) -> dict:
  """The parameter tree of `model` as ShapeDtypeStructs."""
  ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), ids)["params"])


def expected_hf_shapes(model: Qwen3Model) -> dict[str, tuple[int, ...]]:
  """Hugging Face `Qwen3Model` state-dict names and shapes for `model.config`."""
  mapped = jax.eval_shape(lambda p: flax_to_hf(p, model), abstract_params(model))
  return {k: tuple(v.shape) for k, v in mapped.items()}


def flax_to_hf(params: Mapping, model: Qwen3Model) -> dict[str, Any]:
  """Flax params -> {Hugging Face Qwen3Model name: array in torch layout}."""
  return common.params_to_torch(params, _entries(model), _layout, "Qwen3Model")


def hf_to_flax(
  state_dict: Mapping[str, Any], model: Qwen3Model, *, source: str = "state dict"
) -> dict:
  """{HF name: tensor} (with or without the `model.` prefix) -> plain Flax params.

  Raises:
    ValueError: naming every missing / unexpected / mis-shaped tensor.
  """
  if isinstance(state_dict, _LazyTensors):
    shapes = state_dict.shapes
  else:
    state_dict = {_hf_name(k): v for k, v in state_dict.items() if k not in _IGNORED}
    shapes = state_dict
  header = f"{source} does not match {model.config}:"
  common.check_shapes(shapes, expected_hf_shapes(model), header)
  return common.torch_to_params(state_dict, _entries(model), _layout, model.param_dtype)


def _hf_name(key: str) -> str:
  return key[len("model.") :] if key.startswith("model.") else key


def read_config(path: str | os.PathLike) -> Qwen3Config:
  """`Qwen3Config` of a Hugging Face model directory."""
  config_path = os.path.join(os.fspath(path), CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{config_path} not found: is {path} a Hugging Face model directory?")
  with open(config_path) as f:
    return Qwen3Config.from_hf(json.load(f), source=config_path)


def weight_files(path: str | os.PathLike) -> list[str]:
  """The safetensors files of a model directory (from the index when there is one)."""
  path = os.fspath(path)
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index}: no 'weight_map' entries.")
    files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
      raise FileNotFoundError(f"{index} names shards that do not exist: {absent}")
    return files
  single = os.path.join(path, SINGLE_FILE)
  if os.path.isfile(single):
    return [single]
  found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not found:
    raise FileNotFoundError(f"{path}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file.")
  return [os.path.join(path, f) for f in found]


class _LazyTensors(Mapping):
  """{base-model name: np.ndarray} over safetensors files, each tensor read when accessed.

  `shapes` gives every tensor's shape without reading it. Names lose the `model.` prefix; the
  causal-LM head is left out.
  """

  def __init__(self, files: list[str], dtype):
    from safetensors import safe_open

    self._dtype = np.dtype(dtype)
    self._where: dict[str, tuple[Any, str]] = {}
    self.shapes: dict[str, jax.ShapeDtypeStruct] = {}
    for f in files:
      handle = safe_open(f, framework="flax")
      for key in handle.keys():
        if key in _IGNORED:
          continue
        name = _hf_name(key)
        if name in self._where:
          raise ValueError(f"Tensor {name!r} is stored twice (second time in {f}).")
        self._where[name] = (handle, key)
        shape = tuple(handle.get_slice(key).get_shape())
        self.shapes[name] = jax.ShapeDtypeStruct(shape, self._dtype)

  def __getitem__(self, name: str) -> np.ndarray:
    handle, key = self._where[name]
    return np.asarray(jnp.asarray(handle.get_tensor(key)).astype(self._dtype))

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def load_hf(
  path: str | os.PathLike, dtype=jnp.float32, *, attention_impl: str | None = None
) -> tuple[Qwen3Model, dict]:
  """Loads a Hugging Face Qwen3 directory: `(model, params)` for `model.apply`.

  Args:
    path: directory with config.json and safetensors weights (sharded or not).
    dtype: parameter and compute dtype (float32 for parity; bfloat16 as the official encoder).
    attention_impl: `jax.nn.dot_product_attention` implementation.

  Returns:
    `Qwen3Model` and plain params (NumPy arrays in `dtype`).
  """
  path = os.fspath(path)
  model = Qwen3Model(
    read_config(path), dtype=dtype, param_dtype=dtype, attention_impl=attention_impl
  )
  tensors = _LazyTensors(weight_files(path), dtype)
  return model, hf_to_flax(tensors, model, source=path)
