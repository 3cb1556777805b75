"""PyTorch reference of PixNerd's text-to-image network, written for parity tests.

Written from our reading of the official model (see the module docstring of
`flowseg_jax.models.pixnerd_t2i` for the behaviour), not copied from it; the layers it shares
with the class-to-image reference are imported from there. Its `state_dict()` names and shapes
are the official ones, and its NCHW forward is the ground truth the Flax port is compared with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests.torch_reference.pixnerd import RMSNorm, TimestepEmbedder, randomize_, rotate

__all__ = ["PixNerdT2I", "randomize_"]


def rope_table(grid_h: int, grid_w: int, head_dim: int) -> torch.Tensor:
  """Complex (grid_h*grid_w, head_dim/2): columns at linspace(0, grid_h, grid_w), rows at
  linspace(0, grid_w, grid_h); pair 2m <- x w_m, pair 2m+1 <- y w_m."""
  freqs = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
  xs = torch.linspace(0, grid_h, grid_w)
  ys = torch.linspace(0, grid_w, grid_h)
  yy, xx = torch.meshgrid(ys, xs, indexing="ij")
  angles = torch.stack(
    [torch.outer(xx.flatten(), freqs), torch.outer(yy.flatten(), freqs)], dim=-1
  ).reshape(grid_h * grid_w, head_dim // 2)
  return torch.polar(torch.ones_like(angles), angles)


class SwiGLU(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.w12 = nn.Linear(dim, 2 * hidden, bias=False)
    self.w3 = nn.Linear(hidden, dim, bias=False)

  def forward(self, x):
    a, b = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(a) * b)


def _heads(x: torch.Tensor, n: int, num_heads: int) -> list[torch.Tensor]:
  """(B, L, n*D) -> n tensors (B, L, G, hd)."""
  b, length, _ = x.shape
  return list(x.reshape(b, length, n, num_heads, -1).unbind(2))


def _attend(q, k, v, proj):
  b, length, g, hd = q.shape
  out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
  return proj(out.transpose(1, 2).reshape(b, length, g * hd))


class TextAttention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.q_norm = RMSNorm(dim // num_heads)
    self.k_norm = RMSNorm(dim // num_heads)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    q, k, v = _heads(self.qkv(x), 3, self.num_heads)
    return _attend(self.q_norm(q), self.k_norm(k), v, self.proj)


class JointAttention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.qkv_x = nn.Linear(dim, 3 * dim, bias=False)
    self.kv_y = nn.Linear(dim, 2 * dim, bias=False)
    self.q_norm = RMSNorm(dim // num_heads)
    self.k_norm = RMSNorm(dim // num_heads)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, y, cis):
    q, kx, vx = _heads(self.qkv_x(x), 3, self.num_heads)
    ky, vy = _heads(self.kv_y(y), 2, self.num_heads)
    q, kx = rotate(self.q_norm(q), cis), rotate(self.k_norm(kx), cis)
    k = torch.cat([kx, self.k_norm(ky)], dim=1)
    return _attend(q, k, torch.cat([vx, vy], dim=1), self.proj)


class Block(nn.Module):
  def __init__(self, dim: int, num_heads: int, joint: bool):
    super().__init__()
    self.norm1 = RMSNorm(dim)
    self.attn = JointAttention(dim, num_heads) if joint else TextAttention(dim, num_heads)
    self.norm2 = RMSNorm(dim)
    self.mlp = SwiGLU(dim, 4 * dim)
    self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))

  def forward(self, x, c, *attn_args):
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, *attn_args)
    return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class TextEmbedder(nn.Module):
  def __init__(self, text_dim: int, hidden: int):
    super().__init__()
    self.proj = nn.Linear(text_dim, hidden)
    self.norm = RMSNorm(hidden)

  def forward(self, y):
    return self.norm(self.proj(y))


class PatchEmbedder(nn.Module):
  def __init__(self, in_dim: int, hidden: int):
    super().__init__()
    self.proj = nn.Linear(in_dim, hidden)

  def forward(self, x):
    return self.proj(x)


class PixelEmbedder(nn.Module):
  """Pixels ++ the real part of the 128-dim RoPE table on the patch's pixel grid."""

  def __init__(self, in_channels: int, hidden: int):
    super().__init__()
    self.embedder = nn.Sequential(nn.Linear(in_channels + 64, hidden))

  def forward(self, x):
    n, pixels, _ = x.shape
    p = math.isqrt(pixels)
    pos = rope_table(p, p, 128).real.to(x.dtype)
    return self.embedder(torch.cat([x, pos[None].expand(n, -1, -1)], dim=-1))


