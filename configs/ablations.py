"""The paper's ablations as switches on the ADE20K stage-1 recipe (or the demo with `base=demo`).

  flowseg train --config configs/ablations.py:ablation=vanilla --workdir ...
  flowseg train --config configs/ablations.py:ablation=sqrt,base=demo --workdir ...

ablation: vanilla (flow matching without reshaping) | annealing (v - t grad Phi) | no_mask (ignored
pixels trained toward an extra centroid) | x_pred (x-prediction) | log | sqrt | linear (distance transform)
| tau=<float> (potential temperature).
"""

import importlib.util
import os

ABLATIONS = {
  "vanilla": {"objective.reshape": False},
  "annealing": {"objective.target": "annealing"},
  "no_mask": {"objective.mask_ignored": False},
  "x_pred": {"objective.prediction": "x"},
  "log": {"objective.transform": "log"},
  "sqrt": {"objective.transform": "sqrt"},
  "linear": {"objective.transform": "linear"},
}


def _load(name):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"flowseg_{name}_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None):
  args = _load("flowseg_ade20k").parse_arg(arg)
  base = args.pop("base", "ade20k")
  ablation = args.pop("ablation", None)
  tau = args.pop("tau", None)
  if args:
    raise ValueError(f"configs/ablations.py: unknown arguments {sorted(args)}")
  if base == "demo":
    config = _load("demo").get_config(None)
  elif base == "ade20k":
    config = _load("flowseg_ade20k").get_config("stage=1")
  else:
    raise ValueError(f"base must be 'ade20k' or 'demo', got {base!r}")
  if ablation is not None:
    if ablation not in ABLATIONS:
      raise ValueError(f"unknown ablation {ablation!r}; known: {sorted(ABLATIONS)}")
    for key, value in ABLATIONS[ablation].items():
      section, field = key.split(".")
      config[section][field] = value
  if tau is not None:
    config.objective.tau = float(tau)
  return config
