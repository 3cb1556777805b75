"""FlowSeg on ADE20K-150 (ADEChallengeData2016), the paper's two stages, PixNerd-XL/16 with REPA.

Stage 1 (256x256, global batch 64), from the converted PixNerd ImageNet weights:
  flowseg train --config configs/flowseg_ade20k.py:stage=1 --workdir $WD/ade_s1 \\
    --config.input.data_dir=/data/ADEChallengeData2016 \\
    --config.model_init=$CKPT/pixnerd_xl16 --config.repa.teacher_dir=$CKPT/dinov2_vitb14
Stage 2 (512x512, global batch 16), from stage 1's latest weights:
  flowseg train --config configs/flowseg_ade20k.py:stage=2 --workdir $WD/ade_s2 \\
    --config.input.data_dir=/data/ADEChallengeData2016 --config.init_from=$WD/ade_s1 \\
    --config.repa.teacher_dir=$CKPT/dinov2_vitb14
Evaluate (10 Euler steps, whole image at 512x512):
  flowseg evaluate --config configs/flowseg_ade20k.py:stage=2 --workdir $WD/ade_s2 ...

Convert the weights first: `flowseg convert pixnerd --ckpt epoch=319-step=1600000_emainit.ckpt --out
$CKPT/pixnerd_xl16` and `flowseg convert dinov2 --ckpt dinov2_vitb14_pretrain.pth --out $CKPT/dinov2_vitb14`.
Add `,fsdp=N` to shard parameters over N devices (e.g. `:stage=1,fsdp=8`), or pick a planned
preset for your hardware with `,target=NAME` (mesh, remat, gradient accumulation and attention
from the plans of the real TPU / GPU compiler of that hardware in benchmarks/RESULTS.md, "Memory
plans from the TPU and GPU compilers"), e.g. `:stage=1,target=v5e-64`.
"""

from flowseg_jax import defaults


def apply_stage(config, stage: str) -> None:
  if stage == "1":
    config.input.image_size = (256, 256)
    config.input.batch_size = 64
    config.total_steps = 80_000
  elif stage == "2":
    config.input.image_size = (512, 512)
    config.input.batch_size = 16
    config.total_steps = 80_000
    config.eval.slide_short_side = 512
  else:
    raise ValueError(f"stage must be 1 or 2, got {stage!r}")


# Presets per target (accelerator kind - number of chips as Cloud TPU names slices: v4-16 and
# v5p-16 are 8 chips): the mesh, remat policy, gradient accumulation and attention
# implementation planned by the real TPU / GPU compiler of each target (`python -m
# tools.plan_presets`; XL/16, REPA on, bf16; table in benchmarks/RESULTS.md). Preference: the
# least parameter traffic (data parallelism before FSDP) and no recomputation where the memory
# allows 15% headroom. Stage 2's global batch of 16 cannot be split over more than 16 devices.
def _preset(
  data: int,
  fsdp: int,
  remat: str = "nothing_saveable",
  grad_accum_steps: int = 1,
  attention: str | None = None,
):
  return dict(
    data=data, fsdp=fsdp, remat=remat, grad_accum_steps=grad_accum_steps, attention=attention
  )


TARGETS = {
  "h100-8": {
    "1": _preset(8, 1, "none", attention="cudnn"),
    "2": _preset(8, 1, "none", attention="cudnn"),
  },
  "a100-8": {
    "1": _preset(8, 1, "none", attention="cudnn"),
    "2": _preset(8, 1, "none", attention="cudnn"),
  },
  "v4-16": {"1": _preset(8, 1, "none"), "2": _preset(8, 1)},
  "v5e-8": {"1": _preset(4, 2), "2": _preset(4, 2)},
  "v5e-16": {"1": _preset(8, 2), "2": _preset(8, 2)},
  "v5e-64": {"1": _preset(32, 2, "none")},
  "v5p-16": {"1": _preset(8, 1, "none"), "2": _preset(8, 1, "none")},
  "v6e-8": {"1": _preset(8, 1, "none"), "2": _preset(8, 1)},
}
# The hardware each preset is planned for (tools/compile_targets.py targets): TPU topologies
# (v4 / v5p chips as megacore devices) and GPU target configs in benchmarks/gpu_targets/.
HARDWARE = {
  "h100-8": "gpu:h100:8",
  "a100-8": "gpu:a100:8",
  "v4-16": "tpu:v4:2x2x2",
  "v5e-8": "tpu:v5e:2x4",
  "v5e-16": "tpu:v5e:4x4",
  "v5e-64": "tpu:v5e:8x8",
  "v5p-16": "tpu:v5p:2x2x2",
  "v6e-8": "tpu:v6e:2x4",
}


# grain worker processes per host that feed its chips at 50 % MFU (benchmarks/input_demand.py:
# chips per host x images/s per chip at half its bf16 peak, over one worker's measured rate).
INPUT_WORKERS = {
  "h100-8": {"1": 32, "2": 14},
  "a100-8": {"1": 10, "2": 5},
  "v4-16": {"1": 5, "2": 2},
  "v5e-8": {"1": 7, "2": 3},
  "v5e-16": {"1": 4, "2": 2},
  "v5e-64": {"1": 4},
  "v5p-16": {"1": 8, "2": 4},
  "v6e-8": {"1": 30, "2": 13},
}


def apply_target(config, target: str, stage: str) -> None:
  """Sets config.mesh, config.model.remat_policy / attention_impl and
  config.optim.grad_accum_steps from TARGETS, and config.input.num_workers from INPUT_WORKERS."""
  if target not in TARGETS:
    raise ValueError(f"target={target!r} is not one of {sorted(TARGETS)}")
  if stage not in TARGETS[target]:
    raise ValueError(
      f"target={target} has no stage {stage} preset: stage {stage}'s global batch of "
      f"{config.input.batch_size} cannot be split over its devices (benchmarks/RESULTS.md)"
    )
  preset = TARGETS[target][stage]
  config.mesh.data, config.mesh.fsdp = preset["data"], preset["fsdp"]
  config.model.remat_policy = preset["remat"]
  config.optim.grad_accum_steps = preset["grad_accum_steps"]
  if preset["attention"]:
    config.model.attention_impl = preset["attention"]
  config.input.num_workers = INPUT_WORKERS[target][stage]


def get_config(arg: str | None = None):
  args = defaults.parse_arg(arg, stage="1", fsdp=1, target="")
  config = defaults.get_base_config()
  config.input.dataset = "ade20k"
  config.input.train_split = "training"
  config.input.eval_split = "validation"
  config.input.random_flip = True
  config.input.num_workers = 8
  stage = args["stage"]
  apply_stage(config, stage)
  config.mesh.fsdp = args["fsdp"]
  config.model.variant = "XL/16"
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "nothing_saveable"
  config.repa.enabled = True
  config.repa.teacher_dtype = "bfloat16"
  if args["target"]:
    apply_target(config, args["target"], stage)
  return config
