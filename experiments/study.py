"""The paper's ablations at small scale: named settings x seeds on the built-in data, tables and plots.

  python -m experiments.study train --out /tmp/study --rows table2 --seeds 0,1,2 --steps 600
  python -m experiments.study sampling --out /tmp/study --setting static --num-steps 1,2,5,10,25,50
  python -m experiments.study report --out /tmp/study      # report.md, report.json, *.png
  python -m experiments.study report --out experiments/study --from-report experiments/study/report.json
  python -m experiments.study report --out /tmp/study --with-report experiments/study3000/report.json

Every run trains through `flowseg_jax.train.train_and_evaluate` in its own workdir,
OUT/runs/<setting>/seed_<k>, and is skipped when its final eval json exists; a killed study
resumes each unfinished run from its last checkpoint. Runs go to `--parallel` subprocesses (each
with `--threads` XLA threads, logs in the run's log.txt), or in this process with `--parallel 0`.
A setting is an ablation of configs/ablations.py plus config overrides on a base ('demo' = the
configs/demo.py recipe, 'hard' = ablations.hard_config, 'smoke' = configs/demo.py:smoke for tests),
with total_steps = --steps (the cosine schedule spans the run) and evaluations at the middle and the
end. The seed sets the model's initialisation and the data order; the dataset is the same.

The report reads mIoU from each run's eval/step_<steps>.json: per row the mean, the sample std over
seeds and every seed; per claim a two-sided paired t over seeds with the 95 % interval of the
difference, and Holm's correction over all claims (experiments/stats.py), with a verdict. Table 3 (`sampling`) evaluates already-trained runs with
other Euler step counts, in OUT/runs/<setting>/seed_<k>/sampling/steps_<n> (checkpoints linked).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from flowseg_jax import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = os.path.join(REPO, "configs")

# setting -> (ablation of configs/ablations.py, config overrides)
SETTINGS = {
  "static": ("static", {}),
  "vanilla": ("vanilla", {}),
  "no_mask": ("no_mask", {}),
  "annealing": ("annealing", {}),
  "annealing_mask": ("annealing_mask", {}),
  "x_pred": ("x_pred", {}),
  "sqrt": ("sqrt", {}),
  "norm_reduced": ("norm_reduced", {}),
  "linear": ("linear", {}),
  "tau=0.5": ("static", {"objective.tau": 0.5}),
  "tau=2": ("static", {"objective.tau": 2.0}),
  "eps=1e-3": ("static", {"objective.eps": 1e-3}),
  "no_clip": ("no_clip", {}),
  "ignored_image": ("ignored_image", {}),
  "ignored_centre": ("ignored_centre", {}),
  # Fewer or more classes on the same 32x32 synthetic task (12 is the demo's): is reshaping's gain
  # larger where more centroids crowd the colour cube, as the paper's motivation says?
  **{
    f"{ablation}_c{n}": (ablation, {"input.synthetic.num_classes": n})
    for n in (24, 48)
    for ablation in ("static", "vanilla")
  },
}
# row group -> [(label, setting)]; "static" is the method's default (log, tau 1, eps 1e-6, clip 1).
ROWS = {
  "table2": [
    ("vanilla FM", "vanilla"),
    ("static w/o mask", "no_mask"),
    ("static + mask", "static"),
    ("annealing w/o mask", "annealing"),
    ("annealing + mask", "annealing_mask"),
    ("x-prediction (static + mask)", "x_pred"),
  ],
  "fig5c": [
    ("log", "static"),
    ("sqrt", "sqrt"),
    ("gradient-norm reduction", "norm_reduced"),
    ("linear", "linear"),
  ],
  "tau": [("tau 0.5", "tau=0.5"), ("tau 1", "static"), ("tau 2", "tau=2")],
  "eps": [("eps 1e-6", "static"), ("eps 1e-3", "eps=1e-3")],
  "clip": [("clip 1.0", "static"), ("no clip", "no_clip")],
  "ignored": [
    ("ignored x1 = class 0 (default)", "static"),
    ("ignored x1 = x0 (no motion)", "ignored_image"),
    ("ignored x1 = cube centre", "ignored_centre"),
  ],
  "classes": [
    ("12 classes: static", "static"),
    ("12 classes: vanilla", "vanilla"),
    ("24 classes: static", "static_c24"),
    ("24 classes: vanilla", "vanilla_c24"),
    ("48 classes: static", "static_c48"),
    ("48 classes: vanilla", "vanilla_c48"),
  ],
}
# Reshaping's gain (static - vanilla, per seed) at more classes vs at 12: (group, N, claim).
GAIN_CLAIMS = [
  ("classes", 24, "reshaping gains more at 24 classes than at 12 (the paper's motivation)"),
  ("classes", 48, "reshaping gains more at 48 classes than at 12 (the paper's motivation)"),
]
# (group, expected better, expected worse, the claim): the paper's direction (or our default's).
CLAIMS = [
  ("table2", "static", "vanilla", "reshaping beats vanilla flow matching (Table 2)"),
  ("table2", "static", "no_mask", "Table 2: static + mask 29.75 > static w/o mask 28.15"),
  ("table2", "no_mask", "annealing", "Table 2: static w/o mask 28.15 > annealing w/o mask 24.65"),
  ("table2", "static", "annealing_mask", "static beats annealing with the mask too (ours)"),
  ("table2", "static", "x_pred", "Table 2: v-prediction 29.75 > x-prediction 29.06"),
  ("fig5c", "static", "sqrt", "Fig 5c: log beats sqrt"),
  ("fig5c", "static", "norm_reduced", "Fig 5c: log beats gradient-norm reduction"),
  ("fig5c", "static", "linear", "Fig 5c: log beats linear"),
  ("tau", "static", "tau=0.5", "tau = 1 (the paper's) beats 0.5"),
  ("tau", "static", "tau=2", "tau = 1 (the paper's) beats 2"),
  ("eps", "static", "eps=1e-3", "eps = 1e-6 (the default) beats 1e-3"),
  ("clip", "static", "no_clip", "clipping at 1.0 (ours) beats no clipping"),
  ("ignored", "static", "ignored_image", "ignored pixels' x1: class 0 (default) beats x0 (ours)"),
  ("ignored", "static", "ignored_centre", "ignored pixels' x1: class 0 (default) beats centre"),
  ("classes", "static_c24", "vanilla_c24", "reshaping beats vanilla flow matching at 24 classes"),
  ("classes", "static_c48", "vanilla_c48", "reshaping beats vanilla flow matching at 48 classes"),
]
BASES = {"demo": ("demo", None), "hard": ("ablations", "base=hard"), "smoke": ("demo", "smoke")}


def run_config(base: str, setting: str, seed: int, steps: int):
  """The config of one study run."""
  ablations = _ablations()
  name, arg = BASES[base]
  config = defaults.load_config_file(os.path.join(CONFIGS, f"{name}.py"), arg)
  ablation, overrides = SETTINGS[setting]
  ablations.apply_ablation(config, ablation)
  for key, value in overrides.items():
    *sections, field = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[field] = value
  config.seed = seed
  config.total_steps = steps
  config.eval_every_steps = max(1, steps // 2)
  # At the middle evaluation and at most every 3000 steps: few writes, and a long run that is killed
  # loses at most ~10 minutes (resuming is exact, so the cadence does not change the result).
  config.ckpt_every_steps = max(1, min(steps // 2, 3000))
  config.log_every_steps = min(config.log_every_steps, max(1, steps // 2))
  config.keep_checkpoints = 1
  config.optim.warmup_steps = min(config.optim.warmup_steps, max(1, steps // 6))
  config.eval.num_pictures = min(config.eval.num_pictures, 2)
  return config


def _ablations():
  import importlib.util

  spec = importlib.util.spec_from_file_location("flowseg_ablations", f"{CONFIGS}/ablations.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_dir(out: str, setting: str, seed: int) -> str:
  return os.path.join(out, "runs", setting, f"seed_{seed}")


def eval_json(workdir: str, step: int) -> str:
  return os.path.join(workdir, "eval", f"step_{step}.json")


def sampling_json(target: str, step: int, num_steps: int) -> str:
  """The eval json `flowseg_jax.evaluate.evaluate` writes for a Table 3 evaluation (whole mode)."""
  return os.path.join(target, "eval", f"step_{step}_steps{num_steps}_whole.json")


def train_one(out: str, base: str, setting: str, seed: int, steps: int) -> str:
  """Trains one run (resuming it if it was interrupted); returns its final eval json path."""
  from flowseg_jax import train

  workdir = run_dir(out, setting, seed)
  path = eval_json(workdir, steps)
  if os.path.exists(path):
    return path
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "study_run.json"), "w") as f:
    json.dump({"base": base, "setting": setting, "seed": seed, "steps": steps}, f)
  start = time.time()
  train.train_and_evaluate(run_config(base, setting, seed, steps), workdir)
  with open(os.path.join(workdir, "study_time.json"), "w") as f:
    json.dump({"wall_s": time.time() - start}, f)
  return path


def _child_env(threads: int, out: str) -> dict:
  """The environment of one run's subprocess (`python -m experiments.study one`, from REPO)."""
  env = dict(os.environ)
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(out), "jax_cache"))
  if threads == 1:
    flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flags}".strip()
  return env


