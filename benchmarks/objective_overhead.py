"""What the reshaped objective costs: the train step with reshaping on vs vanilla flow matching.

Times the real train step twice per case, `config.objective.reshape=True` (static target v - grad
Phi, the FlowSeg objective) and `False` (vanilla FM, target v), compiled ahead of time and taking
turns round by round so that the machine's load hits both alike. Also times the objective alone
(`flow.flowseg_loss` and its gradient with respect to the network output, on a fixed output) in
both modes, which isolates the potential's cost from the model's noise, and reports XLA's bytes
accessed for it (the potential is memory-bound on accelerators: bytes / bandwidth bounds its time).
Goal: overhead <= 2% of the step.

Read both numbers: with reshape=False `flow.flowseg_loss` evaluates no potential at all (its
`grad_phi_norm` metric is 0), so the step-level delta is the whole cost of reshaping; the
loss-only delta (`potential/step`) isolates it from the model's timing noise.

  python -m benchmarks.objective_overhead                              # CPU: S/16 at 64 and 128
  python -m benchmarks.objective_overhead --cases XL/16:256:64 --json overhead.json   # one GPU
"""

from __future__ import annotations

import argparse
import functools
import gc

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import compiled_step, configs, flags, output, timing
from flowseg_jax import flow, train_step


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  flags.add_common_flags(p, torch=False)
  return p.parse_args(argv)


class LossOnly:
  """jit(value_and_grad of flowseg_loss w.r.t. the network output) on a fixed batch."""

  def __init__(self, setup: train_step.TrainSetup, batch: dict[str, np.ndarray], *, reshape: bool):
    kwargs = {**setup.task.objective.loss_options(), "reshape": reshape}
    rng = np.random.default_rng(1)
    b = batch["image"].shape[0]
    self.args = (
      jnp.asarray(rng.normal(0, 0.5, batch["image"].shape).astype(np.float32)),  # out
      jnp.asarray(batch["image"]),
      jnp.asarray(batch["label"]),
      jnp.asarray(rng.uniform(0, 1, (b,)).astype(np.float32)),  # t
      setup.task.centroids,
    )

    def loss(out, x0, labels, t, centroids):
      return flow.flowseg_loss(out, x0, labels, t, centroids, **kwargs)[0]

    self.compiled = jax.jit(jax.value_and_grad(loss)).lower(*self.args).compile()
    cost = None
    try:
      cost = self.compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, list | tuple) else cost
    except Exception:
      pass
    self.bytes_accessed = (
      float(cost["bytes accessed"]) if cost and "bytes accessed" in cost else None
    )
    self.num_kernels = self.compiled.as_text().count(" fusion(")

  def run(self, n: int) -> None:
    out = None
    for _ in range(n):
      out = self.compiled(*self.args)
    jax.block_until_ready(out)


def bench_case(case: configs.Case, base, args, dtype: str) -> dict:
  make = functools.partial(
    configs.case_config,
    base,
    case,
    dtype=dtype,
    remat=args.remat,
    scan=args.scan,
    attention_impl=args.attention_impl,
  )
  setups = {
    "reshaped": train_step.TrainSetup(make(reshape=True)),
    "vanilla": train_step.TrainSetup(make(reshape=False)),
  }
  batch = configs.random_batch(setups["reshaped"].config, setups["reshaped"].task.num_classes)
  steps = {k: compiled_step.JaxTrainStep(s, batch, count_flops=False) for k, s in setups.items()}
  times = timing.interleaved_rounds(
    {k: s.run for k, s in steps.items()}, rounds=args.rounds, steps=args.steps, warmup=args.warmup
  )
  losses = {
    k: LossOnly(setups["reshaped"], batch, reshape=k == "reshaped") for k in ("reshaped", "vanilla")
  }
  loss_times = timing.interleaved_rounds(
    {k: lo.run for k, lo in losses.items()},
    rounds=args.rounds,
    steps=max(args.steps, 5),
    warmup=args.warmup,
  )
  step_r, step_v = (timing.summarize(times[k]) for k in ("reshaped", "vanilla"))
  loss_r, loss_v = (timing.summarize(loss_times[k]) for k in ("reshaped", "vanilla"))
  per_round = [r / v - 1.0 for r, v in zip(times["reshaped"], times["vanilla"])]
  potential_s = loss_r["median"] - loss_v["median"]
  row = {
    "case": case.label,
    "dtype": dtype,
    "num_classes": setups["reshaped"].task.num_classes,
    "step_reshaped_s": step_r,
    "step_vanilla_s": step_v,
    "step_overhead": step_r["median"] / step_v["median"] - 1.0,
    "step_overhead_per_round": timing.summarize(per_round),
    "loss_reshaped_s": loss_r,
    "loss_vanilla_s": loss_v,
    "potential_s": potential_s,
    "potential_share_of_step": potential_s / step_v["median"],
    "loss_bytes_accessed": {k: lo.bytes_accessed for k, lo in losses.items()},
    "loss_kernels": {k: lo.num_kernels for k, lo in losses.items()},
    "xla_memory": {k: s.memory for k, s in steps.items()},
  }
  del steps, losses
  gc.collect()
  return row


def main(argv=None) -> dict:
  args = parse_args(argv)
  cases, dtype, _ = flags.setup_run(args)
  base = configs.load_config(args.config)
  env = output.environment()
  print(
    f"objective overhead: JAX {env['jax']} on {env['backend']} ({env['device_kind']}), {dtype}, "
    f"remat={args.remat}, scan={args.scan}; {args.rounds} rounds x {args.steps} steps, "
    f"load {env['load_average']}"
  )
  rows = []
  for case in cases:
    rows.append(bench_case(case, base, args, dtype))
    print(f"  done {case.label}", flush=True)
  table = []
  for r in rows:
    pr = r["step_overhead_per_round"]
    mem = r["xla_memory"]
    table.append(
      {
        "case": r["case"],
        "n": str(r["num_classes"]),
        "vanilla": f"{r['step_vanilla_s']['median'] * 1e3:.1f}",
        "reshaped": f"{r['step_reshaped_s']['median'] * 1e3:.1f}",
        "overhead": f"{r['step_overhead']:+.1%}",
        "rounds": f"{pr['median']:+.1%} [{pr['min']:+.1%}, {pr['max']:+.1%}]",
        "loss_v": f"{r['loss_vanilla_s']['median'] * 1e3:.2f}",
        "loss_r": f"{r['loss_reshaped_s']['median'] * 1e3:.2f}",
        "share": f"{r['potential_share_of_step']:+.1%}",
        "bytes": output.fmt(r["loss_bytes_accessed"]["reshaped"], ".1f", 2**-20),
        "mem": "{:+.1f}".format(
          ((mem["reshaped"]["peak_bytes"] or 0) - (mem["vanilla"]["peak_bytes"] or 0)) / 2**20
        ),
      }
    )
  output.print_table(
    table,
    [
      ("case", "case"),
      ("n", "classes"),
      ("vanilla", "vanilla ms"),
      ("reshaped", "reshaped ms"),
      ("overhead", "overhead"),
      ("rounds", "per round [min, max]"),
      ("loss_v", "loss-only vanilla ms"),
      ("loss_r", "loss-only reshaped ms"),
      ("share", "potential / vanilla step"),
      ("bytes", "loss MiB accessed"),
      ("mem", "peak mem delta MiB"),
    ],
  )
  return output.finish("objective_overhead", args, env, rows)


if __name__ == "__main__":
  main()
