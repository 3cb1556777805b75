"""First run on a GPU (or TPU VM): the numbers to read off one device, one stage at a time.

`tools/accelerator_check.sh` installs the locked versions, then runs each stage in its own process
under its own time limit (`python -u -m tools.accelerator_check --stage NAME --out-dir OUT`); each
stage writes OUT/<k>_<stage>.json the moment it ends: {"stage", "status": "ok" | "error" |
"skipped" (the shell writes "timeout"), "elapsed_s", "result" | "error" | "reason"}. Stages:

  env       jax / jaxlib / torch versions, devices, CUDA and cuDNN as the runtime reports them;
  train     XL/16 256² batch 64 train step, bf16, cuDNN attention on GPU: ms/step, images/s,
            MFU against the datasheet peak, XLA's peak memory (`benchmarks/train_step.py`);
  sampling  10-step Euler sampling at 512² (batch 16), images/s (`benchmarks/sampling.py`);
  preset    the `h100-8` preset's per-GPU step: configs/flowseg_ade20k.py:stage=1,target=h100-8
            (remat none) at its per-GPU batch of 64 / 8 = 8 (REPA off: no teacher weights here);
  official  the official PyTorch PixNerDiT + AdamW + EMA step vs ours at XL/16 256² batch 16, same
            GPU, interleaved rounds (needs --official-src, a checkout of MCG-NJU/PixNerd);
  parity    S/16 float32 loss and gradient norm on the accelerator vs this host's CPU, in one
            process (matmuls at 'highest' precision: TF32 would differ by ~1e-3), and the bf16 vs
            float32 loss and cuDNN vs XLA attention on the accelerator.

`--tiny` runs the same code on tiny models at 32² (a CPU machine: what the test runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import configs, sampling
from benchmarks import train_step as train_step_benchmark
from flowseg_jax import tasks, train_step

STAGES = ("env", "train", "sampling", "preset", "official", "parity")
FULL = {
  "train": "XL/16:256:64",
  "sampling": "XL/16:512:16",
  "preset": "XL/16:256:8",
  "official": "XL/16:256:16",
  "parity": "S/16:256:4",
}
TINY = {k: "tiny/4:32:4" for k in FULL}
PRESET_CONFIG = "configs/flowseg_ade20k.py:stage=1,target=h100-8"
LOSS_RTOL = 2e-2  # bf16 vs float32 loss: 8 mantissa bits, averaged over millions of terms
ATTENTION_RTOL = 2e-2  # cuDNN vs XLA attention, both bf16 with float32 softmax statistics
DEVICE_CPU_RTOL = 1e-4  # float32 at 'highest' precision: summation order only


class Skipped(Exception):
  """A stage that cannot run here, with the reason."""


def _timing(args) -> list[str]:
  return ["--rounds", str(args.rounds), "--steps", str(args.steps), "--warmup", "1"]


def _dtype(args) -> str:
  return "float32" if args.tiny else "bfloat16"  # CPU compiles bf16 programs slowly


def _attention(args) -> list[str]:
  return ["--attention-impl", "cudnn"] if jax.default_backend() == "gpu" else []


def _summary(rows: list[dict]) -> list[dict]:
  keys = ("case", "jax_step_s", "jax_images_per_s", "mfu", "model_flops", "xla_memory",
          "official_step_s", "official_speedup", "compile_s")  # fmt: skip
  return [{k: r[k] for k in keys if k in r} for r in rows]


def stage_env(args) -> dict:
  out = {
    "python": sys.version.split()[0],
    "platform": platform.platform(),
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [d.device_kind for d in jax.devices()],
  }
  try:
    import jaxlib

    out["jaxlib"] = jaxlib.__version__
  except ImportError:
    pass
  try:
    import torch

    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    if torch.cuda.is_available():
      out["torch_cudnn"] = torch.backends.cudnn.version()
  except ImportError:
    out["torch"] = None
  if jax.default_backend() == "gpu":
    from jax._src.lib import cuda_versions  # the versions jaxlib's CUDA plugin loaded

    if cuda_versions is not None:
      out["cuda_runtime"] = cuda_versions.cuda_runtime_get_version()
      out["cudnn"] = cuda_versions.cudnn_get_version()
  return out


def _train(args, config: str, case: str, extra=()) -> dict:
  flags = ["--config", config, "--dtype", _dtype(args), *_timing(args), *_attention(args)]
  result = train_step_benchmark.main(
    [*flags, "--cases", case, "--no-torch", "--data", "none", *extra]
  )
  return {"rows": _summary(result["rows"]), "peak_flops": result["peak_flops"]}


def stage_train(args) -> dict:
  return _train(args, args.config, (TINY if args.tiny else FULL)["train"], ["--remat", "none"])


def stage_sampling(args) -> dict:
  case = (TINY if args.tiny else FULL)["sampling"]
  flags = ["--config", args.config, "--dtype", _dtype(args), *_timing(args), *_attention(args)]
  result = sampling.main([*flags, "--cases", case, "--num-steps", "10", "--no-torch"])
  return {"rows": result.get("rows", result)}


def stage_preset(args) -> dict:
  config = args.config if args.tiny else PRESET_CONFIG
  return _train(args, config, (TINY if args.tiny else FULL)["preset"], ["--remat", "none"])


def stage_official(args) -> dict:
  if not args.official_src:
    raise Skipped("no --official-src (a checkout of github.com/MCG-NJU/PixNerd)")
  import torch

  if jax.default_backend() == "gpu" and not torch.cuda.is_available():
    raise Skipped(f"torch {torch.__version__} cannot use this GPU (CPU build or driver too old)")
  case = (TINY if args.tiny else FULL)["official"]
  flags = ["--official-src", args.official_src, "--interleave", "on", "--torch-threads", "1"]
  if args.tiny:
    flags += ["--no-torch"]  # only the official network, as on the GPU
  return _train(args, args.config, case, ["--remat", "none", *flags])


def _params_and_batch(config, seed: int = 0):
  """Initial parameters with a random (not zero) output layer, and a random batch."""
  setup = train_step.TrainSetup(config)
  params = jax.jit(lambda k: nn.unbox(setup.init_params(k)))(jax.random.key(seed))
  final = params["denoiser"]["final_layer"]["linear"]
  final["kernel"] = 0.02 * jax.random.normal(jax.random.key(seed + 1), final["kernel"].shape)
  batch = configs.random_batch(config, setup.task.num_classes, seed=seed)
  return params, batch


def _loss_and_grad_norm(config, params, batch, device) -> tuple[float, float]:
  setup = train_step.TrainSetup(config)
  valid = np.sum(batch["label"] != 255).astype(np.int32)
  cond = np.asarray(setup.task.condition(batch))

  def loss(p, x, y):
    return train_step.loss_fn(p, None, x, y, jax.random.key(0), valid, cond, setup=setup)[0]

  put = lambda t: jax.device_put(t, device)  # noqa: E731
  value, grads = jax.jit(jax.value_and_grad(loss))(
    put(params), put(batch["image"]), put(batch["label"])
  )
  return float(value), float(jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads))))


def _output(config, params, batch) -> np.ndarray:
  task = tasks.create_task(config)
  b = batch["image"].shape[0]
  t = jnp.linspace(0.1, 0.9, b)
  y = jnp.full((b,), task.cond_label, jnp.int32)
  fn = jax.jit(lambda p, x: task.apply(p["denoiser"], x, t, y))
  return np.asarray(fn(params, batch["image"]), np.float32)


def stage_parity(args) -> dict:
  case = configs.parse_cases((TINY if args.tiny else FULL)["parity"])[0]
  base = configs.load_config(args.config)
  f32 = configs.case_config(base, case, dtype="float32", attention_impl="xla")
  params, batch = _params_and_batch(f32)
  with jax.default_matmul_precision("highest"):
    accel = _loss_and_grad_norm(f32, params, batch, jax.devices()[0])
    host = _loss_and_grad_norm(f32, params, batch, jax.devices("cpu")[0])
  out = {"case": case.label, "device": jax.devices()[0].device_kind}
  for i, name in enumerate(("loss", "grad_norm")):
    out[f"{name}_device"], out[f"{name}_cpu"] = accel[i], host[i]
    out[f"{name}_rel_diff"] = abs(accel[i] - host[i]) / max(abs(host[i]), 1e-12)
  out["device_vs_cpu_ok"] = max(out["loss_rel_diff"], out["grad_norm_rel_diff"]) <= DEVICE_CPU_RTOL
  bf16 = configs.case_config(base, case, dtype="bfloat16", attention_impl="xla")
  loss16 = _loss_and_grad_norm(bf16, params, batch, jax.devices()[0])[0]
  out["loss_bfloat16"], out["bf16_rel_diff"] = loss16, abs(loss16 - accel[0]) / abs(accel[0])
  out["bf16_ok"] = out["bf16_rel_diff"] <= LOSS_RTOL
  if jax.default_backend() == "gpu":
    cudnn = configs.case_config(base, case, dtype="bfloat16", attention_impl="cudnn")
    a, b = _output(bf16, params, batch), _output(cudnn, params, batch)
    out["attention_rel_l2"] = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
    out["attention_ok"] = out["attention_rel_l2"] <= ATTENTION_RTOL
  return out


def run_stage(name: str, args) -> dict:
  """Runs one stage and writes its JSON (also on failure); returns what it wrote."""
  start = time.perf_counter()
  record = {"stage": name}
  try:
    record.update(status="ok", result=globals()[f"stage_{name}"](args))
  except Skipped as e:
    record.update(status="skipped", reason=str(e))
  except Exception as e:  # noqa: BLE001 -- a failed stage is reported, and the next one runs
    record.update(
      status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()
    )
  record["elapsed_s"] = round(time.perf_counter() - start, 1)
  if args.out_dir:
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{STAGES.index(name) + 1}_{name}.json")
    with open(path, "w") as f:
      json.dump(record, f, indent=2, default=str)
  return record


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--stage", choices=STAGES, action="append", help="default: every stage in order")
  p.add_argument("--tiny", action="store_true", help="tiny models at 32² (CPU)")
  p.add_argument("--config", default=configs.DEFAULT_CONFIG)
  p.add_argument("--official-src", default=None, help="a local checkout of MCG-NJU/PixNerd")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out-dir", default=None, help="each stage's JSON goes here")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  failed = False
  for name in args.stage or STAGES:
    print(f"== {name}", flush=True)
    record = run_stage(name, args)
    detail = record.get("reason") or record.get("error") or ""
    print(f"== {name}: {record['status']} in {record['elapsed_s']} s {detail}".rstrip(), flush=True)
    failed |= record["status"] == "error"
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
