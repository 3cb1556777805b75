"""FlowSeg on COCO-Stuff-164k (171 classes), the paper's two stages, PixNerd-XL/16 with REPA.

  flowseg train --config configs/flowseg_cocostuff.py:stage=1 --workdir $WD/coco_s1 \\
    --config.input.data_dir=/data/coco_stuff164k \\
    --config.model_init=$CKPT/pixnerd_xl16 --config.repa.teacher_dir=$CKPT/dinov2_vitb14
  flowseg train --config configs/flowseg_cocostuff.py:stage=2 --workdir $WD/coco_s2 \\
    --config.input.data_dir=/data/coco_stuff164k --config.init_from=$WD/coco_s1 \\
    --config.repa.teacher_dir=$CKPT/dinov2_vitb14

Labels: raw stuffthingmaps (`input.coco_stuff_labels='raw'`, mapped to the 171 train ids on the fly) or
mmseg-converted `*_labelTrainIds.png` (`'train_ids'`).
"""

import os

from flowseg_jax import defaults


def get_config(arg: str | None = None):
  here = os.path.dirname(os.path.abspath(__file__))
  config = defaults.load_config_file(os.path.join(here, "flowseg_ade20k.py"), arg)
  config.input.dataset = "coco_stuff"
  config.input.train_split = "train2017"
  config.input.eval_split = "val2017"
  config.input.coco_stuff_labels = "raw"
  return config
