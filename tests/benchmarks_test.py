"""The benchmark scripts and their helpers: FLOP formula, peak table, a one-step smoke run of each main,
the accelerator check (tools/) and the decoding-order experiment (experiments/)."""

import json
import math
import os
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import (
  configs,
  eval_rate,
  flops,
  hardware,
  objective_overhead,
  sampling,
  timing,
  train_step,
)
from flowseg_jax.models import pixnerd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--cases", "tiny/4:16:2", "--rounds", "1", "--steps", "1", "--warmup", "1"]


@pytest.mark.parametrize(
  "variant,h,w,b,scan",
  [("tiny/4", 16, 32, 2, True), ("tiny/8", 24, 16, 3, False), ("S/16", 32, 48, 1, True)],
)
def test_forward_flops_formula_matches_traced_matmuls(variant, h, w, b, scan):
  model = pixnerd.make_model(variant, scan_blocks=scan)
  params = pixnerd.abstract_params(model)
  x = jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((b,), jnp.float32)
  y = jax.ShapeDtypeStruct((b,), jnp.int32)
  counted = flops.jaxpr_matmul_flops(
    lambda p, x, t, y: model.apply({"params": p}, x, t, y), params, x, t, y
  )
  formula = flops.pixnerd_forward_flops(pixnerd.VARIANTS[variant], b, h, w)
  assert formula["executed"] == counted
  assert formula["total"] == formula["embed"] + formula["trunk"] + formula["decoder"]
  # The model count has each pixel's 67-wide embedding; ours multiplies the positions once.
  hx, p = pixnerd.VARIANTS[variant]["nerf_hidden_size"], pixnerd.VARIANTS[variant]["patch_size"]
  pixels = b * h * w
  assert formula["total"] - formula["executed"] == 2 * pixels * 67 * hx - 2 * p * p * 64 * hx
  assert 0 < formula["attention"] < formula["trunk"]


def test_jaxpr_matmul_flops_sees_through_jit_scan_cond_and_grad():
  a = jax.ShapeDtypeStruct((2, 3), jnp.float32)
  m = jax.ShapeDtypeStruct((3, 4), jnp.float32)
  one = 2 * 2 * 4 * 3
  assert flops.jaxpr_matmul_flops(lambda a, m: a @ m, a, m) == one
  assert flops.jaxpr_matmul_flops(jax.jit(lambda a, m: a @ m), a, m) == one

  def scanned(a, m):
    return jax.lax.scan(lambda c, _: (c, jnp.sum(c @ m)), a, None, length=5)[1]

  assert flops.jaxpr_matmul_flops(scanned, a, m) == 5 * one
  pick = lambda a, m: jax.lax.cond(True, lambda: (a @ m) @ m.T, lambda: jnp.zeros((2, 3)))
  assert flops.jaxpr_matmul_flops(pick, a, m) == one + 2 * 2 * 3 * 4
  # d/dm sum(a @ m) only needs a^T @ g (the gradient w.r.t. `a` is not asked for).
  assert flops.jaxpr_matmul_flops(jax.grad(lambda m, a: jnp.sum(a @ m)), m, a) == 2 * one


def test_device_peaks_and_cpu_estimate():
  dev = lambda kind, platform="gpu": types.SimpleNamespace(device_kind=kind, platform=platform)
  assert hardware.device_peak_flops(dev("NVIDIA H100 80GB HBM3"), "bfloat16")[0] == pytest.approx(
    989.4e12
  )
  assert hardware.device_peak_flops(dev("NVIDIA H100 PCIe"), "bfloat16")[0] == pytest.approx(756e12)
  assert hardware.device_peak_flops(dev("NVIDIA H200"), "float32")[0] == pytest.approx(494.7e12)
  assert hardware.device_peak_flops(dev("NVIDIA A100-SXM4-80GB"), "bfloat16")[0] == pytest.approx(
    312e12
  )
  assert hardware.device_peak_flops(dev("TPU v5 lite", "tpu"))[0] == pytest.approx(197e12)
  assert hardware.device_peak_flops(dev("TPU v5p", "tpu"))[0] == pytest.approx(459e12)
  assert hardware.device_peak_flops(dev("TPU v6 lite", "tpu"))[0] == pytest.approx(918e12)
  assert hardware.device_peak_flops(dev("Mystery accelerator"))[0] is None
  assert hardware.cpu_flops_per_cycle({"avx512f", "avx2", "fma"}) == 64
  assert hardware.cpu_flops_per_cycle({"avx2", "fma"}) == 32
  assert hardware.cpu_flops_per_cycle({"sse2"}) == 8
  peak, how = hardware.device_peak_flops(dev("cpu", "cpu"))
  info = hardware.cpu_info()
  if info["ghz"]:
    per_cycle = hardware.cpu_flops_per_cycle(info["flags"])
    assert peak == pytest.approx(info["cores"] * info["ghz"] * 1e9 * per_cycle)
    assert "estimate" in how


