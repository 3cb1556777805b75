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
Add `,fsdp=N` to shard parameters over N devices (e.g. `:stage=1,fsdp=8`).
"""

from flowseg_jax import defaults


def parse_arg(arg: str | None) -> dict:
  """'stage=1,fsdp=4' -> {'stage': '1', 'fsdp': '4'}."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ValueError(f"config argument {item!r} must look like key=value")
    k, v = item.split("=", 1)
    out[k.strip()] = v.strip()
  return out


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


def get_config(arg: str | None = None):
  args = parse_arg(arg)
  config = defaults.get_base_config()
  config.input.dataset = "ade20k"
  config.input.train_split = "training"
  config.input.eval_split = "validation"
  config.input.random_flip = True
  config.input.num_workers = 8
  apply_stage(config, args.pop("stage", "1"))
  config.mesh.fsdp = int(args.pop("fsdp", 1))
  config.model.variant = "XL/16"
  config.model.dtype = "bfloat16"
  config.model.remat_policy = "nothing_saveable"
  config.repa.enabled = True
  config.repa.teacher_dtype = "bfloat16"
  if args:
    raise ValueError(f"configs/flowseg_ade20k.py: unknown arguments {sorted(args)}")
  return config
