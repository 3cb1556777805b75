"""PixNerd-T2I in Flax against PyTorch: our reference (always) and the official module (when
FLOWSEG_PIXNERD_SRC points at a checkout of MCG-NJU/PixNerd); converter checks and round trips.

Tolerance: max abs error <= 1e-4 in float32. Outputs reach magnitude ~5-10 with these random
weights; float32 PyTorch itself deviates from a float64 run by ~1e-5 there (relative ~1e-6), so a
correct port sits well inside the bound and any wrong layout or formula lands far outside it.
"""

import importlib
import math
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flowseg_jax.convert import pixnerd_t2i as convert  # noqa: E402
from flowseg_jax.models import pixnerd_t2i  # noqa: E402
from tests.torch_reference import pixnerd_t2i as ref  # noqa: E402

TOL = 1e-4
# Small enough for 2 CPU cores, large enough to exercise everything: 2 heads of 32 channels,
# non-square 4x6 token grid (the swapped RoPE extents), 2 text blocks, decoder ratio 2.
ARCH = dict(pixnerd_t2i.VARIANTS["tiny"], num_text_blocks=2)


def _inputs(b=2, h=16, w=24, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, size=(b, h, w, 3)).astype(np.float32)
  t = rng.uniform(0, 1, size=(b,)).astype(np.float32)
  text = rng.standard_normal((b, ARCH["text_length"], ARCH["text_dim"])).astype(np.float32)
  return x, t, text


def _torch_out(module, x, t, text):
  with torch.no_grad():
    out = module(
      torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(text)
    )
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def reference():
  """Our torch reference with random weights, written as a Lightning-style checkpoint file."""
  torch.manual_seed(0)
  module = ref.randomize_(ref.PixNerdT2I(**ARCH), seed=1).eval()
  online = ref.randomize_(ref.PixNerdT2I(**ARCH), seed=2).eval()
  return module, online


@pytest.fixture(scope="module")
def apply():
  return jax.jit(lambda m, p, x, t, text: m.apply({"params": p}, x, t, text), static_argnums=0)


def _lightning_file(tmp_path, ema, online):
  sd = {f"ema_denoiser._orig_mod.{k}": v for k, v in ema.state_dict().items()}
  sd.update({f"denoiser.{k}": v for k, v in online.state_dict().items()})
  sd["diffusion_trainer.proj.0.0.weight"] = torch.zeros(3, 3)
  path = os.path.join(tmp_path, "model.ckpt")
  torch.save({"state_dict": sd, "global_step": 7, "epoch": 0}, path)
  return path


def test_parity_with_torch_reference_ema_and_online(reference, apply, tmp_path):
  ema, online = reference
  path = _lightning_file(tmp_path, ema, online)
  x, t, text = _inputs()
  for weights, module in (("ema", ema), ("online", online)):
    model, params = convert.load_torch_checkpoint(path, weights=weights)
    assert model.arch_config() == {**ARCH, "in_channels": 3}
    got = np.asarray(apply(model, params, x, t, text))
    want = _torch_out(module, x, t, text)
    assert np.abs(want).max() > 0.5
    print(f"reference PixNerd-T2I ({weights}): max |jax - torch| = {np.abs(got - want).max():.2e}")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_scanned_layout_and_round_trip(reference, apply):
  ema, _ = reference
  sd = {k: v.numpy() for k, v in ema.state_dict().items()}
  model, params = convert.from_state_dict(sd)
  back = convert.flax_to_torch(params, model)
  assert set(back) == set(convert.expected_torch_shapes(model))
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  scanned, sparams = convert.relayout(params, model, scan_blocks=True)
  assert sparams["encoder_blocks"]["attn"]["kv_y"]["kernel"].shape == (2, 64, 128)
  assert sparams["text_refine_blocks"]["mlp"]["w12"]["kernel"].shape == (2, 64, 512)
  assert sparams["decoder_blocks"]["norm"]["scale"].shape == (2, 16)
  x, t, text = _inputs(h=8, w=8)
  np.testing.assert_allclose(
    apply(scanned, sparams, x, t, text), apply(model, params, x, t, text), atol=1e-5
  )


