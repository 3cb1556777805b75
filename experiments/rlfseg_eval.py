"""Scores one trained run of the RLFSeg ablations (experiments/rlfseg_ablations.py) into
<workdir>/ablation.json: {'arm', 'seed', 'time': time.json, 'evals': {name: metrics}}.

What is scored depends on the arm:
  every arm      'final_10': the final checkpoint, 10 Euler steps, all eval examples (the run's own
                 eval/step_<last>.json, written by training with the wrong-prompt columns)
  compositional  'seen_10' / 'held_out_10': the same restricted to the seen / held-out colour x
                 texture combinations (config.input.prompted.eval_classes); each with its own
                 wrong-prompt figure (the prompt of another example of the same group);
                 'held_out_colour_10' / 'held_out_texture_10': the held-out combinations prompted
                 with one of the two words only ("one olive object"; sentences no training example
                 had): what each word alone finds, against which the two-word figure shows whether
                 the model combines them; '<seen|held_out>_<shared|unique>_10': the same split
                 by whether the image holds another object of the target's colour (`colour_group`)
  the others     'final_1': one Euler step; and at the checkpoints of 500, 1000 and 2000 steps
                 'step<k>_1' (one Euler step, dt = 1), 'step<k>_adaptive' (adaptive one-step,
                 tasks/prompted.py) and 'step<k>_threshold' (one Euler step, then a per-image
                 threshold instead of the nearest centroid: `otsu_threshold` of the colours'
                 channel mean, the baseline adaptive one-step must beat to be worth its rule)
A run scored before (its ablation.json holds every name above) is left alone.
"""

from __future__ import annotations

import json
import os

import numpy as np

SUBSETS = ("seen", "held_out")
TEXT_ARMS = ("compositional", "text")
ADAPTIVE_STEPS = (500, 1000, 2000)  # the checkpoints scored with one step, adaptive, threshold


def otsu_threshold(values: np.ndarray) -> float:
  """The split of 1-D `values` into two groups with the least within-group squared error (Otsu's
  threshold over every split point): the midpoint between the two sorted values it falls between;
  the values' mean when they are all equal."""
  v = np.sort(np.asarray(values, np.float64).ravel())
  n = v.size
  if n < 2 or v[0] == v[-1]:
    return float(v.mean()) if n else 0.0
  csum, csq = np.cumsum(v), np.cumsum(v * v)
  k = np.arange(1, n)  # first group v[:k]
  sse_lo = csq[:-1] - csum[:-1] ** 2 / k
  sse_hi = (csq[-1] - csq[:-1]) - (csum[-1] - csum[:-1]) ** 2 / (n - k)
  sse = np.where(v[1:] > v[:-1], sse_lo + sse_hi, np.inf)  # split only between distinct values
  i = int(np.argmin(sse))
  return float(0.5 * (v[i] + v[i + 1]))


def threshold_labels(colours: np.ndarray) -> np.ndarray:
  """int32 (H, W) labels of binary-mask colours (H, W, 3) by a per-image threshold: the centroids
  are -1 (background) and +1 (foreground) in every channel, so the nearest centroid is the sign of
  the channel mean; here the cut is that mean's Otsu threshold in each image instead of 0."""
  s = np.asarray(colours, np.float32).mean(axis=-1)
  return (s > otsu_threshold(s)).astype(np.int32)


def score_examples(segmenter, *, num_steps: int, threshold: bool = False, group_of=None) -> dict:
  """{group: gIoU / cIoU metrics} of `num_steps` Euler steps on the config's eval split, decoded by
  the nearest centroid or (`threshold`) by `threshold_labels`; group_of(example) names an
  example's group (None: one group, 'all')."""
  from flowseg_jax.evaluators import common, refer_iou
  from flowseg_jax.inference_host import resize_colours

  _, examples, _ = common.local_examples(segmenter.config)
  examples = list(examples)
  items = [(i, ex["image_orig"], int(ex["prompt"])) for i, ex in enumerate(examples)]
  metrics: dict = {}
  stream = segmenter.segment_stream(
    items, len(items), num_steps=num_steps, mode="whole", adaptive=False
  )
  for ex, (_, colours, pred, _) in zip(examples, stream, strict=True):
    target = ex["label"]
    if threshold:
      pred = threshold_labels(resize_colours(colours, target.shape[:2]))
    key = "all" if group_of is None else group_of(ex)
    one = refer_iou.PromptedIoU.from_model_output(predictions=pred[None], targets=target[None])
    metrics[key] = metrics.get(key, refer_iou.PromptedIoU.empty()).merge(one)
  return {k: common.sum_over_processes(m.to_host()).compute() for k, m in metrics.items()}


COLOUR_GROUPS = ("seen_unique", "seen_shared", "held_out_unique", "held_out_shared")