class NerfBlock(nn.Module):
  def __init__(self, cond_dim: int, hidden: int, mlp_ratio: int):
    super().__init__()
    self.hidden, self.mlp_ratio = hidden, mlp_ratio
    self.param_generator1 = nn.Sequential(nn.Linear(cond_dim, 2 * hidden * hidden * mlp_ratio))
    self.norm = RMSNorm(hidden)

  def forward(self, x, s):
    n, hx, hr = s.shape[0], self.hidden, self.hidden * self.mlp_ratio
    g = self.param_generator1(s)
    fc1 = F.normalize(g[:, : hx * hr].reshape(n, hx, hr), dim=1)  # only fc1 is normalised
    fc2 = g[:, hx * hr :].reshape(n, hr, hx)
    return x + torch.bmm(F.silu(torch.bmm(self.norm(x), fc1)), fc2)


class FinalLayer(nn.Module):
  def __init__(self, hidden: int, out_channels: int):
    super().__init__()
    self.linear = nn.Linear(hidden, out_channels)

  def forward(self, x):
    return self.linear(x)


class PixNerdT2I(nn.Module):
  """NCHW reference: forward(x (B,C,H,W), t (B,), text (B,T,Dt)) -> (B,C,H,W)."""

  def __init__(
    self,
    patch_size,
    hidden_size,
    num_heads,
    num_encoder_blocks,
    num_decoder_blocks,
    num_text_blocks,
    decoder_hidden_size,
    text_dim,
    text_length,
    decoder_mlp_ratio=2,
    in_channels=3,
  ):
    super().__init__()
    self.patch_size, self.num_heads = patch_size, num_heads
    self.num_encoder_blocks = num_encoder_blocks
    self.y_pos_embedding = nn.Parameter(torch.randn(1, text_length, hidden_size))
    self.s_embedder = PatchEmbedder(in_channels * patch_size**2, hidden_size)
    self.x_embedder = PixelEmbedder(in_channels, decoder_hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = TextEmbedder(text_dim, hidden_size)
    self.final_layer = FinalLayer(decoder_hidden_size, in_channels)
    self.blocks = nn.ModuleList(
      [Block(hidden_size, num_heads, True) for _ in range(num_encoder_blocks)]
      + [
        NerfBlock(hidden_size, decoder_hidden_size, decoder_mlp_ratio)
        for _ in range(num_decoder_blocks)
      ]
    )
    self.text_refine_blocks = nn.ModuleList(
      [Block(hidden_size, num_heads, False) for _ in range(num_text_blocks)]
    )

  def forward(self, x, t, text):
    b, c, h, w = x.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    tokens = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, N, C*p*p)
    temb = self.t_embedder(t)[:, None]
    cond = F.silu(temb)
    y = self.y_embedder(text) + self.y_pos_embedding
    for block in self.text_refine_blocks:
      y = block(y, cond)
    s = self.s_embedder(tokens)
    cis = rope_table(gh, gw, s.shape[-1] // self.num_heads)
    for block in self.blocks[: self.num_encoder_blocks]:
      s = block(s, cond, y, cis)
    n = b * gh * gw
    s = F.silu(temb + s).reshape(n, -1)
    xe = self.x_embedder(tokens.reshape(n, c, p * p).transpose(1, 2))
    for block in self.blocks[self.num_encoder_blocks :]:
      xe = block(xe, s)
    out = self.final_layer(xe).transpose(1, 2).reshape(b, gh * gw, c * p * p).transpose(1, 2)
    return F.fold(out, output_size=(h, w), kernel_size=p, stride=p)
