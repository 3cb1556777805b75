"""Platform exports: the train step and the sampler lower for TPU and CUDA on this CPU machine.

Tiny model (demo smoke config), bfloat16 compute, REPA on with a tiny DINOv2 teacher: the programs
must lower with no float64 value and no host callback; with attention_impl='cudnn' the CUDA
programs contain cuDNN's fused attention (forward, and backward in the train step).
"""

import jax
import pytest

from benchmarks import configs
from flowseg_jax import sharding
from tools import config_overrides, export

BF16_REPA = {
  "model.dtype": "bfloat16",
  "repa.enabled": True,
  "repa.teacher_variant": "tiny/14",
  "repa.align_layer": 2,
  "repa.teacher_dtype": "bfloat16",
}


def tiny_config(**overrides):
  config = configs.load_config("configs/demo.py:smoke")
  config_overrides.apply_overrides(config, {**BF16_REPA, **overrides})
  return config


def test_tpu_and_cuda_exports_of_the_sharded_bf16_programs_are_clean():
  config = tiny_config()
  mesh = sharding.make_mesh(2, 4)
  results = export.export_programs(config, ["tpu", "cuda"], mesh=mesh)
  for platform in ("tpu", "cuda"):
    for name in ("train_step", "sampler"):
      r = results[platform][name]
      assert "error" not in r, r
      assert r["platforms"] == [platform] and r["nr_devices"] == 8
      assert not r["has_f64"] and r["host_callbacks"] == []
      assert r["stablehlo_chars"] > 10_000


def test_cuda_export_uses_cudnn_fused_attention(tmp_path):
  config = tiny_config(**{"model.attention_impl": "cudnn", "repa.enabled": False})
  results = export.export_programs(config, ["cuda"], assume_cudnn_version=90800, out_dir=tmp_path)
  step, sampler = results["cuda"]["train_step"], results["cuda"]["sampler"]
  assert step["cudnn_attention"] == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
  assert sampler["cudnn_attention"] == ["__cudnn$fmhaSoftmax"]
  assert not step["has_f64"] and step["host_callbacks"] == []
  # The serialized export round-trips (what a GPU host would load and run).
  with open(step["path"], "rb") as f:
    restored = jax.export.deserialize(f.read())
  assert restored.platforms == ("cuda",)


def test_cudnn_needs_the_cuda_plugin_to_trace():
  from jax._src.lib import cuda_versions

  if cuda_versions is not None:
    pytest.skip("a CUDA plugin is installed")
  config = tiny_config(**{"model.attention_impl": "cudnn", "repa.enabled": False})
  with pytest.raises(RuntimeError, match="cuDNN is not detected"):
    export.export_programs(config, ["cuda"])


def test_inspect_module_flags_f64_and_callbacks():
  text = (
    "stablehlo.custom_call @xla_ffi_python_cpu_callback(%0) : (tensor<f64>) -> ()\n"
    "stablehlo.custom_call @__cudnn$fmhaSoftmax(%1)"
  )
  r = export.inspect_module(text)
  assert r["has_f64"] and r["host_callbacks"] == ["xla_ffi_python_cpu_callback"]
  assert r["cudnn_attention"] == ["__cudnn$fmhaSoftmax"]
