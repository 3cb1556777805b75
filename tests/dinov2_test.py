"""DINOv2 teacher: torch-convention bicubic, flax-vs-PyTorch parity, converter, orbax export, CLI.

Parity runs a tiny ViT (D=64, depth 2, 4 heads, patch 14, 4x4 learned position grid) with random
non-trivial weights (every tensor N(0, 0.2^2), norm weights and LayerScale gammas around 1) in
float32 under `jax.default_matmul_precision("highest")`. Tolerance: 2e-5 absolute on outputs of
magnitude ~4 (measured max ~6e-6), i.e. float32 rounding accumulated over two blocks and the
LayerNorms; any structural error (wrong interpolation grid, layout, LayerScale, GELU variant)
shows up at 1e-3 or more.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flowseg_jax.convert import dinov2 as convert
from flowseg_jax.models import bicubic, dinov2
from tests.torch_reference import dinov2 as ref

ATOL = 2e-5
TINY = dict(patch_size=14, embed_dim=64, depth=2, num_heads=4, pretrain_img_size=56)
REG = dict(num_register_tokens=2, interpolate_offset=0.0, interpolate_antialias=True)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _nhwc(t):
  return t.permute(0, 2, 3, 1).numpy()


class _Pair:
  """A randomised torch reference, the converted flax model/params and a jitted apply."""

  def __init__(self, extra, seed):
    self.torch_model = ref.randomize_(ref.DinoViT(**TINY, **extra), seed=seed).eval()
    self.state_dict = self.torch_model.state_dict()
    config = convert.infer_dinov2_config(self.state_dict, num_heads=TINY["num_heads"])
    self.model = dinov2.DinoViT(**config)
    self.params = convert.dinov2_torch_to_flax(self.state_dict, self.model)
    self.apply = jax.jit(self.model.apply)

  def torch_out(self, x):
    with torch.no_grad():
      return {k: v.numpy() for k, v in self.torch_model.forward_features(_nchw(x)).items()}

  def jax_out(self, x):
    with jax.default_matmul_precision("highest"):
      return jax.tree.map(np.asarray, self.apply({"params": self.params}, jnp.asarray(x)))


@pytest.fixture(scope="module")
def pair():
  return _Pair({}, seed=1)


@pytest.fixture(scope="module")
def reg_pair():
  return _Pair(REG, seed=2)


# --- bicubic -----------------------------------------------------------------------------------


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize(
  "in_hw,out_hw",
  [
    ((7, 9), (13, 5)),
    ((16, 16), (7, 7)),
    ((5, 6), (11, 17)),
    ((37, 37), (16, 16)),
    ((32, 48), (28, 42)),
  ],
)
def test_bicubic_matches_torch_size(in_hw, out_hw, antialias):
  x = np.random.default_rng(0).standard_normal((2, *in_hw, 3)).astype(np.float32)
  want = F.interpolate(
    _nchw(x), size=out_hw, mode="bicubic", align_corners=False, antialias=antialias
  )
  got = bicubic.resize_bicubic_torch(jnp.asarray(x), out_hw, antialias=antialias)
  assert got.shape == (2, *out_hw, 3)
  np.testing.assert_allclose(np.asarray(got), _nhwc(want), atol=1e-5, rtol=0)


@pytest.mark.parametrize("m,g", [(4, (3, 4)), (4, (8, 6)), (37, (16, 16)), (37, (37, 20))])
def test_bicubic_matches_torch_scale_factor(m, g):
  # The DINOv2 pos-embed convention: scale_factor (g + 0.1) / M, output floor(M * s) = g.
  x = np.random.default_rng(1).standard_normal((1, m, m, 5)).astype(np.float32)
  scale = (float(g[0] + 0.1) / m, float(g[1] + 0.1) / m)
  want = F.interpolate(_nchw(x), scale_factor=scale, mode="bicubic", align_corners=False)
  got = bicubic.resize_bicubic_torch(jnp.asarray(x), scale_factor=scale)
  assert got.shape == (1, *g, 5)
  np.testing.assert_allclose(np.asarray(got), _nhwc(want), atol=1e-5, rtol=0)
  # The scale-factor convention is not the same as resizing to the rounded size.
  by_size = bicubic.resize_bicubic_torch(jnp.asarray(x), g)
  assert np.abs(np.asarray(by_size) - _nhwc(want)).max() > 1e-2


def test_bicubic_weights_properties():
  w = bicubic.bicubic_resize_weights(8, 8)  # same size: identity
  np.testing.assert_allclose(w, np.eye(8), atol=1e-6)
  for antialias in (False, True):
    for n_in, n_out in ((10, 3), (3, 10)):
      w = bicubic.bicubic_resize_weights(n_in, n_out, antialias=antialias)
      np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
  # jax.image.resize's bicubic is a different kernel: it must not be used for torch parity.
  x = np.random.default_rng(2).standard_normal((1, 16, 16, 1)).astype(np.float32)
  want = F.interpolate(_nchw(x), size=(7, 7), mode="bicubic", align_corners=False)
  jax_resized = jax.image.resize(jnp.asarray(x), (1, 7, 7, 1), "bicubic")
  assert np.abs(np.asarray(jax_resized) - _nhwc(want)).max() > 1e-2


def test_resize_bad_arguments():
  x = jnp.zeros((1, 4, 4, 3))
  with pytest.raises(ValueError, match="exactly one"):
    bicubic.resize_bicubic_torch(x)
  with pytest.raises(ValueError, match="exactly one"):
    bicubic.resize_bicubic_torch(x, (2, 2), scale_factor=(0.5, 0.5))
  with pytest.raises(ValueError, match="positive"):
    bicubic.bicubic_resize_weights(0, 3)


# --- model parity --------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "hw",
  [
    (56, 56),  # the pretraining grid: no interpolation
    (28, 28),  # square, smaller: interpolation (downsampling)
    (42, 56),  # non-square, one side equal to the grid: still interpolated (offset convention)
    (84, 70),  # upsampling, non-square
  ],
)
def test_parity_with_torch(pair, hw):
  x = np.random.default_rng(hw[0] * 100 + hw[1]).standard_normal((2, *hw, 3)).astype(np.float32)
  want, got = pair.torch_out(x), pair.jax_out(x)
  n = (hw[0] // 14) * (hw[1] // 14)
  assert got["x_norm_patchtokens"].shape == (2, n, 64)
  assert got["x_norm_clstoken"].shape == (2, 64)
  for key in ("x_norm_patchtokens", "x_norm_clstoken"):
    np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=0, err_msg=key)
  np.testing.assert_allclose(got["x_prenorm"], want["x_prenorm"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("hw", [(56, 56), (42, 70)])
def test_parity_with_registers_and_antialias(reg_pair, hw):
  x = np.random.default_rng(7).standard_normal((1, *hw, 3)).astype(np.float32)
  want, got = reg_pair.torch_out(x), reg_pair.jax_out(x)
  assert got["x_norm_regtokens"].shape == (1, 2, 64)
  for key in ("x_norm_patchtokens", "x_norm_clstoken", "x_norm_regtokens"):
    np.testing.assert_allclose(got[key], want[key], atol=ATOL, rtol=0, err_msg=key)


def test_pos_encoding_interpolation_matches_torch(pair):
  pos = pair.params["pos_embed"]
  for h, w in ((28, 28), (42, 56), (56, 84), (56, 56)):
    n = (h // 14) * (w // 14) + 1
    with torch.no_grad():
      want = pair.torch_model.interpolate_pos_encoding(n, h, w).numpy()
    got = np.asarray(pair.model.interpolate_pos_encoding(pos, h, w))
    assert got.shape == want.shape == (1, n, 64)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  # A model that resized by output size (offset 0) would not match the official 0.1 convention.
  size_based = dinov2.DinoViT(**{**pair.model.arch_config, "interpolate_offset": 0.0})
  with torch.no_grad():
    want = pair.torch_model.interpolate_pos_encoding(13, 42, 56).numpy()
  assert np.abs(np.asarray(size_based.interpolate_pos_encoding(pos, 42, 56)) - want).max() > 1e-3


def test_parity_detects_wrong_weights(pair):
  # Sanity check that the parity test has teeth: perturb one LayerScale gamma.
  x = np.random.default_rng(3).standard_normal((1, 28, 28, 3)).astype(np.float32)
  params = jax.tree.map(lambda a: a, pair.params)
  params["blocks_1"]["ls2"]["gamma"] = params["blocks_1"]["ls2"]["gamma"] * 1.01
  with jax.default_matmul_precision("highest"):
    got = np.asarray(pair.apply({"params": params}, jnp.asarray(x))["x_norm_patchtokens"])
  assert np.abs(got - pair.torch_out(x)["x_norm_patchtokens"]).max() > 10 * ATOL


def test_bad_input_shapes(pair):
  with pytest.raises(ValueError, match="multiples of the patch size 14"):
    pair.model.apply({"params": pair.params}, jnp.zeros((1, 30, 28, 3)))
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    pair.model.apply({"params": pair.params}, jnp.zeros((1, 28, 28, 4)))


def test_bf16_compute_close(pair):
  x = np.random.default_rng(4).standard_normal((1, 28, 28, 3)).astype(np.float32)
  model = pair.model.clone(dtype=jnp.bfloat16)
  out = model.apply({"params": pair.params}, jnp.asarray(x))["x_norm_patchtokens"]
  assert out.dtype == jnp.bfloat16
  want = pair.torch_out(x)["x_norm_patchtokens"]
  assert np.abs(np.asarray(out, np.float32) - want).max() < 0.25


# --- parameter counts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "variant,torch_count",
  # Official counts with mask_token: ViT-S/14 22,056,576; ViT-B/14 86,580,480; ViT-L/14 304,368,640.
  [("S/14", 22_056_576), ("B/14", 86_580_480), ("L/14", 304_368_640)],
)
def test_param_count_matches_official(variant, torch_count):
  cfg = dinov2.VARIANTS[variant]
  with torch.device("meta"):
    torch_model = ref.DinoViT(**cfg)
  assert sum(p.numel() for p in torch_model.parameters()) == torch_count
  model = dinov2.make_model(variant)
  # The flax model has no mask_token (embed_dim scalars).
  assert dinov2.count_params(dinov2.abstract_params(model)) == torch_count - cfg["embed_dim"]
  # Names and shapes agree with the torch reference's state dict.
  want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items() if k != "mask_token"}
  assert convert.expected_torch_shapes(model) == want


# --- converter -----------------------------------------------------------------------------------


def test_infer_config(pair, reg_pair):
  cfg = convert.infer_dinov2_config(pair.state_dict)
  assert cfg == dict(
    patch_size=14,
    embed_dim=64,
    depth=2,
    num_heads=1,  # head_dim 64 assumed unless told
    mlp_ratio=4.0,
    num_register_tokens=0,
    pretrain_img_size=56,
    layerscale=True,
    interpolate_offset=0.1,
    interpolate_antialias=False,
  )
  reg = convert.infer_dinov2_config(reg_pair.state_dict, num_heads=4)
  assert (reg["num_register_tokens"], reg["interpolate_offset"], reg["interpolate_antialias"]) == (
    2,
    0.0,
    True,
  )


def test_round_trip_and_mask_token_ignored(pair):
  sd = pair.state_dict
  assert "mask_token" in sd
  back = convert.dinov2_flax_to_torch(pair.params, pair.model)
  assert set(back) == set(sd) - {"mask_token"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)


def test_converter_errors_name_every_bad_key(pair):
  sd = dict(pair.state_dict)
  del sd["blocks.1.ls2.gamma"]
  sd["blocks.0.attn.qkv.weight"] = torch.zeros(64, 64)
  sd["head.weight"] = torch.zeros(3)
  with pytest.raises(ValueError) as err:
    convert.dinov2_torch_to_flax(sd, pair.model)
  msg = str(err.value)
  assert "missing (1): blocks.1.ls2.gamma" in msg
  assert "unexpected (1): head.weight" in msg
  assert "blocks.0.attn.qkv.weight: checkpoint (64, 64) vs expected (192, 64)" in msg
  with pytest.raises(ValueError, match="Not an official DINOv2 state dict"):
    convert.infer_dinov2_config({"embeddings.cls_token": np.zeros((1, 1, 8))})
  chunked = {**pair.state_dict, "blocks.0.1.norm1.weight": torch.zeros(64)}
  with pytest.raises(ValueError, match="Chunked"):
    convert.infer_dinov2_config(chunked)


@pytest.fixture(scope="module")
def saved_checkpoints(pair, tmp_path_factory):
  from safetensors.torch import save_file

  root = tmp_path_factory.mktemp("dinov2")
  pth, st = root / "tiny.pth", root / "tiny.safetensors"
  torch.save(pair.state_dict, pth)
  save_file({k: v.contiguous() for k, v in pair.state_dict.items()}, st)
  return root, pth, st


def test_load_torch_files(pair, saved_checkpoints):
  _, pth, st = saved_checkpoints
  for path in (pth, st):
    model, params = convert.load_dinov2_torch(path, num_heads=4)
    assert model == pair.model
    jax.tree.map(np.testing.assert_array_equal, params, pair.params)
  with pytest.raises(FileNotFoundError):
    convert.load_dinov2_torch(pth.parent / "nope.pth")


def test_cli_and_orbax_round_trip(pair, saved_checkpoints, capsys):
  root, pth, _ = saved_checkpoints
  out = root / "export"
  assert convert.cli(["--ckpt", str(pth), "--out", str(out), "--num_heads", "4"]) == 0
  assert "parameters" in capsys.readouterr().out
  model, params = convert.load_orbax(out)
  assert model == pair.model
  jax.tree.map(np.testing.assert_array_equal, params, pair.params)
  # Restored straight into a replicated sharding over the (8 fake CPU devices) mesh.
  mesh = jax.make_mesh((jax.device_count(),), ("data",), (jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  _, params = convert.load_orbax(out, sharding=replicated)
  assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(params))
  jax.tree.map(np.testing.assert_array_equal, params, pair.params)
  with pytest.raises(ValueError):  # exists already
    convert.cli(["--ckpt", str(pth), "--out", str(out), "--num_heads", "4"])
  assert (
    convert.cli(["--ckpt", str(pth), "--out", str(out), "--num_heads", "4", "--overwrite"]) == 0
  )
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.load_orbax(root)


def test_hub_param_count_arithmetic():
  # Independent arithmetic check of the ViT-B/14 count used above.
  d, p, m, depth = 768, 14, 37, 12
  block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) * 2 - 3 * d
  total = d * 3 * p * p + d + d + (m * m + 1) * d + depth * block + 2 * d
  assert total == 86_579_712 == 86_580_480 - d
  assert math.isclose(total / 1e6, 86.58, abs_tol=0.01)
