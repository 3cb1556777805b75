"""Tests of the Flax PixNerDiT: shapes, layers against hand-computed values, initialisation,
logical axes, scan / remat / bf16 equivalences, REPA tokens, input validation, XL size."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowseg_jax.convert import pixnerd as convert
from flowseg_jax.models import layers, nerf, pixnerd

TINY = pixnerd.VARIANTS["tiny/4"]


def _inputs(b=2, h=16, w=32, seed=0, num_classes=10):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, size=(b, h, w, 3)).astype(np.float32)
  t = rng.uniform(0, 1, size=(b,)).astype(np.float32)
  y = np.arange(b) % (num_classes + 1)
  y[-1] = num_classes  # the null class
  return x, t, y.astype(np.int32)


def _randomize(params, seed=0):
  """Random non-zero weights (so outputs are not identically zero), same tree structure."""
  rng = np.random.default_rng(seed)

  def draw(a):
    a = np.asarray(a)
    if a.ndim == 1 and np.all(a == 1):  # norm scales
      return (1 + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    fan_in = a.shape[-2] if a.ndim >= 2 else 10
    return (rng.standard_normal(a.shape) / math.sqrt(fan_in)).astype(np.float32)

  return jax.tree.map(draw, params)


@pytest.fixture(scope="module")
def tiny():
  """Unscanned tiny/4 model with random weights, and a jitted apply."""
  model = pixnerd.make_model("tiny/4")
  x, t, y = _inputs()
  boxed = jax.jit(model.init)(jax.random.key(0), x, t, y)["params"]
  params = _randomize(nn.unbox(boxed))
  apply = jax.jit(
    lambda m, p, x, t, y, k: m.apply({"params": p}, x, t, y, return_block_tokens=k),
    static_argnums=(0, 5),
  )
  return model, boxed, params, apply


# ---------------------------------------------------------------- layers, hand-computed values


def test_rope_table_positions_and_interleaving():
  cos, sin = layers.rope_2d_table(2, 3, 8)
  assert cos.shape == sin.shape == (6, 4) and cos.dtype == np.float32
  # Token l = 1*3 + 1 sits at x = linspace(0,16,3)[1] = 8, y = linspace(0,16,2)[1] = 16;
  # frequencies 1 and 10000^-0.5; pairs are [x w0, y w0, x w1, y w1].
  angles = np.array([8.0, 16.0, 0.08, 0.16])
  np.testing.assert_allclose(cos[4], np.cos(angles), rtol=1e-6)
  np.testing.assert_allclose(sin[4], np.sin(angles), rtol=1e-6)
  # A single token row or column sits at position 0.
  cos1, _ = layers.rope_2d_table(1, 1, 8)
  np.testing.assert_array_equal(cos1, np.ones((1, 4), np.float32))
  with pytest.raises(ValueError, match="head_dim % 4"):
    layers.rope_2d_table(2, 2, 6)


def test_apply_rope_rotates_adjacent_pairs():
  x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0).at[..., 3].set(2.0)  # pairs (1,0), (0,2)
  theta = np.array([[0.3, 1.1]], np.float32)
  out = np.asarray(layers.apply_rope(x, np.cos(theta), np.sin(theta)))[0, 0, 0]
  np.testing.assert_allclose(
    out, [np.cos(0.3), np.sin(0.3), -2 * np.sin(1.1), 2 * np.cos(1.1)], rtol=1e-6
  )


def test_timestep_features_max_period_10_cos_first():
  f = np.asarray(layers.timestep_features(jnp.array([1.0, 0.5])))
  assert f.shape == (2, 256)
  np.testing.assert_allclose(f[0, 0], np.cos(1.0), rtol=1e-6)
  np.testing.assert_allclose(f[0, 127], np.cos(10 ** (-127 / 128)), rtol=1e-6)
  np.testing.assert_allclose(f[1, 128 + 64], np.sin(0.5 * 10**-0.5), rtol=1e-5)


def test_dct_features_non_integer_frequencies_x_major():
  d = nerf.dct_features(2)
  assert d.shape == (4, 64)
  # Pixel n = 1 is (ki=0, kj=1): pos_x = 1, pos_y = 0. Feature a*8+b pairs phi_a with x.
  phi = np.linspace(0, 8, 8)
  np.testing.assert_allclose(d[1, 1 * 8 + 2], np.cos(np.pi * phi[1]) / (1 + phi[1] * phi[2]), 1e-6)
  np.testing.assert_allclose(d[2, 1 * 8 + 2], np.cos(np.pi * phi[2]) / (1 + phi[1] * phi[2]), 1e-6)


def test_rmsnorm_value_and_swiglu_width():
  x = jnp.array([[3.0, 4.0]])
  out, _ = layers.RMSNorm().init_with_output(jax.random.key(0), x)
  np.testing.assert_allclose(out, x / np.sqrt(12.5 + 1e-6), rtol=1e-6)
  assert [layers.swiglu_hidden_width(d) for d in (1152, 1024, 128, 64)] == [3072, 2730, 341, 170]


def test_pixel_embedder_is_a_dense_over_pixels_and_positions():
  """Same parameters, values and gradients as nn.Dense over concat(pixels, positions) broadcast to
  every patch (what the official model computes). Float32 sums in another order: 1e-6."""
  rng = np.random.default_rng(0)
  pixels = rng.uniform(-1, 1, (6, 16, 3)).astype(np.float32)
  positions = nerf.dct_features(4)
  emb = nerf.PixelEmbedder(8)
  params = nn.unbox(emb.init(jax.random.key(0), pixels, positions)["params"])
  assert {k: v.shape for k, v in params.items()} == {"kernel": (67, 8), "bias": (8,)}
  params = _randomize(params, seed=1)
  dense = nn.Dense(8)

  def ours(p, x):
    return emb.apply({"params": p}, x, positions)

  def concat(p, x):
    xin = jnp.concatenate([x, jnp.broadcast_to(positions, (x.shape[0], 16, 64))], axis=-1)
    return dense.apply({"params": p}, xin)

  np.testing.assert_allclose(ours(params, pixels), concat(params, pixels), rtol=1e-6, atol=1e-6)
  cot = rng.standard_normal((6, 16, 8)).astype(np.float32)
  for argnum in (0, 1):
    g_ours = jax.vjp(ours, params, pixels)[1](cot)[argnum]
    g_ref = jax.vjp(concat, params, pixels)[1](cot)[argnum]
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- model


def test_shapes_dtypes_and_block_tokens(tiny):
  model, _, params, apply = tiny
  for h, w in ((16, 32), (8, 4)):
    x, t, y = _inputs(h=h, w=w)
    out = apply(model, params, x, t, y, None)
    assert out.shape == (2, h, w, 3) and out.dtype == jnp.float32
    assert np.all(np.isfinite(out)) and np.abs(out).max() > 0
  x, t, y = _inputs()
  out, tokens = apply(model, params, x, t, y, 2)
  assert tokens.shape == (2, (16 // 4) * (32 // 4), 64)


def test_init_follows_official_scheme(tiny):
  model, boxed, _, apply = tiny
  p = nn.unbox(boxed)
  x, t, y = _inputs()
  # Zero-initialised final layer: the untrained model outputs exactly 0.
  assert np.all(np.asarray(apply(model, p, x, t, y, 2)[0]) == 0)
  blk = p["blocks_0"]
  np.testing.assert_array_equal(blk["norm1"]["scale"], np.ones(64))
  np.testing.assert_array_equal(blk["attn"]["q_norm"]["scale"], np.ones(32))
  assert 0.015 < np.std(p["y_embedder"]["embedding_table"]["embedding"]) < 0.025
  assert 0.018 < np.std(p["t_embedder"]["mlp_0"]["kernel"]) < 0.022
  np.testing.assert_array_equal(p["s_embedder"]["bias"], 0)
  bound = math.sqrt(6 / (48 + 64))  # Xavier-uniform on the patch embedding
  assert 0.9 * bound < np.abs(p["s_embedder"]["kernel"]).max() <= bound
  # PyTorch Linear defaults elsewhere (adaLN, proj, param generator are NOT zero-initialised).
  for arr, fan_in in (
    (blk["adaLN_modulation"]["kernel"], 64),
    (blk["adaLN_modulation"]["bias"], 64),
    (blk["attn"]["proj"]["kernel"], 64),
    (p["blocks_3"]["param_generator1"]["kernel"], 64),
    (p["t_embedder"]["mlp_0"]["bias"], 256),
    (p["x_embedder"]["kernel"], 67),
  ):
    assert 0.8 / math.sqrt(fan_in) < np.abs(arr).max() <= 1 / math.sqrt(fan_in)


def test_logical_axis_names(tiny):
  _, boxed, _, _ = tiny
  is_box = lambda a: isinstance(a, nn.LogicallyPartitioned)
  assert all(is_box(a) for a in jax.tree.leaves(boxed, is_leaf=is_box))
  blk = boxed["blocks_1"]
  assert blk["attn"]["qkv"]["kernel"].names == ("embed", "mlp")
  assert blk["attn"]["proj"]["kernel"].names == ("mlp", "embed")
  assert blk["mlp"]["w2"]["kernel"].names == ("mlp", "embed")
  assert blk["adaLN_modulation"]["bias"].names == ("mlp",)
  assert blk["norm2"]["scale"].names == ("norm",)
  assert boxed["y_embedder"]["embedding_table"]["embedding"].names == ("vocab", "embed")
  scanned = pixnerd.make_model("tiny/4", scan_blocks=True)
  sboxed = jax.eval_shape(scanned.init, jax.random.key(0), *_inputs())["params"]
  assert sboxed["cond_blocks"]["attn"]["qkv"]["kernel"].names == ("layers", "embed", "mlp")
  assert sboxed["nerf_blocks"]["param_generator1"]["kernel"].names == ("layers", "embed", "mlp")
  assert sboxed["cond_blocks"]["attn"]["qkv"]["kernel"].value.shape == (3, 64, 192)


def test_xl_parameter_count_matches_official():
  assert pixnerd.count_params(pixnerd.abstract_params(pixnerd.make_model("XL/16"))) == 700_589_219
  assert pixnerd.count_params(pixnerd.abstract_params(pixnerd.make_model("L/16"))) == 452_113_795


def test_scanned_equals_unscanned_and_tokens(tiny):
  model, _, params, apply = tiny
  x, t, y = _inputs()
  scanned, sparams = convert.relayout(params, model, scan_blocks=True)
  assert sparams["cond_blocks"]["norm1"]["scale"].shape == (3, 64)
  out, tok = apply(model, params, x, t, y, 2)
  sout, stok = apply(scanned, sparams, x, t, y, 2)
  np.testing.assert_allclose(sout, out, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(stok, tok, atol=1e-5, rtol=1e-5)


def test_block_token_gradients_stop_at_block_k(tiny):
  """REPA's loss on block-k tokens reaches blocks < k only (scanned capture via where)."""
  model, _, params, _ = tiny
  scanned, sparams = convert.relayout(params, model, scan_blocks=True)
  x, t, y = _inputs()

  def feat_loss(p):
    _, tok = scanned.apply({"params": p}, x, t, y, return_block_tokens=2)
    return jnp.sum(tok**2)

  g = jax.jit(jax.grad(feat_loss))(sparams)["cond_blocks"]["mlp"]["w1"]["kernel"]
  norms = np.linalg.norm(np.asarray(g).reshape(3, -1), axis=1)
  assert norms[0] > 0 and norms[1] > 0 and norms[2] == 0