def colour_group(config):
  """group_of for compositional data: '<seen|held_out>_<shared|unique>', shared when the example's
  image holds another class of the same colour (>= min_pixels pixels): there the colour word alone
  cannot tell the target apart, the texture word must."""
  from flowseg_jax.data import datasets

  base, _ = datasets.make_semantic_source(config.input, "validation", False)
  trained = set(config.input.synthetic.train_classes)
  textures = int(config.input.synthetic.compose[1])
  least = int(config.input.prompted.min_pixels)

  def group_of(ex) -> str:
    image, cls = str(ex["name"]).rsplit(":", 1)
    counts = np.bincount(base[int(image.rsplit("_", 1)[1])]["label"].ravel(), minlength=256)
    c = int(cls)
    shared = any(
      k != c and k // textures == c // textures for k in np.flatnonzero(counts[:255] >= least)
    )
    return f"{'seen' if c in trained else 'held_out'}_{'shared' if shared else 'unique'}"

  return group_of


def _checkpoint_steps(workdir: str) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def planned(arm: str, workdir: str) -> list[str]:
  """The evaluation names of a run of `arm` (module docstring)."""
  if arm == "compositional":
    names = ["final_10", "seen_10", "held_out_10", "held_out_colour_10", "held_out_texture_10"]
    return names + [f"{g}_10" for g in COLOUR_GROUPS]
  if arm in TEXT_ARMS:
    return ["final_10"]
  names = ["final_10", "final_1"]
  for step in sorted(set(_checkpoint_steps(workdir)) & set(ADAPTIVE_STEPS)):
    names += [f"step{step}_1", f"step{step}_adaptive", f"step{step}_threshold"]
  return names


def _metrics(result: dict) -> dict:
  keys = ("giou", "ciou", "wrong_giou", "wrong_ciou", "baseline_giou", "baseline_ciou",
          "prompt_use", "mean_dt", "num_examples")  # fmt: skip
  return {k: float(result[k]) for k in keys if k in result}


def evaluate_run(workdir: str, arm: str) -> dict | None:
  """Scores a finished run (module docstring); None when it has not finished training."""
  from flowseg_jax import evaluate
  from flowseg_jax.inference import Segmenter
  from flowseg_jax.run import files

  exists = os.path.exists(os.path.join(workdir, files.CONFIG_FILE))
  config = files.load_config(workdir) if exists else None
  final = config and os.path.join(workdir, "eval", f"step_{config.total_steps}.json")
  if not final or not os.path.exists(final):
    print(f"{workdir}: not trained yet, skipped", flush=True)
    return None
  path = os.path.join(workdir, "ablation.json")
  out = {"arm": arm, "seed": int(config.seed), "evals": {}}
  if os.path.exists(path):
    with open(path) as f:
      out = json.load(f)
  time_path = os.path.join(workdir, "time.json")
  if os.path.exists(time_path):
    with open(time_path) as f:
      out["time"] = json.load(f)
  evals = out["evals"]
  with open(final) as f:
    evals["final_10"] = {**_metrics(json.load(f)), "step": config.total_steps, "num_steps": 10}

  def save():
    with open(path, "w") as f:
      json.dump(out, f, indent=2)

  segmenters: list = [None, None]  # (step name, wrong-prompt columns), its Segmenter
  for name in planned(arm, workdir):
    if name in evals:
      continue
    cfg = files.load_config(workdir)
    if name[: -len("_10")] in COLOUR_GROUPS:
      seg = Segmenter.from_workdir(workdir, cfg)
      groups = score_examples(seg, num_steps=10, group_of=colour_group(cfg))
      for g in COLOUR_GROUPS:
        if g in groups:
          evals[f"{g}_10"] = {**_metrics(groups[g]), "step": int(cfg.total_steps), "num_steps": 10}
      if name not in evals:  # no example of that group
        continue
    elif name.startswith(("seen", "held_out")):
      trained = set(cfg.input.synthetic.train_classes)  # seen: the training images' classes
      every = range(int(cfg.input.synthetic.num_classes))
      seen = name.startswith("seen")
      cfg.input.prompted.eval_classes = [k for k in every if (k in trained) == seen]
      word = {"colour": 0, "texture": 1}.get(name.split("_")[-2])
      if word is not None:  # names are "{colour} {texture}"; the vocabulary stays the config's
        cfg.input.prompted.names = [n.split()[word] for n in cfg.input.prompted.names]
      result, _ = evaluate.score(Segmenter.from_workdir(workdir, cfg), num_steps=10)
      evals[name] = {**_metrics(result), "step": int(cfg.total_steps), "num_steps": 10}
    else:
      step_name, mode = name.rsplit("_", 1)
      step = int(cfg.total_steps) if step_name == "final" else int(step_name[4:])
      cfg.prompted.eval_wrong_prompt = step_name == "final"  # the under-trained ones: gIoU only
      if (step_name, bool(cfg.prompted.eval_wrong_prompt)) != segmenters[0]:  # reused per step
        segmenters[:] = [(step_name, bool(cfg.prompted.eval_wrong_prompt)), None]
        segmenters[1] = Segmenter.from_workdir(workdir, cfg, step=step)
      seg = segmenters[1]
      if mode == "threshold":
        result = score_examples(seg, num_steps=1, threshold=True)["all"]
      else:
        result, _ = evaluate.score(seg, num_steps=1, adaptive=mode == "adaptive")
      evals[name] = {**_metrics(result), "step": step, "num_steps": 1, "mode": mode}
    print(f"{workdir} {name}: gIoU {100 * evals[name]['giou']:.2f}", flush=True)
    save()
  save()
  return out