def test_strict_checks_name_key_and_shapes(reference):
  ema, _ = reference
  sd = {k: v.numpy() for k, v in ema.state_dict().items()}
  model, _ = convert.from_state_dict(sd)
  bad = dict(sd)
  del bad["blocks.1.attn.kv_y.weight"]
  bad["blocks.0.mlp.w3.weight"] = np.zeros((64, 255), np.float32)
  bad["blocks.0.attn.extra"] = np.zeros(1, np.float32)
  with pytest.raises(ValueError) as e:
    convert.torch_to_flax(bad, model, source="x.ckpt")
  msg = str(e.value)
  assert "x.ckpt" in msg and "missing (1): blocks.1.attn.kv_y.weight" in msg
  assert "blocks.0.mlp.w3.weight: got (64, 255), expected (64, 256)" in msg
  assert "unexpected (1): blocks.0.attn.extra" in msg
  with pytest.raises(ValueError, match="'y_pos_embedding' is missing"):
    convert.from_state_dict({k: v for k, v in sd.items() if k != "y_pos_embedding"})
  with pytest.raises(ValueError, match="no 'ema_denoiser.\\*' tensors"):
    convert.from_state_dict({"state_dict": {f"denoiser.{k}": v for k, v in sd.items()}})
  with pytest.raises(ValueError, match="come from the checkpoint"):
    convert.from_state_dict(sd, hidden_size=32)


def test_released_variant_shapes_and_inference():
  model = pixnerd_t2i.make_model("released")
  shapes = convert.expected_torch_shapes(model)
  # Key counts: 14 global + 12 per encoder block + 3 per decoder block + 11 per text block.
  assert len(shapes) == 14 + 12 * 16 + 3 * 2 + 11 * 4
  assert shapes["y_pos_embedding"] == (1, 128, 1536)
  assert shapes["y_embedder.proj.weight"] == (1536, 2048)
  assert shapes["blocks.0.attn.kv_y.weight"] == (3072, 1536)
  assert shapes["blocks.0.mlp.w12.weight"] == (12288, 1536)
  assert shapes["blocks.17.param_generator1.0.weight"] == (16384, 1536)
  assert shapes["x_embedder.embedder.0.weight"] == (64, 67)
  assert shapes["final_layer.linear.weight"] == (3, 64)
  n = sum(math.prod(s) for s in shapes.values())
  assert 1.1e9 < n < 1.3e9, n  # "PixNerd-XXL/16, 1.2B" in the official README
  fake = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  assert convert.infer_model_config(fake) == model.arch_config()


def test_position_tables_follow_the_official_extents():
  cos, sin = pixnerd_t2i.image_rope_table(2, 3, 8)
  # Token 1*3 + 2: x = linspace(0, 2, 3)[2] = 2, y = linspace(0, 3, 2)[1] = 3.
  angles = np.array([2.0, 3.0, 0.02, 0.03])
  np.testing.assert_allclose(cos[5], np.cos(angles), rtol=1e-6)
  np.testing.assert_allclose(sin[5], np.sin(angles), rtol=1e-6)
  pos = pixnerd_t2i.decoder_position_features(4)
  assert pos.shape == (16, 64)
  # Pixel (ki=1, kj=3): x = 4, y = 4/3; features [cos(x w0), cos(y w0), cos(x w1), ...].
  w1 = 10000.0 ** (-4 / 128)
  np.testing.assert_allclose(pos[7, :4], np.cos([4.0, 4 / 3, 4 * w1, 4 / 3 * w1]), rtol=1e-5)


