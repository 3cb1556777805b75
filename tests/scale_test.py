"""tools/scale.py: the AOT memory planner on a tiny config, its HLO collective count, fit rule."""

import math
import os

import jax
import numpy as np
import pytest

from benchmarks import configs
from flowseg_jax import defaults, scoring, sharding, train_state, train_step
from tools import abstract_inputs, hlo_counts, plan_presets, scale

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_REPA = [
  "--config",
  "configs/demo.py:smoke",
  "--set",
  "repa.enabled=true",
  "--set",
  "repa.teacher_variant=tiny/14",
  "--set",
  "repa.align_layer=2",
]


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs with shardings."""
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.sharding.shard_shape(a.shape)
    total += math.prod(shape) * np.dtype(a.dtype).itemsize
  return total


def test_planner_tiny_config_with_repa_on_8_devices(tmp_path):
  rows = scale.main(
    [*TINY_REPA, "--devices", "8", "--fsdp", "4", "--json", str(tmp_path / "p.json")]
  )
  (row,) = rows
  assert (row["data"], row["fsdp"], row["repa"]) == (2, 4, True)
  mem = row["train"]["memory"]
  # The arguments are exactly the sharded state, the batch shard and the replicated teacher.
  config = configs.load_config("configs/demo.py:smoke")
  config.repa.update(enabled=True, teacher_variant="tiny/14", align_layer=2)
  config.mesh.update(data=2, fsdp=4)
  setup = train_step.TrainSetup(config, teacher=abstract_inputs.abstract_teacher(config))
  mesh = sharding.make_mesh(2, 4)
  state, _ = train_state.abstract_train_state(
    setup, mesh, sharding.rules_from_config(config.sharding_rules), 0
  )
  b, (h, w) = config.input.batch_size, config.input.image_size
  batch = b // 8 * (h * w * (3 + 4) + 2 * 4)  # uint8 image, int32 label, int32 image_hw
  teacher = sum(a.size * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(setup.teacher_params))
  assert mem["argument_bytes"] == _per_device_bytes(state) + batch + teacher
  assert mem["temp_bytes"] > 0 and mem["peak_bytes"] >= mem["argument_bytes"]
  # FSDP: the step gathers the parameters (counted bytes >= a full copy of the denoiser params).
  coll = row["train"]["collective_bytes"]
  assert coll.get("all-gather", 0) + coll.get("all-reduce", 0) > 0
  assert row["train"]["model_flops"] > 0 and row["fits"]["v5e"] == "yes"
  assert (
    row["sampler"]["batch"] == 8 * config.eval.batch_per_device
    and row["sampler"]["memory"]["peak_bytes"] > 0
  )
  # The scorer (decoding + confusion matrix): one full call of pixels per device, whose float32
  # colours and int32 labels are its arguments; the eval peak is the larger program's.
  scorer = row["sampler"]["scorer"]
  pixels = scoring.MAX_PIXELS_PER_DEVICE
  assert scorer["pixels_per_device"] == pixels and scorer["views"] == 1
  assert scorer["memory"]["argument_bytes"] == pixels * (3 * 4 + 4)
  assert row["sampler"]["eval_peak_bytes"] == max(
    row["sampler"]["memory"]["peak_bytes"], scorer["memory"]["peak_bytes"]
  )
  # Training's 3 forward-equivalents per image against evaluation's num_steps forwards.
  want = 3 / config.eval.num_steps
  assert row["sampler"]["rate_vs_train"] == pytest.approx(want, rel=1e-9)
  assert (tmp_path / "p.json").exists()


def test_planner_reports_meshes_the_batch_cannot_split():
  rows = scale.plan_devices("configs/demo.py:smoke", 8, remats=None, fsdps=[3], sampler=False)
  assert "does not divide" in rows[0]["error"]


HLO = """\
%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %ag = f32[16]{0} all-gather(f32[4]{0} %x), channel_id=1, dimensions={0}
  %ar = bf16[8,2]{1,0} all-reduce(bf16[8,2]{1,0} %y), channel_id=2, to_apply=%add
}
%cond (p: (s32[], f32[4])) -> pred[] {
  %c = pred[] compare(s32[] %i, s32[] %n), direction=LT
}
%add (a: f32[], b: f32[]) -> f32[] {
  %s = f32[] add(f32[] %a, f32[] %b)
}
ENTRY %main (x: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"26"}}
  %rs = f32[2]{0} reduce-scatter(f32[16]{0} %z), channel_id=3, dimensions={0}, to_apply=%add
  %ags = (f32[4]{0}, f32[64]{0}) all-gather-start(f32[4]{0} %x), channel_id=4, dimensions={0}
}
"""


def test_collective_bytes_multiplies_loop_bodies_by_trip_count():
  out = hlo_counts.collective_bytes(HLO)
  assert out["all-gather"] == 26 * 16 * 4 + 64 * 4  # the loop's 26 trips + the async start's result
  assert out["all-reduce"] == 26 * 8 * 2 * 2
  assert out["reduce-scatter"] == 2 * 4


def test_fit_rule():
  gib = scale.GIB
  assert scale.fit(int(13.5 * gib), 16) == "yes"  # <= 85% of 16 GiB
  assert scale.fit(int(15 * gib), 16) == "tight"
  assert scale.fit(int(17 * gib), 16) == "no"
  assert scale.fsdp_sizes(64) == [1, 2, 4, 8, 16, 32, 64]


def test_target_presets_of_the_paper_configs():

  path = os.path.join(REPO, "configs", "flowseg_ade20k.py")
  ade = defaults.load_config_file(path, "stage=1")
  # Cloud TPU names v4 / v5p slices by TensorCores (2 per chip): v4-16 and v5p-16 are 8 chips.
  names = ("h100-8", "a100-8", "v4-16", "v5e-8", "v5e-16", "v5e-64", "v5p-16", "v6e-8")
  assert set(names) <= set(plan_presets.presets()[0])
  for name in names:
    chips = int(name.rsplit("-", 1)[1]) // (2 if name[:3] in ("v4-", "v5p") else 1)
    for stage in ("1", "2"):
      for cfg_file in ("flowseg_ade20k.py", "flowseg_cocostuff.py"):
        arg = f"stage={stage},target={name}"
        if name == "v5e-64" and stage == "2":
          with pytest.raises(ValueError, match="cannot be split"):
            defaults.load_config_file(os.path.join(REPO, "configs", cfg_file), arg)
          continue
        c = defaults.load_config_file(os.path.join(REPO, "configs", cfg_file), arg)
        assert c.mesh.data * c.mesh.fsdp == chips
        micro = c.input.batch_size // c.optim.grad_accum_steps
        assert micro % chips == 0 and c.repa.enabled
        assert c.model.remat_policy in (
          "none",
          "nothing_saveable",
          "dots_with_no_batch_dims_saveable",
        )
  assert ade.mesh.fsdp == 1
  with pytest.raises(ValueError, match="target='tpu-9' is not one of"):
    defaults.load_config_file(path, "stage=1,target=tpu-9")


def test_a_prompted_cache_config_plans_with_streamed_features_in_its_batch():
  """RefCOCO's 'cache' model: the planned step's batch carries the examples' text features (no
  table of sentences anywhere, no refs file read), the sampler takes features, and the T2I model
  gets the config's remat policy."""
  config = defaults.load_config_file("configs/rlfseg/refcoco.py", "target=v5e-8")
  config.prompted.variant = "tiny"
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding_rules)
  setup, state, shardings, batch, _ = abstract_inputs.train_step_inputs(config, mesh, rules)
  assert batch["text"].shape == (32, 8, 32) and "prompt" not in batch
  assert setup.task.model.t2i.remat_policy == "full" and setup.task.model.num_prompts == 0
  _, conds = abstract_inputs.sampler_inputs(config, mesh, setup.task)
  assert conds.shape == (8, 8, 32) and conds.dtype == np.float32
  step = train_step.compile_train_step(setup, mesh, shardings)
  with jax.set_mesh(mesh):
    step.lower(state, batch, None)  # traces with the streamed features as the condition
