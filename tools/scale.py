"""Memory plan at paper scale without the hardware: AOT-compile the real programs for N devices.

For a config and each device count N (host-platform CPU devices, one subprocess per N with
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, since the count is fixed when JAX starts)
and each mesh shape (data x fsdp = N, fsdp a power of two) and remat policy, this lowers and
compiles the train step (`train_step.compile_train_step` on `train_state.abstract_train_state`,
with the REPA teacher as `ShapeDtypeStruct`s of the configured DINOv2 variant: nothing is
allocated) and evaluation's programs (the Euler sampler `inference.sample_fn`, `config.eval.num_steps`
steps, and the decoding and confusion matrix of `scoring.score_fn`), and prints per
device: argument, output and temporary bytes (`compiled.memory_analysis()`), the peak (arguments
+ non-aliased outputs + temporaries), XLA's FLOPs (`cost_analysis()`, a while-loop body counted
once) next to the model FLOPs / N, the bytes of every all-gather / reduce-scatter / all-reduce /
all-to-all / collective-permute result in the optimised HLO (loop bodies multiplied by their
known trip counts), and whether the step fits each target:

  fit rule: peak <= 85% of the device's memory -> "yes"; <= 100% -> "tight"; else "no".

The 15% is headroom for what the compiled program does not count: the runtime and its allocator
fragmentation, collective buffers (NCCL), cuDNN workspaces, the input pipeline's device buffers,
and the difference between XLA:CPU's fusion and layout decisions and XLA:TPU/GPU's. On GPUs, JAX
reserves 75% of the memory by default: use `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` for the plans
marked "yes". Capacities (GiB, usable): H100 80, A100 40, TPU v4 32, v5e 16, v5p 95, v6e 32.

  python -m tools.scale --config configs/flowseg_ade20k.py:stage=1 --devices 8,16,64
  python -m tools.scale --config configs/flowseg_ade20k.py:stage=2 --devices 8,16 \\
      --remat none,dots_with_no_batch_dims_saveable,nothing_saveable --markdown plan.md

The real TPU and GPU compilers plan without the hardware (compile-only devices, see
tools/compile_targets.py): `--topology v5e:2x4,v5e:8x8` (libtpu: `pip install "jax[tpu]==<jax>"`)
and `--gpu h100:8,a100:8` (`pip install "jax[cuda12]==<jax>"`, GPU target configs in
benchmarks/gpu_targets/). Their rows judge the fit against that chip's own memory ("fit") and
count the cuDNN fused-attention calls in the GPU program ("fused attn").

  python -m tools.scale --config configs/flowseg_ade20k.py:stage=1,target=v5e-8 --topology v5e:2x4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tools import compile_targets, config_overrides, hlo_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the worker runs from here
GIB = 2**30
HEADROOM = 0.85
# Usable device memory, GiB (H100 SXM: 80 GB HBM3; A100: the 40 GB model).
TARGETS = {
  "H100-80G": 80.0,
  "A100-40G": 40.0,
  "v4": 32.0,
  "v5e": 16.0,
  "v5p": 95.0,
  "v6e": 32.0,
}


def fit(peak_bytes: int | None, capacity_gib: float) -> str:
  """'yes' when the peak leaves the headroom free, 'tight' when it merely fits, else 'no'."""
  if peak_bytes is None:
    return "?"
  if peak_bytes <= HEADROOM * capacity_gib * GIB:
    return "yes"
  return "tight" if peak_bytes <= capacity_gib * GIB else "no"


# ------------------------------------------------------------------------------------------------
# One device count (runs inside the process that owns N devices).
# ------------------------------------------------------------------------------------------------


def fsdp_sizes(n: int) -> list[int]:
  return [f for f in (2**i for i in range(n.bit_length())) if n % f == 0]


def _memory(compiled) -> dict:
  from benchmarks import hardware

  return hardware.memory_summary(compiled)


def plan_train_step(config, mesh, rules) -> dict:
  """Compiles the train step for `mesh` from abstract state: memory, FLOPs, collectives."""
  import flax.linen as nn
  import jax

  from benchmarks import flops
  from flowseg_jax import train_step
  from tools import abstract_inputs

  setup, state, shardings, batch, teacher_params = abstract_inputs.train_step_inputs(
    config, mesh, rules
  )
  b, (h, w) = config.input.batch_size, tuple(config.input.image_size)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    jitted = train_step.compile_train_step(setup, mesh, shardings)
    start = time.perf_counter()
    compiled = jitted.lower(state, batch, teacher_params).compile()
    compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  arch = setup.task.architecture()
  return (
    {
      "compile_s": compile_s,
      "memory": _memory(compiled),
      "xla_flops": flops.xla_flops(compiled),
      "model_flops": _model_flops(arch, 3 * b, h, w, mesh.size),
      "collective_bytes": hlo_counts.collective_bytes(hlo),
      "fused_attention": hlo_counts.fused_attention_calls(hlo),
      "num_params": sum(int(a.size) for a in jax.tree.leaves(state.params)),
    },
    setup,
    state,
  )


def _model_flops(arch: dict, passes: int, h: int, w: int, n: int) -> float | None:
  """Matmul FLOPs per device of `passes` image forwards (training: 3 per image); None for a model
  `benchmarks.flops` has no formula for (PixNerd-T2I: XLA's count stands alone)."""
  from benchmarks import flops

  if "num_cond_blocks" not in arch:
    return None
  return passes * flops.pixnerd_forward_flops(arch, 1, h, w)["total"] / n


def plan_sampler(config, setup, state, mesh, rules) -> dict:
  """Compiles evaluation's two device programs: the Euler sampler on the EMA denoiser (sharded like
  training), config.eval.batch_per_device windows per device, and the scorer that decodes and
  counts the confusion matrix (`scoring.score_fn`, one full call of pixels per device, with
  config.eval.tta's views). They run one after the other: the eval peak is the larger."""
  import flax.linen as nn
  import jax

  from benchmarks import flops
  from flowseg_jax import inference, inference_host, scoring
  from tools import abstract_inputs

  n = mesh.size
  images, conds = abstract_inputs.sampler_inputs(config, mesh, setup.task)
  b, h, w, _ = images.shape
  num_views = len(inference_host.tta_views(config))
  colours, labels = abstract_inputs.scorer_inputs(mesh, num_views)
  # Built outside the mesh context: its centroid table is then made on the host's default device
  # (under the mesh it would be placed on the mesh, whose devices may be compile-only).
  fn = inference.sample_fn(setup.task, mesh, setup.task.sampler_options())
  score = scoring.score_fn(setup.task, mesh, num_views)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    start = time.perf_counter()
    compiled = fn.lower(state.ema_params["denoiser"], images, conds).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    scorer = score.lower(colours, labels).compile()
    scorer_s = time.perf_counter() - start
  arch = setup.task.architecture()
  steps = config.eval.num_steps
  memory, scorer_memory = _memory(compiled), _memory(scorer)
  return {
    "batch": b,
    "num_steps": steps,
    "compile_s": compile_s,
    "memory": memory,
    "xla_flops": flops.xla_flops(compiled),
    "model_flops": _model_flops(arch, steps * b, h, w, n),
    "collective_bytes": hlo_counts.collective_bytes(compiled.as_text()),
    "scorer": {
      "pixels_per_device": colours.shape[1] // n,
      "views": num_views,
      "compile_s": scorer_s,
      "memory": scorer_memory,
    },
    "eval_peak_bytes": max(memory["peak_bytes"], scorer_memory["peak_bytes"]),
  }


def plan_devices(
  config_spec: str,
  target: int | str,
  *,
  remats: list[str] | None,
  fsdps: list[int] | None,
  sampler: bool,
  overrides: dict | None = None,
) -> list[dict]:
  """Rows for a target (N host devices of this process, or a `compile_targets` TPU topology / GPU
  target): one per (remat, mesh); errors are rows, not crashes."""
  import ml_collections

  from benchmarks import configs
  from flowseg_jax import sharding, train_step

  target = str(target)
  devices = compile_targets.devices(target)
  n = len(devices)
  device_gib = compile_targets.device_memory_gib(devices[0], target)
  base = configs.load_config(config_spec)
  config_overrides.apply_overrides(base, overrides or {})
  rows = []
  for remat in remats or [base.model.remat_policy]:
    for fsdp in fsdps or fsdp_sizes(n):
      row = {"config": config_spec, "devices": n, "data": n // fsdp, "fsdp": fsdp, "remat": remat}
      if not target.isdigit():
        row.update(target=target, device_kind=devices[0].device_kind, device_gib=device_gib)
      rows.append(row)
      if n % fsdp:
        row["error"] = f"fsdp={fsdp} does not divide {n} devices"
        continue
      config = ml_collections.ConfigDict(base.to_dict())
      config.model.remat_policy = remat
      config.mesh.data, config.mesh.fsdp = n // fsdp, fsdp
      row.update(
        batch=config.input.batch_size,
        image_size=list(config.input.image_size),
        grad_accum_steps=config.optim.grad_accum_steps,
        repa=bool(config.repa.enabled),
        variant=config.prompted.variant
        if config.get("task") == "prompted"
        else config.model.variant,
        dtype=config.model.dtype,
      )
      mesh = sharding.make_mesh(n // fsdp, fsdp, devices)
      try:
        train_step.check_batch_fits_mesh(config, mesh)
      except ValueError as e:
        row["error"] = str(e)
        continue
      rules = sharding.rules_from_config(config.sharding_rules)
      try:
        row["train"], setup, state = plan_train_step(config, mesh, rules)
      except Exception as e:  # the TPU compiler refuses a program that cannot fit: a row
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        row["error"] = str(e).strip().splitlines()[0][:300]
        continue
      peak = row["train"]["memory"]["peak_bytes"]
      if device_gib is None:  # host devices: judged against every target
        row["fits"] = {t: fit(peak, c) for t, c in TARGETS.items()}
      else:  # the target's own compiler: judged against its own memory
        row["fit"] = fit(peak, device_gib)
      if sampler:
        row["sampler"] = s = plan_sampler(config, setup, state, mesh, rules)
        # Model FLOPs per image, training's forward + backward against evaluation's num_steps
        # forwards: the eval/train images/s that an equal MFU gives (benchmarks/eval_rate.py
        # measures the real ratio).
        per_train_image = row["train"]["model_flops"] / config.input.batch_size
        s["rate_vs_train"] = per_train_image / (s["model_flops"] / s["batch"])
      print(json.dumps({"progress": _short(row)}), file=sys.stderr, flush=True)
  return rows


def _short(row: dict) -> str:
  if "error" in row:
    return f"{row['config']} {row.get('target', 'cpu')}: {row['error']}"
  t = row.get("train", {})
  peak = t.get("memory", {}).get("peak_bytes")
  return (
    f"{row['config']} {row.get('target', 'cpu')} N={row['devices']} data={row['data']} "
    f"fsdp={row['fsdp']} remat={row['remat']}: peak {peak / GIB if peak else float('nan'):.2f} GiB, "
    f"compile {t.get('compile_s', float('nan')):.0f} s"
  )


# ------------------------------------------------------------------------------------------------
# Driver: one subprocess per device count.
# ------------------------------------------------------------------------------------------------


def run_target(args, target: int | str, config: str | None = None, python=None) -> list[dict]:
  """Rows of one target: in this process when it already has the N host devices (tests), else in
  a fresh subprocess (`python`, default this interpreter) whose environment
  `compile_targets.worker_env` sets up for the target."""
  target, config = str(target), config or args.config
  in_process = False
  if target.isdigit() and "jax" in sys.modules:
    import jax

    in_process = jax.device_count() == int(target)
  options = dict(remats=args.remat, fsdps=args.fsdp, sampler=args.sampler, overrides=args.set)
  if in_process:
    return plan_devices(config, target, **options)
  env = compile_targets.worker_env(target, os.environ)
  cmd = [
    python or sys.executable,
    "-m",
    "tools.scale",
    "--worker",
    json.dumps([config, target, options]),
  ]
  start = time.perf_counter()
  proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, timeout=args.timeout)
  lines = proc.stdout.decode().strip().splitlines()
  if proc.returncode or not lines:
    return [{"config": config, "target": target, "error": f"worker exit {proc.returncode}"}]
  rows = json.loads(lines[-1])
  for row in rows:
    row["worker_s"] = time.perf_counter() - start
  return rows


def _gib(value) -> str:
  return "–" if value is None else f"{value / GIB:.2f}"


def table_rows(rows: list[dict]) -> list[dict]:
  out = []
  for r in rows:
    base = {
      "config": r["config"].split("/")[-1],
      "target": r.get("target", "cpu"),
      "N": r.get("devices", "?"),
      "mesh": f"{r.get('data', '?')}x{r.get('fsdp', '?')}",
      "remat": r.get("remat", ""),
    }
    if "error" in r:
      out.append({**base, "note": r["error"]})
      continue
    t, m = r["train"], r["train"]["memory"]
    coll = t["collective_bytes"]
    row = {
      **base,
      "args": _gib(m["argument_bytes"]),
      "out": _gib(m["output_bytes"] - (m["alias_bytes"] or 0)),
      "temp": _gib(m["temp_bytes"]),
      "peak": _gib(m["peak_bytes"]),
      "tflop": "–" if t["model_flops"] is None else f"{t['model_flops'] / 1e12:.2f}",
      "xla_tflop": "–" if t["xla_flops"] is None else f"{t['xla_flops'] / 1e12:.2f}",
      "ag": _gib(coll.get("all-gather", 0)),
      "rs": _gib(coll.get("reduce-scatter", 0)),
      "ar": _gib(coll.get("all-reduce", 0)),
      "compile": f"{t['compile_s']:.0f}",
      **r.get("fits", {}),
    }
    if "fit" in r:
      row["fit"] = f"{r['fit']} ({r['device_gib']:.0f} GiB)"
    if r.get("target", "").startswith("gpu:"):
      row["fused"] = str(t.get("fused_attention", 0))
    if "sampler" in r:
      s = r["sampler"]
      row["sampler"] = (
        f"{_gib(s['eval_peak_bytes'])} (sampler b{s['batch']} {_gib(s['memory']['peak_bytes'])}, "
        f"scorer {_gib(s['scorer']['memory']['peak_bytes'])}; {s['compile_s']:.0f} s; "
        f"x{s['rate_vs_train']:.2f} train img/s at equal MFU)"
      )
    out.append(row)
  return out


COLUMNS = [
  ("config", "config"),
  ("target", "compiler target"),
  ("N", "N"),
  ("mesh", "data x fsdp"),
  ("remat", "remat"),
  ("args", "args GiB"),
  ("out", "out GiB"),
  ("temp", "temp GiB"),
  ("peak", "peak GiB"),
  ("tflop", "model TFLOP/dev"),
  ("xla_tflop", "XLA TFLOP/dev"),
  ("ag", "all-gather GiB"),
  ("rs", "reduce-scatter GiB"),
  ("ar", "all-reduce GiB"),
  ("compile", "compile s"),
  *[(t, t) for t in TARGETS],
  ("fit", "fit (device memory)"),
  ("fused", "fused attn calls"),
  ("sampler", "eval peak GiB"),
  ("note", "note"),
]


def markdown(rows: list[dict], columns=None) -> str:
  """A markdown table of the columns ((key, header) pairs, default COLUMNS) that some row has."""
  cols = [(k, h) for k, h in columns or COLUMNS if any(k in r for r in rows)]
  lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
  return "\n".join(lines)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--config", default="configs/flowseg_ade20k.py:stage=1")
  p.add_argument(
    "--devices",
    default=None,
    help="host device counts, e.g. 8,16,64,256 (default 8,16,64 "
    "unless --topology or --gpu is given)",
  )
  p.add_argument("--topology", default=None, help="TPU topologies, e.g. v5e:2x4,v5e:8x8")
  p.add_argument("--gpu", default=None, help="GPU targets NAME:COUNT, e.g. h100:8,a100:8")
  p.add_argument("--fsdp", default=None, help="fsdp sizes to try (default: every power of 2)")
  p.add_argument("--remat", default=None, help="remat policies to try (default: the config's)")
  p.add_argument(
    "--set", action="append", default=[], help="config override KEY=VALUE (JSON value)"
  )
  p.add_argument("--sampler", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument("--timeout", type=float, default=3600, help="seconds per target")
  p.add_argument("--json", default=None)
  p.add_argument("--markdown", default=None, help="append the table to this file")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.devices is None and not (args.topology or args.gpu):
    args.devices = "8,16,64"
  args.targets = [str(int(x)) for x in (args.devices or "").split(",") if x]
  args.targets += [f"tpu:{t}" for t in (args.topology or "").split(",") if t]
  args.targets += [f"gpu:{t}" for t in (args.gpu or "").split(",") if t]
  for target in args.targets:
    compile_targets.parse(target)
  args.fsdp = [int(x) for x in args.fsdp.split(",")] if args.fsdp else None
  args.remat = args.remat.split(",") if args.remat else None
  args.set = dict(config_overrides.parse_override(s) for s in args.set)
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  if args.worker:  # a subprocess that owns the target's devices: rows as one JSON line on stdout
    config_spec, target, options = json.loads(args.worker)
    try:
      rows = plan_devices(config_spec, target, **options)
    except compile_targets.TargetError as e:  # e.g. the compiler is not installed
      rows = [{"config": config_spec, "target": target, "error": str(e)}]
    print(json.dumps(rows))
    return []
  rows = []
  for target in args.targets:
    rows.extend(run_target(args, target))
  from benchmarks import output

  table = table_rows(rows)
  output.print_table(table, [c for c in COLUMNS if any(c[0] in r for r in table)])
  if args.markdown:
    with open(args.markdown, "a") as f:
      f.write(f"\n`{args.config}`\n\n" + markdown(table) + "\n")
  output.write_json(args.json, {"benchmark": "scale", "args": vars(args), "rows": rows})
  return rows


if __name__ == "__main__":
  main()
