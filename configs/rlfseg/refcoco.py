"""RLFSeg on RefCOCO / RefCOCO+ / RefCOCOg: the released PixNerd-T2I, prompts through Qwen3-1.7B.

One-time preparation (paths are examples):
  python -m flowseg_jax.data.refcoco 'refcoco/refs(unc).p' /data/refcoco/refs_unc.json
  # PixNerd-T2I weights: the official release's model.ckpt (MCG-NJU/PixNerd, T2I XXL/16).
  # Qwen3-1.7B: a Hugging Face directory (config.json, *.safetensors, tokenizer.json).

Launch (the prompt features are computed once into cache_dir on the first start):
  flowseg train --config configs/rlfseg/refcoco.py --workdir /runs/rlfseg_refcoco \\
    --config.model_init=/ckpt/pixnerd_t2i/model.ckpt \\
    --config.prompted.encoder_dir=/ckpt/Qwen3-1.7B --config.prompted.cache_dir=/data/prompt_cache \\
    --config.input.refcoco.refs_json=/data/refcoco/refs_unc.json \\
    --config.input.refcoco.instances_json=/data/refcoco/instances.json \\
    --config.input.refcoco.image_dir=/data/coco/train2014
  flowseg evaluate --workdir /runs/rlfseg_refcoco --config.eval.num_steps=1
  flowseg predict --workdir /runs/rlfseg_refcoco --input IMG --output OUT --prompt "the man on the left"

Variants (`:ARG`): `refcoco+` / `refcocog` only change the refs file name in the log; point
refs_json / instances_json at that dataset's files (RefCOCOg: split_by umd, eval split 'val').

Limitation: the 'cache' condition holds every prompt's (128, 2048) features in memory
(1 MiB each in float32): fine for the evaluation splits (~10k sentences), too much for the
full RefCOCO training split (~120k) on one host; stream the features from disk for that. Inference
reads none of it: a sentence, seen in training or not, is encoded by the Qwen3 of encoder_dir when the
Segmenter first meets it.
"""

import ml_collections

from flowseg_jax import defaults


def get_config(arg: str | None = None):
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
    dict(refs_json="", instances_json="", image_dir="", name=arg or "refcoco")
  )
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
  if arg not in (None, "", "refcoco", "refcoco+", "refcocog"):
    raise ValueError(f"configs/rlfseg/refcoco.py: unknown variant {arg!r}")
  return config
