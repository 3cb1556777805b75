"""Prompted segmentation (RLFSeg) demo: a tiny PixNerd-T2I with a learned prompt table, on a CPU.

  flowseg train --config configs/rlfseg/demo.py --workdir /tmp/rlfseg_demo
  flowseg evaluate --workdir /tmp/rlfseg_demo --config.eval.num_steps=1
  flowseg predict --workdir /tmp/rlfseg_demo --input IMAGE_OR_DIR --output /tmp/masks \\
    --prompt "a photo of texture_003"

The built-in synthetic dataset (8 textured classes at 32x32) becomes prompted examples: one per
class present in an image, prompt "a photo of texture_<kkk>", target the class's binary mask. The
prompt's text features come from a learned table (one (T, D_text) entry per prompt; no language
model on a CPU), so the model knows exactly these prompts. Evaluation reports gIoU / cIoU, the
all-background baseline, and the wrong-prompt gIoU / cIoU (every example scored with another
example's prompt: near 0 for a model that uses its prompt, equal to gIoU for one that ignores it).
Objects are coloured by class as well as patterned (`synthetic.class_colours`) and a batch holds one
image under several prompts (`prompted.group_by_image`): without them this model answers every
prompt with the same mask within a CPU budget (benchmarks/RESULTS.md has the measurements).

Variants (`--config configs/rlfseg/demo.py:ARG`, comma-separated):
  smoke      a few steps (tests, CI)
  refine     label refinement on (ablation)
  reshape    FlowSeg's reshaped target with N = 2 instead of plain rectified flow
  adaptive   adaptive one-step sampling, evaluated with one step
  zeroshot   train on classes 0-5, evaluate on the held-out 6-7. The learned table's rows 6-7
             never receive a gradient, so held-out prompts are untrained random features: this
             measures what a table cannot do (a text encoder is needed for zero-shot prompts)
  textures   the original random colours (the class only in the texture)
  text       prompts are sentences, "one {colour} {texture} object", read by a small Qwen3 text
             encoder (2 layers, width 32) over a word-level tokenizer built from the sentences'
             words, trained with the denoiser (config.prompted.condition='text'). Each class is
             named by one of its two colours and a word for its tile (`TEXT_NAMES`); training
             uses three phrasings (`TEXT_TEMPLATES`), evaluation two held-out ones
             (`TEXT_EVAL_TEMPLATES`: a new combination of seen words, and new words). The model
             then segments any sentence: `flowseg predict ... --prompt "the pink ringed thing"`.
             Seed 0: gIoU 53.1 on the held-out phrasings, 54.6 on the training ones, prompt
             use 45.3 (benchmarks/RESULTS.md).
  compositional  (implies text) compositional zero-shot: 16 classes, each a combination of one of
             4 colours and one of 4 textures (`synthetic.compose`), named "{colour} {texture}"
             with the words of `text` (`COMPOSE_COLOURS`, `COMPOSE_TEXTURES`). The 4 combinations
             of `COMPOSE_HELD_OUT` never appear in a training image (`synthetic.train_classes`),
             while each of their words appears in 3 seen ones; evaluation (128 images, the
             training phrasings) covers all 16. experiments/rlfseg_ablations.py scores seen and
             held-out combinations apart. Seeds 0-2: held-out gIoU 32.9 +- 6.9 against seen
             38.3 +- 4.8, 5.2-5.8 CPU minutes per run; the model reads the colour word (alone
             33.4 on held-out combinations) and little of the texture word (alone 5.8).
  noisy      noisy training annotations: every training mask dilated or eroded by 1 pixel and its
             outline jittered (`config.input.prompted.mask_noise`, data/mask_noise.py), the
             evaluation masks clean; refinement (when on) looks 2 pixels from an outline, as far
             as the noise reaches.
             Seed 0: gIoU 39.5 with refinement off, 53.3 with it on (10 steps; benchmarks/RESULTS.md).
"""

from flowseg_jax import defaults
from flowseg_jax.data import prompted

