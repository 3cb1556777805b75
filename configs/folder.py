"""Your own data: a folder of images and PNG masks (or a saved Hugging Face dataset), a tiny PixNerd
trained from scratch on a CPU.

  flowseg train --config configs/folder.py --workdir W --config.input.data_dir=D

D holds img_dir/{train,val} + ann_dir/{train,val} (mmseg's layout) or images/{train,val} +
masks/{train,val}, paired by file stem, and classes.txt (one name per line) or classes.json
(names and optionally a palette); or a DatasetDict saved by `datasets` with an image and a label
column. Masks, their encodings and the checks before step 1: flowseg_jax/data/folder.py, README
"Train on your own data". The fields to know: --config.input.folder.reduce_zero_label=true (0 =
unlabelled, classes start at 1), .binary=true (0/255 masks), .mask_suffix, .image_suffix, .layout,
and --config.input.on_bad_example=skip.

The model and schedule are the demo's (configs/demo.py) at 64x64: images are resized to
input.image_size. Variants (`--config configs/folder.py:ARG`): `smoke` is the demo's smoke run
(a few seconds, 32x32; tests).
"""

import os

from flowseg_jax import defaults


def get_config(arg: str | None = None):
  smoke = defaults.parse_arg(arg, smoke=False)["smoke"]
  here = os.path.dirname(os.path.abspath(__file__))
  config = defaults.load_config_file(os.path.join(here, "demo.py"), "smoke" if smoke else None)
  config.input.dataset = "folder"
  if not smoke:
    config.input.image_size = (64, 64)
    config.model.variant = "tiny/8"  # 8x8 patches: the demo's 64 tokens per image
    config.total_steps = 1500
    config.ckpt_every_steps = 500
    config.eval_every_steps = 500
  return config
