"""RLFSeg demo ablations: label refinement on/off x sampler (1 step, adaptive 1 step, N steps).

  python -m experiments.rlfseg_ablations --workdir /tmp/rlfseg_runs [--seeds 0] [--steps 10]
      [--arms baseline,refine,zeroshot,textures,text]

For each seed trains `configs/rlfseg/demo.py` (refinement off), `configs/rlfseg/demo.py:refine`
and, when asked, `configs/rlfseg/demo.py:zeroshot` (train on classes 0-5, evaluate on 6-7) and
`configs/rlfseg/demo.py:textures` (objects in random colours, the class only in the texture) and
`configs/rlfseg/demo.py:text` (sentences through a small Qwen3, evaluated on held-out phrasings) into
WORKDIR/<arm>_seed<k> (a finished workdir is reused: rerunning a finished run changes nothing),
then scores the EMA weights on the eval split with one Euler step (dt = 1), adaptive one-step
sampling, and `--steps` Euler steps. Prints one table (gIoU / cIoU in %, the same with every
example's prompt replaced by another example's (`evaluators.refer_iou.wrong_prompts`: a model that
uses its prompt collapses there, one that ignores it does not), the prompt-use figure (`refer_iou`:
near 0 for a prompt-blind model and for one that answers with nothing), the all-background
baseline, the adaptive step's mean dt, seconds per evaluation) and writes it to
WORKDIR/ablations.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from flowseg_jax import defaults, evaluate, train
from flowseg_jax.inference import Segmenter
from flowseg_jax.run import files

ARMS = {
  "baseline": "",
  "refine": "refine",
  "zeroshot": "zeroshot",
  "textures": "textures",
  "text": "text",
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--arms", default="baseline,refine")
  args = parser.parse_args()
  config_path = os.path.join(os.path.dirname(__file__), "..", "configs", "rlfseg", "demo.py")
  rows = []
  for seed in (int(s) for s in args.seeds.split(",")):
    for arm in args.arms.split(","):
      config = defaults.load_config_file(config_path, ARMS[arm])
      config.seed = seed
      workdir = os.path.join(args.workdir, f"{arm}_seed{seed}")
      start = time.perf_counter()
      train.train_and_evaluate(config, workdir)
      train_s = time.perf_counter() - start
      run_config = files.load_config(workdir)
      run_config.prompted.eval_wrong_prompt = True  # the wrong-prompt columns
      seg = Segmenter.from_workdir(workdir, run_config)
      for name, steps, adaptive in (
        ("1 step", 1, False),
        ("1 step adaptive", 1, True),
        (f"{args.steps} steps", args.steps, False),
      ):
        start = time.perf_counter()
        r, _ = evaluate.score(seg, num_steps=steps, adaptive=adaptive)
        rows.append(
          dict(arm=arm, seed=seed, sampler=name, giou=r["giou"], ciou=r["ciou"],
               wrong_giou=r["wrong_giou"], wrong_ciou=r["wrong_ciou"],
               prompt_use=r.get("prompt_use", float("nan")),
               baseline_giou=r["baseline_giou"], baseline_ciou=r["baseline_ciou"],
               mean_dt=r["mean_dt"], eval_s=time.perf_counter() - start, train_s=train_s,
               num_examples=r["num_examples"])
        )  # fmt: skip
  print(
    "| arm | seed | sampler | gIoU | cIoU | wrong-prompt gIoU | wrong-prompt cIoU | prompt use "
    "| all-bg gIoU | all-bg cIoU | mean dt | eval s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['arm']} | {r['seed']} | {r['sampler']} | {100 * r['giou']:.2f} | "
      f"{100 * r['ciou']:.2f} | {100 * r['wrong_giou']:.2f} | {100 * r['wrong_ciou']:.2f} | "
      f"{100 * r['prompt_use']:.2f} | "
      f"{100 * r['baseline_giou']:.2f} | {100 * r['baseline_ciou']:.2f} | "
      f"{r['mean_dt']:.3f} | {r['eval_s']:.1f} |"
    )
  with open(os.path.join(args.workdir, "ablations.json"), "w") as f:
    json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