def train_all(out, base, settings, seeds, steps, parallel: int, threads: int) -> None:
  """Seeds outer, settings inner: each round of seeds completes every setting before the next."""
  jobs = [(s, k) for k in seeds for s in settings]
  jobs = [(s, k) for s, k in jobs if not os.path.exists(eval_json(run_dir(out, s, k), steps))]
  print(f"{len(jobs)} runs to do ({base}, {steps} steps)", flush=True)
  if parallel <= 0:
    for setting, seed in jobs:
      train_one(out, base, setting, seed, steps)
    return
  running: list[tuple[subprocess.Popen, str, int, float]] = []
  while jobs or running:
    while jobs and len(running) < parallel:
      setting, seed = jobs.pop(0)
      workdir = run_dir(out, setting, seed)
      os.makedirs(workdir, exist_ok=True)
      cmd = [sys.executable, "-m", "experiments.study", "one", "--out", os.path.abspath(out)]
      cmd += ["--base", base, "--setting", setting, "--seed", str(seed), "--steps", str(steps)]
      log = open(os.path.join(workdir, "log.txt"), "a")  # noqa: SIM115 (closed with the process)
      proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(threads, out), cwd=REPO
      )
      log.close()
      running.append((proc, setting, seed, time.time()))
    time.sleep(2)
    for item in list(running):
      proc, setting, seed, start = item
      if proc.poll() is not None:
        running.remove(item)
        status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see log.txt)"
        print(f"{setting} seed {seed}: {status} in {time.time() - start:.0f} s", flush=True)


