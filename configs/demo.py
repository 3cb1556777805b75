"""Demo: a tiny PixNerd trained from scratch on the built-in synthetic dataset, on a CPU, in minutes.

  flowseg train --config configs/demo.py --workdir /tmp/flowseg_demo

Variants (`--config configs/demo.py:ARG`): `smoke` shrinks everything to a few seconds (tests, CI).
"""

from flowseg_jax import defaults


def get_config(arg: str | None = None):
  config = defaults.get_base_config()
  config.seed = 0
  config.total_steps = 3000  # ~4 min on a 2-core CPU; mIoU ~66% (12 classes, chance ~8%)
  config.log_every_steps = 50
  config.ckpt_every_steps = 1000
  config.eval_every_steps = 1000
  config.keep_checkpoints = 2

  config.input.dataset = "synthetic"
  config.input.synthetic.num_classes = 12
  config.input.synthetic.num_train = 2048
  config.input.synthetic.num_eval = 64
  config.input.synthetic.size = (32, 32)
  config.input.image_size = (32, 32)
  config.input.batch_size = 16
  config.input.random_flip = True

  config.model.variant = "tiny/4"
  config.model.num_classes = 1  # only the null class is used: conditioning is unconditional
  config.model.scan_blocks = True

  config.repa.enabled = False
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 100
  config.optim.schedule = "cosine"
  config.optim.end_lr_factor = 0.05
  config.optim.ema_decay = 0.99
  config.eval.num_steps = 10
  config.eval.num_pictures = 4
  config.eval.batch_per_device = 16
  config.mesh.data = -1

  if defaults.parse_arg(arg, smoke=False)["smoke"]:
    defaults.smoke(config)
    config.input.synthetic.num_train = 64
    config.input.synthetic.num_eval = 8
    config.eval.num_pictures = 2
    config.eval.batch_per_device = 1
  return config
