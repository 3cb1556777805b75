"""Lower the train step and the sampler for TPU and CUDA on any machine (`jax.export`), and check them.

`jax.export` lowers a jitted function to StableHLO for platforms other than the one it runs on:
nothing is compiled or run for the target, so a CPU-only box proves that the real programs lower
for 'tpu' and 'cuda' with the configured shardings. For each platform this exports the train step
(`train_step.compile_train_step` on `train_state.abstract_train_state`, over a `--mesh DATAxFSDP` of
this machine's devices) and the Euler sampler (`inference.sample_fn`), and reports the StableHLO
size, the custom calls (the cuDNN fused attention with `attention_impl='cudnn'` on CUDA), and the
checks that the bfloat16 paths stay clean: no float64 value and no host callback.

cuDNN attention: jax checks the cuDNN version of the CUDA plugin while tracing
(`jax._src.cudnn.fused_attention_stablehlo.check_cudnn_version`); a CPU-only jaxlib has none and
raises `RuntimeError: cuDNN is not detected.`. `--assume-cudnn 90800` lets that check pass (the
version only gates features of newer GPUs), so the CUDA program can be lowered here. cuDNN's custom
calls carry no serialization-compatibility guarantee, so the export allows them explicitly.

  python -m tools.export --config configs/flowseg_ade20k.py:stage=1 --platforms tpu,cuda
  python -m tools.export --config configs/demo.py --set model.attention_impl=cudnn \\
      --set model.dtype=bfloat16 --platforms cuda --assume-cudnn 90800 --out /tmp/exports
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time

import flax.linen as nn
import jax

from benchmarks import configs, output
from flowseg_jax import inference, sharding, storage, train_step
from tools import abstract_inputs, config_overrides

CUDNN_TARGETS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.\-]+)")
_CALLBACK = re.compile(r"callback", re.IGNORECASE)


@contextlib.contextmanager
def assume_cudnn(version: int | None):
  """Lets `implementation='cudnn'` trace without a CUDA plugin (see the module docstring)."""
  if version is None:
    yield
    return
  from jax._src.cudnn import fused_attention_stablehlo as fused

  saved = fused.check_cudnn_version
  fused.check_cudnn_version = lambda: version
  try:
    yield
  finally:
    fused.check_cudnn_version = saved


def inspect_module(text: str) -> dict:
  """Custom-call targets, float64 and host-callback findings of a StableHLO module's text."""
  targets = sorted(set(_CUSTOM_CALL.findall(text)))
  return {
    "stablehlo_chars": len(text),
    "custom_calls": targets,
    "has_f64": bool(re.search(r"\bf64\b", text)),
    "host_callbacks": [t for t in targets if _CALLBACK.search(t)],
    "cudnn_attention": [t for t in targets if t in CUDNN_TARGETS],
  }


def _export(jitted, platform: str, args) -> jax.export.Exported:
  """Exports `jitted(*args)` with flat inputs and outputs (the leaves, in `jax.tree` order).

  Flat, because serialization needs every pytree node type registered with jax.export, and the
  train state holds optax's state classes.
  """
  leaves, treedef = jax.tree.flatten(args)

  def flat_fn(*flat):
    return jax.tree.leaves(jitted(*jax.tree.unflatten(treedef, flat)))

  checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_TARGETS]
  return jax.export.export(jax.jit(flat_fn), platforms=(platform,), disabled_checks=checks)(*leaves)


def export_programs(
  config, platforms, *, mesh=None, assume_cudnn_version=None, out_dir=None
) -> dict:
  """{platform: {'train_step': report, 'sampler': report}}; serialized exports go to out_dir."""
  with assume_cudnn(assume_cudnn_version):
    return _export_programs(config, platforms, mesh=mesh, out_dir=out_dir)


def _export_programs(config, platforms, *, mesh, out_dir) -> dict:
  mesh = mesh or sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding_rules)
  setup, state, shardings, batch, teacher = abstract_inputs.train_step_inputs(config, mesh, rules)
  images, conds = abstract_inputs.sampler_inputs(config, mesh, setup.task)
  sampler = inference.sample_fn(setup.task, mesh, setup.task.sampler_options())
  programs = {
    "train_step": (train_step.compile_train_step(setup, mesh, shardings), (state, batch, teacher)),
    "sampler": (sampler, (state.ema_params["denoiser"], images, conds)),
  }
  results = {}
  for platform in platforms:
    results[platform] = {}
    for name, (jitted, args) in programs.items():
      start = time.perf_counter()
      try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
          exported = _export(jitted, platform, args)
      except (NotImplementedError, RuntimeError, ValueError) as e:
        # Known: cuDNN attention over a multi-device mesh partitions itself with
        # `custom_partitioning`, a Python callback at compile time that jax.export cannot serialize.
        results[platform][name] = {"error": f"{type(e).__name__}: {e}"}
        continue
      report = inspect_module(exported.mlir_module())
      report.update(
        lower_s=time.perf_counter() - start,
        nr_devices=exported.nr_devices,
        platforms=list(exported.platforms),
      )
      if out_dir:
        storage.path(out_dir).mkdir(parents=True, exist_ok=True)
        path = storage.join(out_dir, f"{name}.{platform}.jax_exported")
        storage.path(path).write_bytes(exported.serialize())
        report["path"] = path
      results[platform][name] = report
  return results


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/flowseg_ade20k.py:stage=1")
  p.add_argument("--platforms", default="tpu,cuda")
  p.add_argument("--mesh", default="1x1", help="DATAxFSDP over this machine's devices")
  p.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
  p.add_argument("--assume-cudnn", type=int, default=None, help="cuDNN version to assume")
  p.add_argument("--out", default=None, help="write the serialized exports here")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  config = configs.load_config(args.config)
  config_overrides.apply_overrides(
    config, dict(config_overrides.parse_override(s) for s in args.set)
  )
  data, fsdp = (int(x) for x in args.mesh.split("x"))
  config.mesh.data, config.mesh.fsdp = data, fsdp
  mesh = sharding.make_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
  results = export_programs(
    config,
    args.platforms.split(","),
    mesh=mesh,
    assume_cudnn_version=args.assume_cudnn,
    out_dir=args.out,
  )
  for platform, programs in results.items():
    for name, r in programs.items():
      if "error" in r:
        print(f"{platform:5s} {name:10s} NOT lowered: {r['error']}")
        continue
      print(
        f"{platform:5s} {name:10s} lowered in {r['lower_s']:.1f} s for {r['nr_devices']} "
        f"device(s): {r['stablehlo_chars'] / 1e6:.2f} M chars StableHLO, f64: {r['has_f64']}, "
        f"host callbacks: {r['host_callbacks'] or 'none'}, custom calls: {r['custom_calls']}"
      )
  output.write_json(args.json, {"benchmark": "export", "args": vars(args), "results": results})
  return results


if __name__ == "__main__":
  main()
