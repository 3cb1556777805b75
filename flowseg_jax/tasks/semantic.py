"""FlowSeg semantic segmentation: PixNerd's class-to-image model, N class colours, mIoU.

The network is conditioned on one label for every example, `config.cond_label` (-1: PixNerd's null
class, the unconditional branch); labels are train ids (255 ignored); without
`config.objective.mask_ignored` ignored pixels are trained toward one extra colour.
"""

from __future__ import annotations

import jax.numpy as jnp

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import models
from flowseg_jax.data import datasets
from flowseg_jax.evaluators import miou
from flowseg_jax.tasks import base


class SemanticTask(base.Task):
  """FlowSeg semantic segmentation (see the module docstring)."""

  name = "semantic"
  best_metric = "mIoU"
  batch_keys = ("image", "label")
  evaluator = miou.MiouEvaluator

  def __init__(self, config, vocabulary: base.Vocabulary | None = None):
    super().__init__(config, vocabulary)
    self.model = models.create_model(config.model)
    if vocabulary is None:
      self.num_classes = datasets.num_classes(config.input)
    else:
      self.num_classes = len(vocabulary.class_names)
    self.centroids = jnp.asarray(
      centroids_lib.class_centroids(
        self.num_classes, ignore_as_class=not self.objective.mask_ignored
      )
    )
    self.cond_label = self.model.num_classes if config.cond_label < 0 else int(config.cond_label)

  def condition(self, batch):
    return jnp.full((batch["image"].shape[0],), self.cond_label, jnp.int32)

  def condition_of(self, prompt) -> int:
    if prompt is not None:
      raise ValueError(f"this model segments every class and takes no prompt (got {prompt!r})")
    return self.cond_label

  def pretrained_params(self, path: str):
    """PixNerd params from a converted export (`flowseg convert pixnerd`), re-laid-out for this
    model (scanned blocks or not)."""
    from flowseg_jax.convert import pixnerd as pixnerd_convert  # torch-format code only when used

    src_model, src_params = pixnerd_convert.load_converted(path)
    if src_model.arch_config() != self.model.arch_config():
      raise ValueError(
        f"config.model_init={path!r} holds architecture {src_model.arch_config()}, but "
        f"config.model builds {self.model.arch_config()}"
      )
    scan = self.model.scan_blocks
    return pixnerd_convert.relayout(src_params, src_model, scan_blocks=scan)[1]