def test_init_and_input_validation(apply):
  model = pixnerd_t2i.make_model("tiny")
  x, t, text = _inputs(h=8, w=8)
  text = text[..., : model.text_dim]
  boxed = jax.jit(model.init)(jax.random.key(0), x, t, text)["params"]
  params = nn.unbox(boxed)
  assert np.all(np.asarray(apply(model, params, x, t, text)) == 0)  # zero final layer
  assert 0.8 < np.std(params["y_pos_embedding"]) < 1.2  # torch.randn
  assert boxed["blocks_0"]["attn"]["kv_y"]["kernel"].names == ("embed", "mlp")
  run = lambda **kw: model.apply({"params": params}, **{"x": x, "t": t, "text": text, **kw})
  with pytest.raises(ValueError, match=r"text must be \(B, text_length, text_dim\)"):
    run(text=text[:, :5])
  with pytest.raises(ValueError, match="not divisible by patch_size=4"):
    run(x=x[:, :6])
  with pytest.raises(ValueError, match="float features"):
    run(text=text.astype(np.int32))
  with pytest.raises(ValueError, match="Unknown PixNerd-T2I variant"):
    pixnerd_t2i.make_model("XXL")


# ----------------------------------------------------------------- the official module


def _official_module():
  src = os.environ.get("FLOWSEG_PIXNERD_SRC")
  if not src:
    pytest.skip("FLOWSEG_PIXNERD_SRC is not set (path of a MCG-NJU/PixNerd checkout)")
  if not os.path.isfile(os.path.join(src, "src/models/transformer/pixnerd_t2i.py")):
    pytest.fail(f"FLOWSEG_PIXNERD_SRC={src} has no src/models/transformer/pixnerd_t2i.py")
  sys.path.insert(0, src)
  try:
    return importlib.import_module("src.models.transformer.pixnerd_t2i")
  finally:
    sys.path.remove(src)


def test_parity_with_official_module(reference, apply):
  official = _official_module()
  ema, _ = reference
  net = official.PixNerDiT(
    in_channels=3,
    num_groups=ARCH["num_heads"],
    hidden_size=ARCH["hidden_size"],
    decoder_hidden_size=ARCH["decoder_hidden_size"],
    num_encoder_blocks=ARCH["num_encoder_blocks"],
    num_decoder_blocks=ARCH["num_decoder_blocks"],
    num_text_blocks=ARCH["num_text_blocks"],
    patch_size=ARCH["patch_size"],
    txt_embed_dim=ARCH["text_dim"],
    txt_max_length=ARCH["text_length"],
  ).eval()
  net.load_state_dict(ema.state_dict(), strict=True)  # same names and shapes as the official
  model, params = convert.from_state_dict({k: v.numpy() for k, v in net.state_dict().items()})
  for h, w in ((16, 24), (8, 8)):
    x, t, text = _inputs(h=h, w=w, seed=3)
    want = _torch_out(net, x, t, text)
    np.testing.assert_allclose(_torch_out(ema, x, t, text), want, atol=1e-5, rtol=0)
    got = np.asarray(apply(model, params, x, t, text))
    err = np.abs(got - want).max()
    print(f"official PixNerd-T2I {h}x{w}: max |jax - official| = {err:.2e}")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_remat_keeps_values_and_gradients(reference):
  ema, _ = reference
  model, params = convert.from_state_dict({k: v.numpy() for k, v in ema.state_dict().items()})
  model, params = convert.relayout(params, model, scan_blocks=True)
  x, t, text = _inputs(b=1, h=8, w=8)

  def loss(m, p):
    return jnp.mean(m.apply({"params": p}, x, t, text) ** 2)

  ref_val, ref_grad = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  remat = model.clone(remat_policy="full")
  val, grad = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
  np.testing.assert_allclose(val, ref_val, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert np.abs(grad["text_refine_blocks"]["attn"]["qkv"]["kernel"]).max() > 0


@pytest.mark.slow
def test_released_scanned_train_step_compiles():
  """The released configuration (1.17B parameters) compiles a bf16 training gradient at 256^2."""
  import time

  model = pixnerd_t2i.make_model(
    "released", scan_blocks=True, dtype=jnp.bfloat16, remat_policy="full"
  )
  params = pixnerd_t2i.abstract_params(model)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  text = jax.ShapeDtypeStruct((2, 128, 2048), jnp.float32)

  def loss(p, x, t, text):
    return jnp.mean(model.apply({"params": p}, x, t, text) ** 2)

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(params, x, t, text).compile()
  assert time.perf_counter() - start < 120
  assert compiled.memory_analysis() is not None
