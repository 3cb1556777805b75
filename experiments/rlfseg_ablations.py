"""RLFSeg demo ablations over seeds: compositional zero-shot, label refinement on noisy
annotations, adaptive one-step on under-trained checkpoints, the reshaped target.

  nice -n 5 python -m experiments.rlfseg_ablations train --out OUT --arms compositional \\
      --seeds 0,1,2 [--threads 1]
  python -m experiments.rlfseg_ablations evaluate --out OUT [--arms ...] [--seeds ...]
  python -m experiments.rlfseg_ablations report --out OUT

`train` trains every (arm, seed) of `configs/rlfseg/demo.py:<ARMS[arm]>` into OUT/runs/<arm>/
seed_<k>, one subprocess per run (`--threads` XLA threads), one run at a time, checkpoints every
500 steps kept (the under-trained checkpoints the adaptive evaluation reads; room is left for
the checkpoints of up to 4 preemptions). A run whose final eval json exists is skipped, a killed
one resumes: rerunning the command finishes what is left.
`evaluate` scores each finished run (`rlfseg_eval.evaluate_run`: what it measures depends on the
arm) into OUT/runs/<arm>/seed_<k>/ablation.json, skipping runs already scored; `report`
(`rlfseg_report.py`) writes OUT/report.md and OUT/report.json: per-arm tables over seeds and the
paired two-sided tests of the claims with Holm's correction (experiments/stats.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from experiments.study import REPO, _child_env, _ints

CONFIG = os.path.join(REPO, "configs", "rlfseg", "demo.py")
# arm -> the demo config's variant argument.
ARMS = {
  "baseline": "",
  "refine": "refine",
  "reshape": "reshape",
  "zeroshot": "zeroshot",
  "textures": "textures",
  "text": "text",
  "compositional": "compositional",
  "noisy": "noisy",
  "noisy_refine": "noisy,refine",
}
CKPT_EVERY = 500


def run_dir(out: str, arm: str, seed: int) -> str:
  return os.path.join(out, "runs", arm, f"seed_{seed}")


def run_config(arm: str, seed: int):
  """The demo config of one run: the arm's variant, the seed, a checkpoint every 500 steps kept."""
  from flowseg_jax import defaults

  config = defaults.load_config_file(CONFIG, ARMS[arm])
  config.seed = seed
  config.ckpt_every_steps = CKPT_EVERY
  # Every 500-step checkpoint, plus room for the checkpoints a preemption writes (a killed run
  # resumed): the oldest, step 500, must survive to the sampler evaluation.
  config.keep_checkpoints = config.total_steps // CKPT_EVERY + 4
  return config


def final_eval(workdir: str, config) -> str:
  return os.path.join(workdir, "eval", f"step_{config.total_steps}.json")


def train_one(out: str, arm: str, seed: int) -> None:
  """Trains one run in this process (resumes a killed one; a finished one is left alone) and
  records its wall and CPU seconds in time.json."""
  from flowseg_jax import train

  config = run_config(arm, seed)
  workdir = run_dir(out, arm, seed)
  if os.path.exists(final_eval(workdir, config)):
    return
  os.makedirs(workdir, exist_ok=True)
  start, cpu = time.time(), time.process_time()
  train.train_and_evaluate(config, workdir)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  with open(os.path.join(workdir, "time.json"), "w") as f:
    json.dump(
      {
        "wall_s": time.time() - start,
        "cpu_s": time.process_time() - cpu,
        "user_s": usage.ru_utime,
        "system_s": usage.ru_stime,
      },
      f,
    )


def train_all(out: str, arms: list[str], seeds: list[int], threads: int) -> None:
  """Seeds outer, arms inner (each seed completes every arm first); one subprocess per run."""
  for seed in seeds:
    for arm in arms:
      workdir = run_dir(out, arm, seed)
      if os.path.exists(final_eval(workdir, run_config(arm, seed))):
        continue
      os.makedirs(workdir, exist_ok=True)
      cmd = [sys.executable, "-m", "experiments.rlfseg_ablations", "one", "--out"]
      cmd += [os.path.abspath(out), "--arms", arm, "--seeds", str(seed)]
      start = time.time()
      with open(os.path.join(workdir, "log.txt"), "a") as log:
        rc = subprocess.call(
          cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(threads, out), cwd=REPO
        )
      status = "done" if rc == 0 else f"FAILED (exit {rc}, see {workdir}/log.txt)"
      print(f"{arm} seed {seed}: {status} in {time.time() - start:.0f} s", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("command", choices=("train", "one", "evaluate", "report"))
  p.add_argument("--out", required=True, help="ablation directory")
  p.add_argument("--arms", default="compositional,noisy,noisy_refine,baseline,reshape")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--threads", type=int, default=1, help="XLA CPU threads per run (1 or default)")
  args = p.parse_args(argv)
  arms = [a for a in args.arms.split(",") if a]
  for arm in arms:
    if arm not in ARMS:
      raise SystemExit(f"--arms: unknown arm {arm!r}; known: {', '.join(ARMS)}")
  os.makedirs(args.out, exist_ok=True)
  if args.command == "train":
    train_all(args.out, arms, _ints(args.seeds), args.threads)
  elif args.command == "one":
    train_one(args.out, arms[0], _ints(args.seeds)[0])
  elif args.command == "evaluate":
    from experiments import rlfseg_eval

    for seed in _ints(args.seeds):
      for arm in arms:
        rlfseg_eval.evaluate_run(run_dir(args.out, arm, seed), arm)
  else:
    from experiments import rlfseg_report

    rlfseg_report.report(args.out)
    print(open(os.path.join(args.out, "report.md")).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
