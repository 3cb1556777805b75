"""Our own small PyTorch DINOv2 ViT, for parity tests of `flowseg_jax.models.dinov2`.

Written from the semantics of the official facebookresearch/dinov2 `DinoVisionTransformer` in
inference mode (hub layout: flat `blocks.{i}`, MLP feed-forward, LayerScale), with the same
state-dict names and shapes as the released checkpoints (`cls_token`, `pos_embed`, `mask_token`,
`register_tokens`, `patch_embed.proj.*`, `blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
mlp.fc1,mlp.fc2,ls2.gamma}.*`, `norm.*`). NCHW input; position embeddings are resized with
`torch.nn.functional.interpolate(mode="bicubic")` following the official offset / scale-factor
convention. No xFormers, no dropout, no masks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
  def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    _, _, h, w = x.shape
    if h % self.patch_size or w % self.patch_size:
      raise ValueError(f"input {h}x{w} not a multiple of the patch size {self.patch_size}")
    return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches


class Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.proj = nn.Linear(dim, dim, bias=True)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    hd = c // self.num_heads
    q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
    logits = (q * hd**-0.5) @ k.transpose(-2, -1)
    out = logits.softmax(dim=-1) @ v  # (B, heads, N, hd)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
  def __init__(self, dim: int, init_value: float = 1.0):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), init_value))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * self.gamma


class Mlp(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, layerscale: bool):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))
    self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class DinoViT(nn.Module):
  """Reference DINOv2 ViT. `forward_features` returns the official output dict."""

  def __init__(
    self,
    *,
    patch_size: int = 14,
    embed_dim: int = 768,
    depth: int = 12,
    num_heads: int = 12,
    mlp_ratio: float = 4.0,
    num_register_tokens: int = 0,
    pretrain_img_size: int = 518,
    layerscale: bool = True,
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
  ):
    super().__init__()
    self.patch_size = patch_size
    self.num_register_tokens = num_register_tokens
    self.interpolate_offset = interpolate_offset
    self.interpolate_antialias = interpolate_antialias
    grid = pretrain_img_size // patch_size
    self.patch_embed = PatchEmbed(patch_size, 3, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
    self.register_tokens = (
      nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
    )
    self.blocks = nn.ModuleList(
      [Block(embed_dim, num_heads, mlp_ratio, layerscale) for _ in range(depth)]
    )
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused at inference

  def interpolate_pos_encoding(self, num_tokens: int, h: int, w: int) -> torch.Tensor:
    """Position embedding (1, num_tokens, D) for an h x w pixel input (cls included)."""
    n_grid = self.pos_embed.shape[1] - 1
    if num_tokens - 1 == n_grid and h == w:
      return self.pos_embed
    m = int(math.sqrt(n_grid))
    gh, gw = h // self.patch_size, w // self.patch_size
    grid = self.pos_embed[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if self.interpolate_offset:
      kwargs = dict(
        scale_factor=(
          float(gh + self.interpolate_offset) / m,
          float(gw + self.interpolate_offset) / m,
        )
      )
    else:
      kwargs = dict(size=(gh, gw))
    grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **kwargs)
    assert tuple(grid.shape[-2:]) == (gh, gw), grid.shape
    grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
    return torch.cat([self.pos_embed[:, :1].float(), grid], dim=1).to(self.pos_embed.dtype)

  def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
    b, _, h, w = x.shape
    x = self.patch_embed(x)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
    x = x + self.interpolate_pos_encoding(x.shape[1], h, w)
    r = self.num_register_tokens
    if r:
      x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
    for blk in self.blocks:
      x = blk(x)
    x_norm = self.norm(x)
    return {
      "x_norm_clstoken": x_norm[:, 0],
      "x_norm_regtokens": x_norm[:, 1 : r + 1],
      "x_norm_patchtokens": x_norm[:, r + 1 :],
      "x_prenorm": x,
    }


def randomize_(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
  """Fills every parameter with N(0, scale^2) noise (norm weights and gammas around 1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * scale
      is_norm_weight = name.endswith("weight") and (".norm" in name or name.startswith("norm"))
      if name.endswith("gamma") or is_norm_weight:
        p.copy_(1.0 + noise)
      else:
        p.copy_(noise)
  return model


def dinov2_preprocess(raw_image: torch.Tensor, base_patch_size: int = 16) -> torch.Tensor:
  """PixNerd's DINOv2 input: [0,1] NCHW -> ImageNet normalise -> bicubic to 14/16 of the size."""
  mean = torch.tensor([0.485, 0.456, 0.406], dtype=raw_image.dtype)[None, :, None, None]
  std = torch.tensor([0.229, 0.224, 0.225], dtype=raw_image.dtype)[None, :, None, None]
  x = (raw_image - mean) / std
  _, _, h, w = x.shape
  size = (int(14 * h / base_patch_size), int(14 * w / base_patch_size))
  return F.interpolate(x, size, mode="bicubic", align_corners=False)
