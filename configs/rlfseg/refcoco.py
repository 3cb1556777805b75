"""RLFSeg on RefCOCO / RefCOCO+ / RefCOCOg: the released PixNerd-T2I, prompts through Qwen3-1.7B.

One-time preparation (paths are examples):
  python -m flowseg_jax.data.refcoco 'refcoco/refs(unc).p' /data/refcoco/refs_unc.json
  # PixNerd-T2I weights: the official release's model.ckpt (MCG-NJU/PixNerd, T2I XXL/16).
  # Qwen3-1.7B: a Hugging Face directory (config.json, *.safetensors, tokenizer.json).
  # The Qwen3 features of every sentence of the train and eval splits, once (~0.5 MiB a sentence
  # in bfloat16; a line per 1024 sentences; rerun to finish a stopped build):
  for split in train val; do flowseg cache-text --config configs/rlfseg/refcoco.py --split $split $DATA; done
with DATA="--config.prompted.encoder_dir=/ckpt/Qwen3-1.7B --config.input.text_features=/data/refcoco_text
  --config.input.refcoco.refs_json=/data/refcoco/refs_unc.json
  --config.input.refcoco.instances_json=/data/refcoco/instances.json
  --config.input.refcoco.image_dir=/data/coco/train2014".

Launch (each example's features are read from text_features by the data loader, per batch):
  flowseg train --config configs/rlfseg/refcoco.py:target=v5e-8 --workdir /runs/rlfseg_refcoco \
    --config.model_init=/ckpt/pixnerd_t2i/model.ckpt $DATA
  flowseg evaluate --workdir /runs/rlfseg_refcoco --config.eval.num_steps=1
  flowseg predict --workdir /runs/rlfseg_refcoco --input IMG --output OUT --prompt "the man on the left"

Variants (`:ARG`, comma-separated): `refcoco+` / `refcocog` only change the refs file name in the log;
point refs_json / instances_json at that dataset's files (RefCOCOg: split_by umd, eval split 'val').
`target=NAME` sets the mesh, remat policy and global batch planned for that hardware (TARGETS
below; `python -m tools.scale`, benchmarks/RESULTS.md "RLFSeg on RefCOCO: memory plans").

No table of the sentences' features exists: RefCOCO's ~142k sentences x (128, 2048) would be ~139
GiB in float32; the batch carries its examples' rows (data/text_cache.py). Inference reads none of
it: a sentence, seen in training or not, is encoded by the Qwen3 of encoder_dir when the Segmenter
first meets it.
"""

import ml_collections

from flowseg_jax import defaults

DATASETS = ("refcoco", "refcoco+", "refcocog")
# Presets per target (Cloud TPU slice names): mesh, remat policy and the global batch that the
# target's own compiler fits in its memory with the 15% headroom of tools/scale.py (the released
# 1.2B model at 512², bf16, AdamW + EMA in float32; benchmarks/RESULTS.md "RLFSeg on RefCOCO").
TARGETS = {
  "v5e-8": dict(data=1, fsdp=8, remat="full", batch_size=32),  # 12.1 GiB; batch 64: no (18.1)
  "v5e-16": dict(data=2, fsdp=8, remat="full", batch_size=64),  # 10.8 GiB; 1 x 16: no (16.2)
}


def get_config(arg: str | None = None):
  args = defaults.parse_arg(arg, target="", **{name: False for name in DATASETS})
  names = [name for name in DATASETS if args[name]]
  if len(names) > 1:
    raise ValueError(f"configs/rlfseg/refcoco.py: pick one dataset of {names}")
  config = defaults.get_base_config()
  config.task = "prompted"
  config.prompted.variant = "released"  # 1536 wide, 24 heads, 16 + 2 blocks, 4 text blocks, p16
  config.prompted.condition = "cache"
  config.seed = 0
  config.total_steps = 40_000
  config.ckpt_every_steps = 2_000
  config.eval_every_steps = 10_000

  config.input.dataset = "refcoco"
  config.input.refcoco = ml_collections.ConfigDict(
    dict(refs_json="", instances_json="", image_dir="", name=(names or ["refcoco"])[0])
  )
  # `flowseg cache-text` writes each split's sentence features here; the loader reads them
  config.input.text_features = ""
  config.input.train_split = "train"
  config.input.eval_split = "val"
  config.input.image_size = (512, 512)
  config.input.batch_size = 64
  config.input.random_flip = False  # "left" / "right" in the prompts must keep their meaning

  config.model.dtype = "bfloat16"
  config.model.remat_policy = "full"
  config.objective.reshape = False  # plain rectified flow; True: FlowSeg's reshaped target, N = 2
  config.repa.enabled = False
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 1_000
  config.prompted.refine.enabled = True
  config.prompted.refine.warmup_steps = 5_000
  config.prompted.adaptive.enabled = True
  config.eval.num_steps = 1  # adaptive one-step sampling
  # The wrong-prompt pass (does the model use its prompt?) would double every evaluation of the
  # 1.2B model; run it on demand: `flowseg evaluate ... --config.prompted.eval_wrong_prompt=True`.
  config.prompted.eval_wrong_prompt = False
  config.eval.batch_per_device = 8
  config.mesh.fsdp = -1
  config.mesh.data = 1
  if args["target"]:
    if args["target"] not in TARGETS:
      raise ValueError(f"target={args['target']!r} is not one of {sorted(TARGETS)}")
    preset = TARGETS[args["target"]]
    config.mesh.data, config.mesh.fsdp = preset["data"], preset["fsdp"]
    config.model.remat_policy = preset["remat"]
    config.input.batch_size = preset["batch_size"]
  return config
