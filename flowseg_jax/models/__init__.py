"""Networks: the PixNerd pixel neural-field DiT (class- and text-conditioned), the prompted task's
denoiser, the frozen DINOv2 teacher and REPA, the Qwen3 text encoder.

layers       shared blocks and logical partitioning
pixnerd      PixNerDiT, PixNerd's class-to-image model (FlowSeg's network)
nerf         the pixel neural-field decoder both PixNerd models share
pixnerd_t2i  PixNerd's text-to-image model
prompted     PromptedDenoiser: PixNerd-T2I conditioned on a prompt id or text features
dinov2, repa the REPA teacher, projector and loss
bicubic      PyTorch-exact bicubic resize (DINOv2's position embeddings)
qwen3        the text encoder of prompted runs
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from flowseg_jax.models import pixnerd

# Architecture fields of `config.model` that override the named variant when set (not None).
ARCH_OVERRIDES = tuple(pixnerd.VARIANTS["XL/16"])
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def default_model_config(variant: str = "XL/16") -> ml_collections.ConfigDict:
  """`config.model`: a PixNerd variant, optional architecture overrides, performance knobs."""
  c = ml_collections.ConfigDict()
  # A name in models.pixnerd.VARIANTS ("XL/16", "L/16", "B/16", "S/16", "tiny/8", "tiny/4").
  c.variant = variant
  for field in ARCH_OVERRIDES:  # None keeps the variant's value
    c[field] = ml_collections.FieldReference(None, field_type=int)
  # Matmul compute dtype ("float32" | "bfloat16"); parameters and the loss stay float32.
  c.dtype = "float32"
  # jax.nn.dot_product_attention implementation: None (XLA picks), "xla" or "cudnn".
  c.attention_impl = ml_collections.FieldReference(None, field_type=str)
  # Per-block rematerialisation: "none", "full" or a jax.checkpoint_policies name.
  c.remat_policy = "none"
  # nn.scan over identical blocks: True, False, or None (auto: `resolve_scan_blocks`, scanned only
  # for models deeper than UNROLL_MAX_BLOCKS, i.e. L/16 and XL/16 scan, B/16, S/16 and tiny unroll).
  c.scan_blocks = ml_collections.FieldReference(None, field_type=bool)
  # Blocks per iteration of the scanned loops (nn.scan's unroll); only with scan_blocks. Without
  # remat the NeRF decoder's loop is always fully unrolled (see models/pixnerd.py).
  c.scan_unroll = 1
  return c


# The deepest model whose blocks are unrolled by default. Unrolled blocks run faster on CPU (no
# per-layer slices of stacked parameters, no stacked residual buffers: S/16 128² b4 step 1.10-1.12x
# faster, less XLA memory; benchmarks/RESULTS.md), and their compile time grows with the depth, which
# for the 24- and 30-block L/16 and XL/16 (the paper's configs, their memory plans and presets) is what
# nn.scan saves.
UNROLL_MAX_BLOCKS = 12


def resolve_scan_blocks(scan_blocks: bool | None, num_blocks: int) -> bool:
  """`config.model.scan_blocks` as set, or for None whether a model of `num_blocks` blocks scans."""
  return bool(scan_blocks) if scan_blocks is not None else num_blocks > UNROLL_MAX_BLOCKS


def create_model(cfg: ml_collections.ConfigDict):
  """Builds the PixNerDiT that `config.model` describes."""
  if cfg.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")
  overrides = {k: cfg[k] for k in ARCH_OVERRIDES if cfg.get(k) is not None}
  num_blocks = overrides.get(
    "num_blocks", pixnerd.VARIANTS.get(cfg.variant, {}).get("num_blocks", 0)
  )
  return pixnerd.make_model(
    cfg.variant,
    **overrides,
    dtype=DTYPES[cfg.dtype],
    attention_impl=cfg.attention_impl,
    remat_policy=cfg.remat_policy,
    scan_blocks=resolve_scan_blocks(cfg.get("scan_blocks"), num_blocks),
    scan_unroll=int(cfg.get("scan_unroll", 1)),
  )