def test_cases_summaries_and_configs():
  cases = configs.parse_cases("S/16:64:2, XL/16:256x512:8")
  assert cases == [configs.Case("S/16", 64, 64, 2), configs.Case("XL/16", 256, 512, 8)]
  for bad in ("S/16:64", "Q/3:64:2", "S/16:64:x", "S/16:0:2", ""):
    with pytest.raises(ValueError):
      configs.parse_cases(bad)
  s = timing.summarize([3.0, 1.0, 2.0])
  assert (s["median"], s["min"], s["max"], s["spread"]) == (2.0, 1.0, 3.0, 0.5)
  base = configs.load_config(configs.DEFAULT_CONFIG)
  config = configs.case_config(base, cases[1], dtype="bfloat16", remat="full", reshape=False)
  assert tuple(config.input.image_size) == (256, 512) and config.input.batch_size == 8
  assert (config.model.variant, config.model.dtype, config.model.remat_policy) == (
    "XL/16",
    "bfloat16",
    "full",
  )
  assert not config.objective.reshape and not config.repa.enabled
  assert base.repa.enabled and base.objective.reshape  # the base config is left untouched
  with pytest.raises(ValueError, match="does not exist"):
    configs.load_config("configs/nope.py")


def test_train_step_main_smoke(tmp_path):
  path = str(tmp_path / "train.json")
  hlo_dir = str(tmp_path / "hlo")
  argv = [*TINY, "--data", "synthetic", "--data-batches", "1", "--json", path, "--hlo-dir", hlo_dir]
  result = train_step.main(argv)
  (row,) = result["rows"]
  forward = flops.pixnerd_forward_flops(pixnerd.VARIANTS["tiny/4"], 2, 16, 16)["total"]
  assert row["model_flops"] == 3 * forward
  # The traced step: forward + both backward products, less the input layers' input gradients.
  assert 2.5 * forward < row["jaxpr_matmul_flops"] <= 3 * forward
  assert row["jax_images_per_s"] == pytest.approx(2 * row["jax_steps_per_s"])
  assert math.isfinite(row["jax_loss"]) and row["jax_loss"] > 0
  assert row["torch_images_per_s"] > 0 and row["speedup"] > 0
  assert row["xla_memory"]["peak_bytes"] > 4 * 4 * row["num_params"]  # params, EMA, Adam mu, nu
  assert row["data_images_per_s"] > 0
  assert row["data_over_consumption"] == pytest.approx(
    row["data_images_per_s"] / row["jax_images_per_s"]
  )
  with open(path) as f:
    assert json.load(f)["rows"][0]["case"] == row["case"]
  with open(os.path.join(hlo_dir, "tiny_4_16x16_b2.hlo.txt")) as f:
    assert "ENTRY" in f.read()


def test_objective_overhead_main_smoke():
  result = objective_overhead.main(TINY)
  (row,) = result["rows"]
  assert row["num_classes"] == 150
  assert row["step_vanilla_s"]["median"] > 0 and row["step_reshaped_s"]["median"] > 0
  assert np.isfinite(row["step_overhead"]) and np.isfinite(row["potential_s"])
  # The potential reads and writes (pixels x classes) arrays that vanilla FM never touches.
  accessed = row["loss_bytes_accessed"]
  assert accessed["reshaped"] > accessed["vanilla"] > 0


def test_sampling_main_smoke():
  result = sampling.main([*TINY, "--num-steps", "1,2"])
  one, two = result["rows"]
  assert (one["num_steps"], two["num_steps"]) == (1, 2)
  assert two["model_flops"] == 2 * one["model_flops"]
  forward = flops.pixnerd_forward_flops(pixnerd.VARIANTS["tiny/4"], 2, 16, 16)
  for row in (one, two):  # the compiled sampler really runs num_steps network evaluations
    assert row["model_flops"] == row["num_steps"] * forward["total"]
    assert row["jaxpr_matmul_flops"] == row["num_steps"] * forward["executed"]
  assert one["jax_images_per_s"] > 0 and one["torch_images_per_s"] > 0


def test_eval_rate_main_smoke():
  """Eval and train on the same case (one device): 3 sampler calls of the case's 8 images, the
  images and annotations at twice the network's size (colours resized before decoding)."""
  result = eval_rate.main(
    [*TINY, "--config", "configs/demo.py:smoke", "--cases", "tiny/4:16:8", "--eval-batches", "3"]
    + ["--annotation-scale", "2", "--num-steps", "2"]
  )
  (row,) = result["rows"]
  assert row["eval_images"] == 24 and row["num_steps"] == 2 and row["annotation"] == (32, 32)
  assert row["train_images_per_s"] > 0 and row["eval_images_per_s"] > 0
  assert row["ratio"] == pytest.approx(row["eval_images_per_s"] / row["train_images_per_s"])