VARIANTS = (
  "smoke",
  "refine",
  "reshape",
  "adaptive",
  "zeroshot",
  "textures",
  "text",
  "compositional",
  "noisy",
)
# Class k of the synthetic data with class_colours: one of its two colours
# (synthetic.class_colour_pairs()[k]) and a name for its 4x4 tile.
TEXT_NAMES = [
  "olive striped",
  "blue dotted",
  "grey checked",
  "magenta woven",
  "silver speckled",
  "brown zigzag",
  "pink ringed",
  "purple mottled",
]
TEXT_TEMPLATES = ["one {} object", "the {} region", "a photo of the {} thing"]
TEXT_EVAL_TEMPLATES = ["the {} object", "find every {} shape"]
# compositional: colour c is class c's colour pair and texture t class t's tile, named as in
# TEXT_NAMES; class k = (colour k // 4, texture k % 4). Held out: one combination per colour and
# per texture, (c, c + 1 mod 4).
COMPOSE_COLOURS = ["olive", "blue", "grey", "magenta"]
COMPOSE_TEXTURES = ["striped", "dotted", "checked", "woven"]
COMPOSE_HELD_OUT = [4 * c + (c + 1) % 4 for c in range(4)]  # classes 1, 6, 11, 12


def get_config(arg: str | None = None):
  args = defaults.parse_arg(arg, **dict.fromkeys(VARIANTS, False))
  args["text"] = args["text"] or args["compositional"]
  config = defaults.get_base_config()
  config.task = "prompted"
  config.prompted.variant = "tiny"  # PixNerd-T2I: 64 wide, 2 heads, 2+2 blocks, patch 4
  config.seed = 0
  # ~3.5 min on 2 free CPU cores: gIoU 67.0, wrong-prompt gIoU 5.3 (benchmarks/RESULTS.md).
  config.total_steps = 2000
  config.log_every_steps = 50
  config.ckpt_every_steps = 1000
  config.eval_every_steps = 1000
  config.keep_checkpoints = 2

  config.input.dataset = "synthetic"
  config.input.synthetic.num_classes = 8
  config.input.synthetic.num_train = 1024
  config.input.synthetic.num_eval = 64
  config.input.synthetic.size = (32, 32)
  config.input.synthetic.class_colours = True
  config.input.image_size = (32, 32)
  config.input.batch_size = 16
  config.input.random_flip = True
  config.input.prompted = prompted.default_prompted_input_config()
  config.input.prompted.group_by_image = True

  config.model.scan_blocks = True
  config.objective.reshape = False  # RLFSeg's plain rectified-flow target v = x1 - x0
  config.repa.enabled = False
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.schedule = "cosine"
  config.optim.end_lr_factor = 0.05
  config.optim.ema_decay = 0.99
  config.eval.num_steps = 10
  config.eval.num_pictures = 0
  config.eval.batch_per_device = 32
  config.mesh.data = -1

  config.prompted.refine.warmup_steps = 500
  if args["smoke"]:
    defaults.smoke(config)
    config.input.synthetic.num_train = 16
    config.input.synthetic.num_eval = 4
    config.eval.batch_per_device = 4
    config.prompted.refine.warmup_steps = 2
  if args["refine"]:
    config.prompted.refine.enabled = True
  if args["reshape"]:
    config.objective.reshape = True
  if args["adaptive"]:
    config.prompted.adaptive.enabled = True
    config.eval.num_steps = 1
  if args["zeroshot"]:
    config.input.prompted.train_classes = [0, 1, 2, 3, 4, 5]
    config.input.prompted.eval_classes = [6, 7]
  if args["textures"]:
    config.input.synthetic.class_colours = False
  if args["noisy"]:
    config.input.prompted.mask_noise = 1
    config.prompted.refine.boundary_width = 2
  if args["text"]:
    from flowseg_jax.tasks import prompts  # tokenizers, only for this variant

    p = config.input.prompted
    p.names, p.templates, p.eval_templates = TEXT_NAMES, TEXT_TEMPLATES, TEXT_EVAL_TEMPLATES
    config.prompted.condition = "text"
    if args["compositional"]:
      s = config.input.synthetic
      s.num_classes, s.compose = 16, (4, 4)
      s.train_classes = [k for k in range(16) if k not in COMPOSE_HELD_OUT]
      if not args["smoke"]:
        s.num_eval = 128
      p.names = [f"{c} {t}" for c in COMPOSE_COLOURS for t in COMPOSE_TEXTURES]
      p.eval_templates = None  # the training phrasings: only the combination is new
    sentences = [t.format(n) for t in TEXT_TEMPLATES + TEXT_EVAL_TEMPLATES for n in p.names]
    # Written into the workdir's config.json: the tokenizer's ids never depend on later overrides.
    config.prompted.text.vocabulary = prompts.prompt_words(sentences)
  return config
