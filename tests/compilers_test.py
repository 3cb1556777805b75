"""The real TPU and GPU compilers without the hardware (tools/compile_targets.py, tools/scale.py), and
abstract train-state creation that touches no device.

The compilers are not in the test install: libtpu in the main environment would make every JAX
process on a machine without a TPU probe for one. The compile tests run the planner in a subprocess
whose PYTHONPATH adds FLOWSEG_COMPILER_PATH (directories holding libtpu and/or the CUDA plugin,
e.g. from `pip install --no-deps --target DIR libtpu==...`; .ci/run installs them) or, without it,
in this interpreter when it has them; they skip with the reason where neither has the compiler.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from benchmarks import configs
from flowseg_jax import sharding, train_state, train_step
from tools import compile_targets, hlo_counts, plan_presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER_PATH = [p for p in os.environ.get("FLOWSEG_COMPILER_PATH", "").split(os.pathsep) if p]


def _has(module: str) -> bool:
  if importlib.util.find_spec(module) is not None:
    return True
  return any(os.path.isdir(os.path.join(p, module)) for p in COMPILER_PATH)


def _require(module: str, what: str) -> None:
  """Skips without the compiler, except under CI, whose .ci/run installs it: there it fails."""
  if not _has(module):
    message = f"{what} not installed (set FLOWSEG_COMPILER_PATH; .ci/run shows how)"
    if os.environ.get("CI"):
      pytest.fail(message)
    pytest.skip(message)


def _plan(tmp_path, target: str, *overrides: str, sampler: bool = True) -> dict:
  """tools.scale on the smoke config for `target`, in a subprocess that sees the compilers."""
  env = compile_targets.worker_env(target, os.environ)
  env["PYTHONPATH"] = os.pathsep.join([REPO, *COMPILER_PATH, env.get("PYTHONPATH", "")])
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the cache is keyed for this process's CPU backend
  sets = [a for o in overrides for a in ("--set", o)]
  kind, rest = compile_targets.parse(target)
  flag = "--topology" if kind == "tpu" else "--gpu"
  cmd = [sys.executable, "-m", "tools.scale", "--config", "configs/demo.py:smoke", flag, rest]
  proc = subprocess.run(
    [*cmd, "--fsdp", "2", *sets, "--json", str(tmp_path / "plan.json")]
    + ([] if sampler else ["--no-sampler"]),
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / "plan.json") as f:
    (row,) = json.load(f)["rows"]
  assert "error" not in row, row["error"]
  return row


def test_tiny_config_compiles_for_a_tpu_topology(tmp_path):
  _require("libtpu", "libtpu")
  row = _plan(tmp_path, "tpu:v5e:2x2")
  assert (row["devices"], row["data"], row["fsdp"]) == (4, 2, 2)
  assert row["device_kind"] == "TPU v5 lite" and row["device_gib"] == 16.0
  mem = row["train"]["memory"]
  assert 0 < mem["argument_bytes"] <= mem["peak_bytes"] < 2**30 and row["fit"] == "yes"
  # FSDP over 2 chips: the parameters are gathered, the gradients reduced.
  assert row["train"]["collective_bytes"].get("all-gather", 0) > 0
  assert row["sampler"]["memory"]["peak_bytes"] > 0 and row["sampler"]["batch"] == 4
  assert 0 < row["sampler"]["scorer"]["memory"]["peak_bytes"] <= row["sampler"]["eval_peak_bytes"]


def test_tiny_config_compiles_for_a_gpu_target(tmp_path):
  _require("jax_cuda12_plugin", "the CUDA plugin (jax-cuda12-plugin)")
  row = _plan(tmp_path, "gpu:h100:8", 'model.dtype="bfloat16"')
  assert (row["devices"], row["device_kind"]) == (8, "NVIDIA H100 80GB HBM3")
  assert abs(row["device_gib"] - 79.65) < 0.01 and row["fit"] == "yes"
  assert row["train"]["memory"]["peak_bytes"] > 0 and row["train"]["fused_attention"] == 0
  _require("nvidia", "cuDNN (nvidia-cudnn-cu12)")
  row = _plan(
    tmp_path, "gpu:h100:8", 'model.dtype="bfloat16"', 'model.attention_impl="cudnn"', sampler=False
  )
  # One fused forward and one backward call (the scanned blocks share one loop body).
  assert row["train"]["fused_attention"] == 2


def test_abstract_train_state_touches_no_device():
  """The mesh may hold compile-only devices (a TPU topology on a CPU machine): creating the
  abstract state must run nothing on any device, not even the PRNG key (a host-to-device copy)."""
  config = configs.load_config("configs/demo.py:smoke")
  setup = train_step.TrainSetup(config)
  mesh = sharding.make_mesh(2, 4)
  rules = sharding.rules_from_config(config.sharding_rules)
  with jax.transfer_guard("disallow"):
    state, shardings = train_state.abstract_train_state(setup, mesh, rules, 0)
  assert isinstance(state.rng, jax.ShapeDtypeStruct) and state.rng.sharding == shardings.rng
  assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(state))


def test_compile_targets_forms_and_environment():
  assert compile_targets.parse("8") == ("cpu", "8")
  assert compile_targets.parse("tpu:v5e:2x4") == ("tpu", "v5e:2x4")
  assert compile_targets.parse("gpu:a100:16") == ("gpu", "a100:16")
  for bad in ("v5e:2x4", "gpu:h100", "tpu:"):
    with pytest.raises(compile_targets.TargetError, match="expected"):
      compile_targets.parse(bad)
  assert compile_targets.gpu_topology(8) == "1x1x8" and compile_targets.gpu_topology(16) == "1x2x8"
  with pytest.raises(compile_targets.TargetError, match="multiple of 8"):
    compile_targets.gpu_topology(12)
  with pytest.raises(compile_targets.TargetError, match="known: a100, h100"):
    compile_targets.gpu_target_config("b200")
  assert compile_targets.device_memory_gib(None, "gpu:a100:8") == 80.0
  env = compile_targets.worker_env(
    "gpu:h100:8", {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  )
  assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"
  assert env["JAX_PLATFORMS"] == "cpu" and env["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] == "1"
  assert (
    compile_targets.worker_env("4", {})["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  )
  hlo = (
    '%a = (bf16[2,8]) custom-call(%q), custom_call_target="__cudnn$fmhaSoftmax"\n'
    '%b = (bf16[2,8]) custom-call(%g), custom_call_target="__cudnn$fmhaSoftmaxBackward"\n'
    '%c = f32[2] custom-call(%x), custom_call_target="__cublas$gemm"\n'
  )
  assert hlo_counts.fused_attention_calls(hlo) == 2


def test_every_preset_names_its_hardware():
  cases = plan_presets.cases(plan_presets.CONFIGS, ["1", "2"])
  targets, hardware = plan_presets.presets()
  assert set(hardware) == set(targets)
  for case in cases:
    chips = plan_presets._device_count(case["target"])
    assert case["data"] * case["fsdp"] == chips, case
    if case["target"].startswith("gpu:"):
      assert case["attention"] == "cudnn", case
  # Stage 2 (global batch 16) has a preset on a v5e slice.
  assert any(c["stage"] == "2" and c["target"].startswith("tpu:v5e") for c in cases)


def test_plan_table_keeps_rows_whose_json_is_gone(tmp_path, monkeypatch):
  """`--keep-table` keeps an earlier table's planned rows of the same program and does not compile
  them again; a compiled row wins, and a row of another mesh or remat (a preset changed since) is
  not kept."""
  header = [h for _, h in plan_presets.COLUMNS]
  old = [
    "| ade20k 1 | v4-16 | tpu:v4:2x2x2 | 8x1 | none | 10.82 | 14.32 | 25.14 | yes (32) "
    "| 33.61 | +34 % | 1505 |  | 3.92 |  |  |",
    "| ade20k 1 | v6e-8 | tpu:v6e:2x4 | 4x2 | nothing_saveable | 5.58 | 3.0 | 8.58 | yes (32) "
    "|  |  | 700 |  |  |  |  |",
    "| ade20k 1 | v5e-8 | tpu:v5e:2x4 | 4x2 | nothing_saveable | 5.58 | 3.89 | 9.47 | yes (16) "
    "|  |  | 1590 |  |  |  |  |",
  ]
  results = tmp_path / "RESULTS.md"
  results.write_text(
    "text\n<!-- compiler plan table -->\n| "
    + " | ".join(header)
    + " |\n|"
    + "---|" * len(header)
    + "\n"
    + "\n".join(old)
    + "\n<!-- /compiler plan table -->\n"
  )
  compiled = {
    "config": "configs/flowseg_ade20k.py:stage=1,target=v5e-8",
    "target": "tpu:v5e:2x4",
    "data": 4,
    "fsdp": 2,
    "remat": "nothing_saveable",
    "fit": "yes",
    "device_gib": 16.0,
    "train": {
      "memory": {"argument_bytes": 5 * 2**30, "temp_bytes": 2**30, "peak_bytes": 6 * 2**30},
      "compile_s": 99.0,
    },
  }
  (tmp_path / "rows.json").write_text(json.dumps({"rows": [compiled]}))
  argv = ["--configs", "configs/flowseg_ade20k.py", "--stages", "1"]
  argv += ["--presets", "v4-16,v6e-8,v5e-8", "--json", str(tmp_path / "rows.json")]
  planned = []

  def plan(case, compiler, args):
    planned.append((case["preset"], compiler))
    return {"config": plan_presets.spec(case), "target": case["target"], "error": "stand-in"}

  monkeypatch.setattr(plan_presets, "plan", plan)
  argv = [*argv, "--keep-table", str(results), "--cpu-table", ""]
  plan_presets.main(argv)
  assert planned == [("v6e-8", "native")]
  lines = plan_presets.main([*argv, "--table-only"])
  by = {line["preset"]: line for line in lines}
  assert by["v4-16"]["peak"] == "25.14" and by["v4-16"]["cpu_over"] == "+34 %"
  assert by["v4-16"]["sampler"] == "3.92" and "note" not in by["v4-16"]
  assert by["v5e-8"]["peak"] == "6.00" and by["v5e-8"]["compile"] == "99"
  # The v6e-8 preset is data 8 now: the 4x2 row planned another program.
  assert by["v6e-8"]["mesh"] == "8x1" and by["v6e-8"]["note"] == "stand-in"