def test_remat_keeps_values_and_gradients(tiny):
  model, _, params, _ = tiny
  x, t, y = _inputs()

  def loss(m, p):
    return jnp.mean(m.apply({"params": p}, x, t, y) ** 2)

  ref = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  for policy in ("full", "dots_with_no_batch_dims_saveable"):
    remat = model.clone(remat_policy=policy)
    got = jax.jit(jax.value_and_grad(lambda p, m=remat: loss(m, p)))(params)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_compute_close_to_f32(tiny):
  """bf16 matmuls (8-bit mantissa) keep the output within 3% relative L2 of float32."""
  model, _, params, apply = tiny
  x, t, y = _inputs()
  ref = np.asarray(apply(model, params, x, t, y, None))
  out = apply(model.clone(dtype=jnp.bfloat16), params, x, t, y, None)
  assert out.dtype == jnp.float32
  rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
  assert 0 < rel < 0.03, rel


def test_attention_impl_xla_matches_default(tiny):
  model, _, params, apply = tiny
  x, t, y = _inputs()
  np.testing.assert_allclose(
    apply(model.clone(attention_impl="xla"), params, x, t, y, None),
    apply(model, params, x, t, y, None),
    atol=1e-6,
  )


def test_input_validation(tiny):
  model, _, params, _ = tiny
  x, t, y = _inputs()
  run = lambda m=model, **kw: m.apply({"params": params}, **{"x": x, "t": t, "y": y, **kw})
  with pytest.raises(ValueError, match="not divisible by patch_size=4"):
    run(x=x[:, :14])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
    run(y=np.array([0, 11], np.int32))
  with pytest.raises(ValueError, match=r"labels must lie"):
    run(y=np.array([-1, 0], np.int32))
  with pytest.raises(ValueError, match="integer class ids"):
    run(y=np.array([0.0, 1.0], np.float32))
  with pytest.raises(ValueError, match="return_block_tokens=4"):
    run(return_block_tokens=4)
  with pytest.raises(ValueError, match="multiple of 4"):
    run(pixnerd.make_model("tiny/4", hidden_size=36))
  with pytest.raises(ValueError, match="remat_policy='bogus'"):
    run(model.clone(remat_policy="bogus"))
  with pytest.raises(ValueError, match="attention_impl"):
    run(model.clone(attention_impl="flash"))
  with pytest.raises(ValueError, match="Unknown PixNerd variant"):
    pixnerd.make_model("XXL/2")


@pytest.mark.slow
def test_xl_scanned_train_step_compiles_in_seconds():
  import time

  model = pixnerd.make_model("XL/16", scan_blocks=True, dtype=jnp.bfloat16, remat_policy="full")
  params = pixnerd.abstract_params(model)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  y = jax.ShapeDtypeStruct((2,), jnp.int32)

  def loss(p, x, t, y):
    out, tok = model.apply({"params": p}, x, t, y, return_block_tokens=8)
    return jnp.mean(out**2) + jnp.mean(tok.astype(jnp.float32) ** 2)

  start = time.perf_counter()
  jax.jit(jax.grad(loss)).lower(params, x, t, y).compile()
  assert time.perf_counter() - start < 60
