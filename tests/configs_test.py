"""Every config file loads, carries the paper's defaults, and its switches do what they say."""

import os

import pytest

from flowseg_jax import defaults, models, optim, train_step
from flowseg_jax.data import datasets

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name, arg=None):
  return defaults.load_config_file(os.path.join(CONFIGS, f"{name}.py"), arg)


def test_paper_stages():
  s1 = load("flowseg_ade20k", "stage=1")
  s2 = load("flowseg_ade20k", "stage=2,fsdp=4")
  assert tuple(s1.input.image_size) == (256, 256) and s1.input.batch_size == 64
  assert tuple(s2.input.image_size) == (512, 512) and s2.input.batch_size == 16
  assert s2.mesh.fsdp == 4
  for c in (s1, s2):
    assert c.objective.tau == 1.0 and c.objective.mask_ignored and c.objective.reshape
    assert c.objective.transform == "log" and c.objective.target == "static"
    assert c.repa.enabled and c.model.variant == "XL/16" and c.eval.num_steps == 10
    assert datasets.num_classes(c.input) == 150
  coco = load("flowseg_cocostuff", "stage=1")
  assert datasets.num_classes(coco.input) == 171
  with pytest.raises(ValueError, match="stage"):
    load("flowseg_ade20k", "stage=3")
  with pytest.raises(ValueError, match="unknown config argument .typo."):
    load("flowseg_ade20k", "stage=1,typo=2")


@pytest.mark.parametrize(
  "ablation,fields",
  [
    ("static", {"objective.reshape": True, "objective.target": "static"}),
    ("vanilla", {"objective.reshape": False}),
    # Table 2's annealing row is without the mask (the paper compares it with static w/o mask).
    ("annealing", {"objective.target": "annealing", "objective.mask_ignored": False}),
    ("annealing_mask", {"objective.target": "annealing", "objective.mask_ignored": True}),
    ("no_mask", {"objective.mask_ignored": False, "objective.target": "static"}),
    ("x_pred", {"objective.prediction": "x"}),
    ("sqrt", {"objective.transform": "sqrt"}),
    ("linear", {"objective.transform": "linear"}),
    ("norm_reduced", {"objective.transform": "norm_reduced"}),
    ("no_clip", {"optim.grad_clip_norm": 0.0}),
    ("ignored_image", {"objective.ignored_input": "image"}),
    ("ignored_centre", {"objective.ignored_input": "centre"}),
  ],
)
def test_ablations(ablation, fields):
  config = load("ablations", f"ablation={ablation},base=demo")
  default = load("demo")
  for key, value in fields.items():
    section, field = key.split(".")
    assert config[section][field] == value, key
  changed = {
    f"{section}.{k}"
    for section in ("objective", "optim")
    for k in config[section]
    if config[section][k] != default[section][k]
  }
  assert changed == {k for k, v in fields.items() if v != default[k.split(".")[0]][k.split(".")[1]]}
  train_step.TrainSetup(config)  # a runnable combination


def test_ablation_arguments_and_hard_base():
  config = load("ablations", "ablation=annealing,base=hard,tau=0.5,eps=1e-3")
  assert config.objective.tau == 0.5 and config.objective.eps == 1e-3
  assert datasets.num_classes(config.input) == 48 and tuple(config.input.image_size) == (64, 64)
  assert tuple(config.input.synthetic.size) == (64, 64) and config.model.variant == "tiny/8"
  train_step.TrainSetup(config)
  with pytest.raises(ValueError, match="unknown ablation"):
    load("ablations", "ablation=annealed,base=demo")
  with pytest.raises(ValueError, match="base must be"):
    load("ablations", "base=huge")


def test_demo_builds_and_is_small():
  config = load("demo")
  setup = train_step.TrainSetup(config)
  assert not config.repa.enabled and config.input.dataset == "synthetic"
  assert setup.task.model.hidden_size <= 128
  assert models.create_model(config.model).scan_blocks
  optim.learning_rate_schedule(config.optim, config.total_steps)
  assert load("ablations", "tau=2,base=demo").objective.tau == 2.0


def test_rlfseg_configs():
  demo = load("rlfseg/demo")
  setup = train_step.TrainSetup(demo)
  assert setup.task.name == "prompted" and setup.task.model.t2i.hidden_size <= 128
  assert not demo.objective.reshape and not demo.prompted.refine.enabled
  assert load("rlfseg/demo", "refine,reshape").prompted.refine.enabled
  adaptive = load("rlfseg/demo", "adaptive")
  assert adaptive.prompted.adaptive.enabled and adaptive.eval.num_steps == 1
  with pytest.raises(ValueError, match="unknown config argument"):
    load("rlfseg/demo", "typo")
  ref = load("rlfseg/refcoco")
  assert ref.input.dataset == "refcoco" and ref.prompted.condition == "cache"
  assert ref.prompted.variant == "released" and ref.eval.num_steps == 1
  with pytest.raises(ValueError, match="refs_json"):
    datasets.prompt_list(ref.input)  # the paths are launch-time overrides


def test_parse_arg_types_values_and_names_mistakes():
  args = defaults.parse_arg("stage=2, smoke ,fsdp=4", stage="1", fsdp=1, smoke=False, target="")
  assert args == {"stage": "2", "fsdp": 4, "smoke": True, "target": ""}
  assert defaults.parse_arg(None, smoke=False) == {"smoke": False}
  assert defaults.parse_arg("smoke=false", smoke=True) == {"smoke": False}
  with pytest.raises(ValueError, match="unknown config argument 'stag' .known: fsdp, stage."):
    defaults.parse_arg("stag=2", stage="1", fsdp=1)
  with pytest.raises(ValueError, match="fsdp='x' is not an integer"):
    defaults.parse_arg("fsdp=x", fsdp=1)
  with pytest.raises(ValueError, match="needs a value"):
    defaults.parse_arg("stage", stage="1")
  with pytest.raises(ValueError, match="true or false"):
    defaults.parse_arg("smoke=maybe", smoke=False)


def test_block_layout_default_scans_only_deep_models():
  """config.model.scan_blocks None: L/16 and XL/16 (24, 30 blocks) scan, B/16, S/16 and tiny unroll
  (faster on CPU); an explicit True / False always wins, also through an overridden depth."""
  base = load("flowseg_ade20k", "stage=1")
  assert base.model.scan_blocks is None and models.create_model(base.model).scan_blocks
  for variant, scanned in (("L/16", True), ("B/16", False), ("S/16", False), ("tiny/4", False)):
    base.model.variant = variant
    assert models.create_model(base.model).scan_blocks == scanned, variant
  base.model.num_blocks, base.model.num_cond_blocks = 16, 14
  assert models.create_model(base.model).scan_blocks  # S/16 made 16 deep
  base.model.scan_blocks = False
  assert not models.create_model(base.model).scan_blocks
  assert models.resolve_scan_blocks(True, 4) and not models.resolve_scan_blocks(None, 12)
