"""Every config file loads, carries the paper's defaults, and its switches do what they say."""

import os

import pytest

from flowseg_jax import defaults, models, optim, train
from flowseg_jax.data import pipeline

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
    assert pipeline.num_classes(c.input) == 150
  coco = load("flowseg_cocostuff", "stage=1")
  assert pipeline.num_classes(coco.input) == 171
  with pytest.raises(ValueError, match="stage"):
    load("flowseg_ade20k", "stage=3")
  with pytest.raises(ValueError, match="unknown arguments"):
    load("flowseg_ade20k", "stage=1,typo=2")


@pytest.mark.parametrize(
  "ablation,field,value",
  [
    ("vanilla", "reshape", False),
    ("annealing", "target", "annealing"),
    ("no_mask", "mask_ignored", False),
    ("x_pred", "prediction", "x"),
    ("sqrt", "transform", "sqrt"),
    ("linear", "transform", "linear"),
  ],
)
def test_ablations(ablation, field, value):
  config = load("ablations", f"ablation={ablation},base=demo")
  assert config.objective[field] == value
  train.Setup(config)  # a runnable combination


def test_demo_builds_and_is_small():
  config = load("demo")
  setup = train.Setup(config)
  assert not config.repa.enabled and config.input.dataset == "synthetic"
  assert setup.model.hidden_size <= 128
  assert models.create_model(config.model).scan_blocks
  optim.learning_rate_schedule(config.optim, config.total_steps)
  assert load("ablations", "tau=2,base=demo").objective.tau == 2.0


def test_rlfseg_configs():
  demo = load("rlfseg_demo")
  setup = train.Setup(demo)
  assert setup.task.name == "prompted" and setup.model.t2i.hidden_size <= 128
  assert not demo.objective.reshape and not demo.prompted.refine.enabled
  assert load("rlfseg_demo", "refine,reshape").prompted.refine.enabled
  adaptive = load("rlfseg_demo", "adaptive")
  assert adaptive.prompted.adaptive.enabled and adaptive.eval.num_steps == 1
  with pytest.raises(ValueError, match="unknown variant"):
    load("rlfseg_demo", "typo")
  ref = load("rlfseg_refcoco")
  assert ref.input.dataset == "refcoco" and ref.prompted.condition == "cache"
  assert ref.prompted.variant == "released" and ref.eval.num_steps == 1
  with pytest.raises(ValueError, match="refs_json"):
    pipeline.prompt_list(ref.input)  # the paths are launch-time overrides