def _official_checkout(root):
  """A stand-in checkout of MCG-NJU/PixNerd: the official constructor over our torch reference."""
  module = root / "src" / "models" / "transformer" / "pixnerd_c2i.py"
  module.parent.mkdir(parents=True)
  module.write_text(FAKE_OFFICIAL)
  return root


def test_accelerator_check_script_cpu_mode(tmp_path):
  """tools/accelerator_check.sh --cpu: every stage in its own process, one JSON each as it ends,
  the same code paths as on a GPU (tiny models; the official stage on a stand-in checkout)."""
  import subprocess

  env = {**os.environ, "OUT": str(tmp_path / "out"), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  env["PYTHON"] = sys.executable  # no install: this interpreter
  env["PYTHONPATH"] = REPO  # the stand-in checkout imports tests.torch_reference
  env["STAGE_SCALE"], env["BUDGET_S"] = "6", "2400"  # a shared 2-core CPU, not a GPU
  official = _official_checkout(tmp_path / "PixNerd")
  cmd = ["bash", os.path.join(REPO, "tools", "accelerator_check.sh"), "--cpu"]
  proc = subprocess.run([*cmd, "--official-src", str(official)], env=env, capture_output=True,
                        text=True, timeout=900)  # fmt: skip
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = tmp_path / "out"
  records = {}
  for k, name in enumerate(["env", "train", "sampling", "preset", "official", "parity"], 1):
    records[name] = json.loads((out / f"{k}_{name}.json").read_text())
    assert records[name]["status"] == "ok", records[name]
  assert records["env"]["result"]["backend"] == "cpu" and records["env"]["result"]["torch"]
  for name in ("train", "preset"):
    row = records[name]["result"]["rows"][0]
    assert row["jax_step_s"]["median"] > 0 and row["xla_memory"]["peak_bytes"] > 0
  assert records["sampling"]["result"]["rows"][0]["num_steps"] == 10
  official_row = records["official"]["result"]["rows"][0]
  assert official_row["official_step_s"]["median"] > 0 and official_row["official_speedup"]
  parity = records["parity"]["result"]
  assert parity["device_vs_cpu_ok"] and parity["bf16_ok"]  # CPU vs CPU here: equal
  assert "attention_rel_l2" not in parity  # cuDNN needs a GPU
  log = (out / "accelerator_check.log").read_text()
  assert "== done in" in log and "== official: ok" in log
  # A spent budget: every stage says it did not run, in its own JSON.
  env["BUDGET_S"], env["OUT"] = "0", str(tmp_path / "late")
  assert subprocess.run(cmd, env=env, capture_output=True, timeout=60).returncode == 0
  late = json.loads((tmp_path / "late" / "2_train.json").read_text())
  assert late["status"] == "not run" and "budget" in late["reason"]


def test_accelerator_check_stage_errors_are_recorded(tmp_path, monkeypatch):
  """A stage that raises writes status 'error' with the message; one that cannot run, 'skipped'."""
  from tools import accelerator_check

  args = accelerator_check.parse_args(["--tiny", "--out-dir", str(tmp_path)])
  monkeypatch.setattr(accelerator_check, "stage_train", lambda a: 1 / 0)
  record = accelerator_check.run_stage("train", args)
  assert record["status"] == "error" and "ZeroDivisionError" in record["error"]
  assert json.loads((tmp_path / "2_train.json").read_text())["status"] == "error"
  assert accelerator_check.run_stage("official", args)["status"] == "skipped"


def test_constraints_are_what_this_environment_runs():
  """CI installs with tools/constraints-cuda12.txt, the GPU check too: the versions tested here
  are the ones a GPU machine gets."""
  from importlib import metadata

  path = os.path.join(REPO, "tools", "constraints-cuda12.txt")
  pins = dict(line.split("==") for line in open(path) if line.strip() and line[0] != "#")
  checked = 0
  for name, version in pins.items():
    try:
      installed = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue  # the CUDA plugin on a CPU machine
    assert installed.split("+")[0] == version.strip(), (name, installed, version)
    checked += 1
  assert checked >= 15


FAKE_OFFICIAL = """
from tests.torch_reference import pixnerd as reference


def PixNerDiT(in_channels, num_groups, hidden_size, hidden_size_x, nerf_mlpratio, num_blocks,
              num_cond_blocks, patch_size, num_classes):
  return reference.PixNerDiT(patch_size, hidden_size, num_groups, num_blocks, num_cond_blocks,
                             hidden_size_x, nerf_mlpratio, num_classes, in_channels)
"""


def test_train_step_official_src(tmp_path):
  """--official-src: the official constructor's signature, JAX's initial weights (strict load)."""
  _official_checkout(tmp_path)
  argv = [*TINY, "--no-torch", "--data", "none", "--official-src", str(tmp_path), "--also-scanned"]
  result = train_step.main(argv)
  (row,) = result["rows"]
  assert row["official_step_s"]["median"] > 0 and np.isfinite(row["official_loss"])
  assert row["official_speedup"] > 0 and row["official_speedup_per_round"]["n"] == 1
  # The network + AdamW alone (MSE loss) and the FlowSeg loss alone take turns in the same rounds.
  assert row["official_net_step_s"]["n"] == 1 and np.isfinite(row["official_net_loss"])
  assert row["official_net_speedup_per_round"]["n"] == 1
  assert 0 < row["official_loss_share"] and row["official_loss_fn_s"]["n"] == 1
  # tiny/4 unrolls by default (models.resolve_scan_blocks); --also-scanned times the scan as well.
  assert not row["scan"] and row["scanned_step_s"]["n"] == 1
  assert row["official_speedup_scanned_per_round"]["n"] == 1
  assert row["scan_cost"] == pytest.approx(
    row["scanned_step_s"]["median"] / row["jax_step_s"]["median"]
  )
  with pytest.raises(ValueError, match="not found"):
    train_step.main([*TINY, "--no-torch", "--data", "none", "--official-src", str(tmp_path / "x")])


def test_decode_order_compares_both_orders_on_finer_annotations():
  """experiments/decode_order.py: at scale 1 both orders are one map; at scale 2 the labels are
  twice as fine and both orders score every labelled pixel."""
  from experiments import decode_order
  from flowseg_jax import inference, sharding, tasks

  config = configs.load_config("configs/demo.py:smoke")
  task = tasks.create_task(config)
  x, t, y = task.init_inputs(config.input.image_size)
  params = task.model.init(jax.random.key(1), x, t, y)["params"]
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  seg = inference.Segmenter(config, params, task=task, mesh=mesh)
  same = decode_order.compare_orders(seg, decode_order.scaled_eval_examples(config, 1, 3))
  new, old = (same[o] for o in decode_order.ORDERS)
  np.testing.assert_array_equal(new["intersection"], old["intersection"])
  np.testing.assert_array_equal(new["pred_area"], old["pred_area"])
  fine = decode_order.scaled_eval_examples(config, 2, 3)
  assert fine[0][1].shape == tuple(2 * s for s in config.input.synthetic.size)
  result = decode_order.compare_orders(seg, fine)
  labelled = sum(int(((lab != 255) & (lab < seg.num_classes)).sum()) for _, lab in fine)
  for order in decode_order.ORDERS:
    assert int(result[order]["label_area"].sum()) == labelled
  first, second = (result[o]["pred_area"] for o in decode_order.ORDERS)
  assert not np.array_equal(first, second)  # the orders differ where the labels are finer


def test_scripts_are_modules_of_packages_without_path_edits():
  """Every script runs from the repository root as `python -m <package>.<script>`."""
  for package in ("benchmarks", "tools", "experiments"):
    folder = os.path.join(REPO, package)
    assert os.path.isfile(os.path.join(folder, "__init__.py")), package
    for name in sorted(os.listdir(folder)):
      if name.endswith((".py", ".sh")):
        with open(os.path.join(folder, name)) as f:
          text = f.read()
        assert not re.search(r"sys\.path\.(insert|append)|PYTHONPATH=", text), f"{package}/{name}"


def test_input_demand_arithmetic():
  """workers = ceil(chips per host x 0.5 x bf16 peak / (3 x forward FLOPs) / per-worker rate)."""
  from benchmarks import input_demand

  rows = {(r["target"], r["stage"]): r for r in input_demand.table({256: 10.0, 512: 20.0})}
  arch = {**pixnerd.VARIANTS["XL/16"], "in_channels": 3}
  per_image = flops.train_step_flops(arch, 1, 256, 256)
  v5e = rows[("v5e-8", "1")]
  np.testing.assert_allclose(v5e["images_per_s_chip"], 0.5 * 197e12 / per_image)
  assert v5e["workers"] == int(np.ceil(8 * 0.5 * 197e12 / per_image / 100.0))
  assert rows[("h100-8", "2")]["images_per_s_worker"] == 50.0  # 20 ms per 512² image
  # The presets' grain workers are the table's at the measured per-worker rates.
  from configs import flowseg_ade20k

  measured = input_demand.table(input_demand.MEASURED_MS_PER_IMAGE)
  assert {(r["target"], r["stage"]): r["workers"] for r in measured} == {
    (t, st): n for t, stages in flowseg_ade20k.INPUT_WORKERS.items() for st, n in stages.items()
  }
  config = flowseg_ade20k.get_config("stage=1,target=h100-8")
  assert config.input.num_workers == 32
