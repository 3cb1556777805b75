"""Metric writers without TensorFlow: log lines and TensorBoard event files (tensorboardX).

clu's writers import TensorFlow (`clu.metric_writers` loads its TF SummaryWriter on import), about 1.4 GB
that TPU and GPU hosts do not need. This writer keeps clu's MetricWriter methods (write_scalars,
write_images, write_hparams, flush, close), logs scalars through absl, and writes TensorBoard events with
tensorboardX (pure Python); without tensorboardX it logs one warning and keeps the log lines.
`metrics.jsonl` is written by the training loop either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from flowseg_jax.run import files


def flatten_hparams(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested config -> {'optim.learning_rate': 1e-4, ...}; values TensorBoard can show (bool, int,
  float, str): None, tuples and lists become strings."""
  return {
    name: value if isinstance(value, bool | int | float | str) else str(value)
    for name, value in files.flatten(tree).items()
  }


class MetricWriter:
  """Scalars to the log and (process 0, tensorboardX installed) TensorBoard events in logdir."""

  def __init__(self, logdir: str | None, *, just_logging: bool = False):
    self._tb = None
    if logdir is not None and not just_logging:
      try:
        import tensorboardX
      except ImportError:
        logging.warning(
          "tensorboardX is not installed: no TensorBoard events (metrics.jsonl and logs only). "
          "`pip install tensorboardX` to get them."
        )
      else:
        self._tb = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
    if self._tb is not None:
      for key, value in values.items():
        self._tb.add_scalar(key, value, global_step=step)

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """images: name -> uint8 (1, H, W, 3) or (H, W, 3)."""
    if self._tb is None:
      return
    for key, value in images.items():
      value = np.asarray(value)
      value = value[0] if value.ndim == 4 else value
      self._tb.add_image(key, value, global_step=step, dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Flattened hyper-parameters to TensorBoard's HPARAMS tab (in this run, not a sub-run)."""
    flat = flatten_hparams(hparams)
    if self._tb is None:
      return
    from tensorboardX import summary

    metrics = {"eval/mIoU": 0.0, "train/loss": 0.0}  # names the HPARAMS tab plots against
    file_writer = self._tb._get_file_writer()  # noqa: SLF001 - add_hparams would open a sub-run
    for record in summary.hparams(flat, metrics):
      file_writer.add_summary(record)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def create_writer(logdir: str | None, *, just_logging: bool = False) -> MetricWriter:
  return MetricWriter(logdir, just_logging=just_logging)


@contextlib.contextmanager
def ensure_flushes(writer: MetricWriter):
  """Flushes and closes the writer when the block ends (also on errors)."""
  try:
    yield writer
  finally:
    writer.close()
