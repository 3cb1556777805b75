"""Benchmark cases (a PixNerd variant, image size and global batch), their configs and batches."""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections
import numpy as np

from flowseg_jax import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/flowseg_ade20k.py:stage=1"


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmark size: a PixNerd variant, image size and global batch."""

  variant: str
  height: int
  width: int
  batch: int

  @property
  def label(self) -> str:
    return f"{self.variant} {self.height}x{self.width} b{self.batch}"


def parse_cases(text: str) -> list[Case]:
  """'S/16:64:2,XL/16:256x512:8' (variant:res:batch, res = N or HxW) -> [Case, ...]."""
  from flowseg_jax.models import pixnerd

  cases = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    parts = item.split(":")
    if len(parts) != 3:
      raise ValueError(f"case {item!r} must look like VARIANT:RES:BATCH, e.g. S/16:64:2")
    variant, res, batch = parts
    if variant not in pixnerd.VARIANTS:
      raise ValueError(
        f"case {item!r}: unknown variant {variant!r}; known {sorted(pixnerd.VARIANTS)}"
      )
    try:
      h, w = (int(v) for v in (res.split("x") if "x" in res else (res, res)))
      b = int(batch)
    except ValueError as e:
      raise ValueError(f"case {item!r}: RES must be N or HxW and BATCH an int") from e
    if min(h, w, b) <= 0:
      raise ValueError(f"case {item!r}: sizes must be positive")
    cases.append(Case(variant, h, w, b))
  if not cases:
    raise ValueError(f"no benchmark case in {text!r}")
  return cases


def load_config(spec: str) -> ml_collections.ConfigDict:
  """A config file by path with an optional ':arg' ('configs/demo.py:smoke'), relative to the repo."""
  path, _, arg = spec.partition(":")
  return defaults.load_config_file(os.path.join(REPO, path), arg)


def resolve_dtype(dtype: str) -> str:
  """'auto' -> float32 on CPU (as the PyTorch reference there), bfloat16 on accelerators."""
  if dtype == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype must be 'auto', 'float32' or 'bfloat16', got {dtype!r}")
  return dtype


def case_config(
  base: ml_collections.ConfigDict,
  case: Case,
  *,
  dtype: str,
  remat: str | None = None,
  scan: bool | None = None,
  attention_impl: str | None = None,
  reshape: bool | None = None,
  teacher_dir: str | None = None,
) -> ml_collections.ConfigDict:
  """A copy of `base` set to one case; REPA only when a converted teacher is given."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.input.image_size = (case.height, case.width)
  config.input.batch_size = case.batch
  config.model.variant = case.variant
  config.model.num_classes = None  # the variant's label table (the conditioning is the null class)
  config.model.dtype = dtype
  if remat is not None:
    config.model.remat_policy = remat
  if scan is not None:
    config.model.scan_blocks = scan
  if attention_impl is not None:
    config.model.attention_impl = attention_impl
  if reshape is not None:
    config.objective.reshape = reshape
  config.optim.grad_accum_steps = 1
  config.repa.enabled = bool(teacher_dir)
  if teacher_dir:
    config.repa.teacher_dir = teacher_dir
  return config


def random_batch(config, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A training batch as the pipeline yields it: image float32 in [-1, 1], int32 labels, 5% ignored."""
  rng = np.random.default_rng(seed)
  b, (h, w) = config.input.batch_size, config.input.image_size
  image = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
  label = rng.integers(0, num_classes, (b, h, w)).astype(np.int32)
  label[rng.random((b, h, w)) < 0.05] = 255
  return {"image": image, "label": label}
