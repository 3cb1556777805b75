"""PyTorch reference of PixNerd's class-to-image network (PixNerDiT), written for parity tests.

Written from /work/shared/reference/pixnerd_facts.md (sections 2 and 3), not from the official
code. Its `state_dict()` names and shapes are the official ones, so it produces checkpoints the
converter must accept, and its NCHW forward is the ground truth the Flax port is compared with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
  """Normalise in float32 over the last axis, cast back, multiply by a learnable scale."""

  def __init__(self, dim: int, eps: float = 1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
    return normed.type_as(x) * self.weight


class TimestepEmbedder(nn.Module):
  def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10.0):
    super().__init__()
    self.freq_dim = freq_dim
    self.max_period = max_period
    self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    half = self.freq_dim // 2
    k = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(self.max_period) * k / half)
    args = t.float()[:, None] * freqs[None]
    feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes: int, hidden: int):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, hidden)

  def forward(self, y: torch.Tensor) -> torch.Tensor:
    return self.embedding_table(y)


class PatchEmbedder(nn.Module):
  def __init__(self, in_dim: int, hidden: int):
    super().__init__()
    self.proj = nn.Linear(in_dim, hidden)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.proj(x)


def rope_2d(grid_h: int, grid_w: int, head_dim: int, device=None) -> torch.Tensor:
  """Complex table (L, head_dim/2): pair 2m <- x * w_m, pair 2m+1 <- y * w_m."""
  m = torch.arange(0, head_dim, 4, dtype=torch.float32, device=device)[: head_dim // 4]
  freqs = 1.0 / (10000.0 ** (m / head_dim))
  ys = torch.linspace(0, 16, grid_h, device=device)
  xs = torch.linspace(0, 16, grid_w, device=device)
  yy, xx = torch.meshgrid(ys, xs, indexing="ij")
  ax = torch.outer(xx.flatten(), freqs)
  ay = torch.outer(yy.flatten(), freqs)
  angles = torch.stack([ax, ay], dim=-1).reshape(grid_h * grid_w, head_dim // 2)
  return torch.polar(torch.ones_like(angles), angles)


def rotate(x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
  """x (B, L, G, hd): adjacent channels as complex numbers times cis (L, hd/2)."""
  xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
  out = torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)
  return out.type_as(x)


class Attention(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=False)
    self.q_norm = RMSNorm(self.head_dim)
    self.k_norm = RMSNorm(self.head_dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv.unbind(2)  # (B, L, G, hd)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k = rotate(q, cis), rotate(k, cis)
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (B, G, L, hd)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.w1 = nn.Linear(dim, hidden, bias=False)
    self.w2 = nn.Linear(hidden, dim, bias=False)
    self.w3 = nn.Linear(dim, hidden, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FlattenDiTBlock(nn.Module):
  def __init__(self, dim: int, num_heads: int):
    super().__init__()
    self.norm1 = RMSNorm(dim)
    self.attn = Attention(dim, num_heads)
    self.norm2 = RMSNorm(dim)
    self.mlp = SwiGLU(dim, int(2 * int(4.0 * dim) / 3))
    self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))

  def forward(self, s: torch.Tensor, c: torch.Tensor, cis: torch.Tensor) -> torch.Tensor:
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
    s = s + g1 * self.attn(self.norm1(s) * (1 + sc1) + sh1, cis)
    return s + g2 * self.mlp(self.norm2(s) * (1 + sc2) + sh2)


class NerfEmbedder(nn.Module):
  def __init__(self, in_channels: int, hidden: int, max_freqs: int = 8):
    super().__init__()
    self.max_freqs = max_freqs
    self.embedder = nn.Sequential(nn.Linear(in_channels + max_freqs**2, hidden))

  def dct(self, patch: int, dtype, device) -> torch.Tensor:
    pos = torch.linspace(0, 1, patch, dtype=dtype, device=device)
    py, px = (a.reshape(-1) for a in torch.meshgrid(pos, pos, indexing="ij"))
    phi = torch.linspace(0, self.max_freqs, self.max_freqs, dtype=dtype, device=device)
    cx = torch.cos(math.pi * px[:, None] * phi[None])
    cy = torch.cos(math.pi * py[:, None] * phi[None])
    feats = cx[:, :, None] * cy[:, None, :] / (1 + phi[:, None] * phi[None, :])
    return feats.reshape(patch * patch, -1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    n, pixels, _ = x.shape
    dct = self.dct(int(math.isqrt(pixels)), x.dtype, x.device)
    return self.embedder(torch.cat([x, dct[None].expand(n, -1, -1)], dim=-1))


class NerfBlock(nn.Module):
  def __init__(self, cond_dim: int, hidden: int, mlp_ratio: int):
    super().__init__()
    self.hidden = hidden
    self.mlp_ratio = mlp_ratio
    self.param_generator1 = nn.Sequential(nn.Linear(cond_dim, 2 * hidden * hidden * mlp_ratio))
    self.norm = RMSNorm(hidden)

  def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    n, hx, hr = s.shape[0], self.hidden, self.hidden * self.mlp_ratio
    g = self.param_generator1(s)
    fc1 = F.normalize(g[:, : hx * hr].reshape(n, hx, hr), dim=1)
    fc2 = F.normalize(g[:, hx * hr :].reshape(n, hr, hx), dim=1)
    return x + torch.bmm(F.silu(torch.bmm(self.norm(x), fc1)), fc2)


class NerfFinalLayer(nn.Module):
  def __init__(self, hidden: int, out_channels: int):
    super().__init__()
    self.norm = RMSNorm(hidden)
    self.linear = nn.Linear(hidden, out_channels)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.linear(self.norm(x))


class PixNerDiT(nn.Module):
  """NCHW reference: forward(x (B,C,H,W), t (B,), y (B,) long) -> (B,C,H,W)."""

  def __init__(
    self,
    patch_size: int,
    hidden_size: int,
    num_heads: int,
    num_blocks: int,
    num_cond_blocks: int,
    nerf_hidden_size: int,
    nerf_mlp_ratio: int,
    num_classes: int,
    in_channels: int = 3,
  ):
    super().__init__()
    self.patch_size = patch_size
    self.num_heads = num_heads
    self.num_cond_blocks = num_cond_blocks
    self.x_embedder = NerfEmbedder(in_channels, nerf_hidden_size)
    self.s_embedder = PatchEmbedder(in_channels * patch_size**2, hidden_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    self.final_layer = NerfFinalLayer(nerf_hidden_size, in_channels)
    self.blocks = nn.ModuleList(
      [FlattenDiTBlock(hidden_size, num_heads) for _ in range(num_cond_blocks)]
      + [
        NerfBlock(hidden_size, nerf_hidden_size, nerf_mlp_ratio)
        for _ in range(num_blocks - num_cond_blocks)
      ]
    )
    self.initialize_weights()

  def initialize_weights(self) -> None:
    """The official initialisation (facts file, section 4)."""
    w = self.s_embedder.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    nn.init.zeros_(self.s_embedder.proj.bias)
    nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
    nn.init.zeros_(self.final_layer.linear.weight)
    nn.init.zeros_(self.final_layer.linear.bias)

  def forward(self, x, t, y, return_block_tokens: int | None = None):
    b, c, h, w = x.shape
    p = self.patch_size
    gh, gw = h // p, w // p
    tokens = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # (B, L, C*p*p)
    s = self.s_embedder(tokens)
    temb = self.t_embedder(t)[:, None]
    c_vec = F.silu(temb + self.y_embedder(y)[:, None])
    cis = rope_2d(gh, gw, s.shape[-1] // self.num_heads, device=x.device)
    feat = None
    for i in range(self.num_cond_blocks):
      s = self.blocks[i](s, c_vec, cis)
      if return_block_tokens == i + 1:
        feat = s
    s = F.silu(temb + s)
    n = b * gh * gw
    s = s.reshape(n, -1)
    pix = tokens.reshape(n, c, p * p).transpose(1, 2)  # (N, P, C)
    xe = self.x_embedder(pix)
    for block in self.blocks[self.num_cond_blocks :]:
      xe = block(xe, s)
    out = self.final_layer(xe)  # (N, P, C)
    out = out.transpose(1, 2).reshape(b, gh * gw, c * p * p).transpose(1, 2)
    out = F.fold(out, output_size=(h, w), kernel_size=p, stride=p)
    if return_block_tokens is None:
      return out
    return out, feat


def randomize_(model: nn.Module, seed: int = 0, scale: float = 1.0) -> nn.Module:
  """Gives every parameter random non-zero values (parity tests must not hide behind zeros).

  Linear weights get U(-1, 1)/sqrt(fan_in) * scale, biases and 1-D tensors N(mean, 0.1) around
  their usual value (1 for norm scales, 0 otherwise), the class table N(0, 1).
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("norm.weight") or ".norm1." in name or ".norm2." in name or "_norm." in name:
        param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
      elif param.ndim == 1:
        param.copy_(0.1 * torch.randn(param.shape, generator=gen))
      elif "embedding_table" in name:
        param.copy_(torch.randn(param.shape, generator=gen))
      else:
        fan_in = param.shape[1]
        u = torch.rand(param.shape, generator=gen) * 2 - 1
        param.copy_(u * scale / math.sqrt(fan_in))
  return model