def sampling_all(out: str, setting: str, seeds, num_steps) -> None:
  """Table 3: each trained seed of `setting` evaluated with each Euler step count."""
  from flowseg_jax import evaluate

  for seed in seeds:
    workdir = run_dir(out, setting, seed)
    with open(os.path.join(workdir, "study_run.json")) as f:
      meta = json.load(f)
    if not os.path.exists(eval_json(workdir, meta["steps"])):
      print(f"{setting} seed {seed}: not trained yet, skipped", flush=True)
      continue
    for n in num_steps:
      target = os.path.join(workdir, "sampling", f"steps_{n}")
      if os.path.exists(sampling_json(target, meta["steps"], n)):
        continue
      os.makedirs(target, exist_ok=True)
      link = os.path.join(target, "checkpoints")
      if not os.path.islink(link):
        os.symlink(os.path.join("..", "..", "checkpoints"), link)
      config = run_config(meta["base"], setting, seed, meta["steps"])
      config.eval.num_steps = n
      config.eval.mode = "whole"  # the file sampling_json names
      config.eval.num_pictures = 0
      evaluate.evaluate(config, target)
      print(f"{setting} seed {seed}: {n} steps evaluated", flush=True)


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def settings_of(rows: str, settings: str) -> list[str]:
  """The settings of the named row groups (and/or listed settings), in order, once each."""
  names: list[str] = []
  for group in filter(None, rows.split(",")):
    if group not in ROWS:
      raise ValueError(f"unknown row group {group!r}; known: {sorted(ROWS)}")
    names += [s for _, s in ROWS[group]]
  for s in filter(None, settings.split(",")):
    if s not in SETTINGS:
      raise ValueError(f"unknown setting {s!r}; known: {sorted(SETTINGS)}")
    names.append(s)
  return list(dict.fromkeys(names))


def main(argv=None) -> int:
  from experiments.study_report import collect, merge_results, report, results_from_report

  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("command", choices=("train", "one", "sampling", "report"))
  p.add_argument("--out", required=True, help="study directory")
  p.add_argument("--base", default="demo", choices=sorted(BASES))
  p.add_argument("--rows", default="", help=f"row groups: {','.join(ROWS)}")
  p.add_argument("--settings", default="", help="extra settings (SETTINGS names)")
  p.add_argument("--setting", default="static", help="one/sampling: the setting")
  p.add_argument("--seed", type=int, default=0, help="one: the seed")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--steps", type=int, default=600, help="training steps per run")
  p.add_argument("--num-steps", default="1,2,5,10,25,50", help="sampling: Euler step counts")
  p.add_argument("--parallel", type=int, default=2, help="runs at once (0: in this process)")
  p.add_argument("--threads", type=int, default=1, help="XLA CPU threads per run (1 or default)")
  p.add_argument(
    "--from-report",
    default=None,
    metavar="JSON",
    help="report: take the per-seed scores from a report.json instead of OUT/runs",
  )
  p.add_argument(
    "--with-report",
    default=None,
    metavar="JSON",
    help="report: also the per-seed scores of a report.json (runs whose folders are gone); "
    "a seed OUT/runs also holds takes OUT/runs's numbers",
  )
  args = p.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  if args.command == "train":
    names = settings_of(args.rows, args.settings)
    train_all(
      args.out, args.base, names, _ints(args.seeds), args.steps, args.parallel, args.threads
    )
    report(args.out)
  elif args.command == "one":
    from flowseg_jax.run import host_memory

    print(host_memory.reuse_host_allocations())  # as `flowseg train` does, before JAX starts
    train_one(args.out, args.base, args.setting, args.seed, args.steps)
  elif args.command == "sampling":
    sampling_all(args.out, args.setting, _ints(args.seeds), _ints(args.num_steps))
    report(args.out)
  else:
    results = results_from_report(args.from_report) if args.from_report else None
    if args.with_report:
      recorded = results_from_report(args.with_report)
      results = merge_results(recorded, results if results is not None else collect(args.out))
    report(args.out, results=results)
    print(open(os.path.join(args.out, "report.md")).read())
  return 0


if __name__ == "__main__":
  sys.exit(main())
