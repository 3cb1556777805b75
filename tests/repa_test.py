"""REPA: teacher preprocessing, projector (and its PixNerd key mapping), cosine loss vs PyTorch."""

import json

import flax.linen as nn_linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowseg_jax import train_state, train_step
from flowseg_jax.convert import dinov2 as convert
from flowseg_jax.models import dinov2, repa
from tests.torch_reference import dinov2 as ref


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)


def _torch_projector(d, hidden, out, seed=0):
  """PixNerd's `REPATrainer.proj`: Sequential(Sequential(Linear, SiLU, Linear, SiLU, Linear))."""
  torch.manual_seed(seed)
  return nn.Sequential(
    nn.Sequential(
      nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out)
    )
  )


def _torch_cos_loss(src, dst):
  """PixNerd's loss on torch tensors, with its token truncation."""
  if dst.shape[1] != src.shape[1]:
    src = src[:, : dst.shape[1]]
  return (1 - F.cosine_similarity(src, dst, dim=-1)).mean()


@pytest.mark.parametrize("hw", [(32, 48), (64, 64), (48, 80)])
def test_preprocess_matches_pixnerd(hw):
  image = np.random.default_rng(0).uniform(-1, 1, (2, *hw, 3)).astype(np.float32)
  want = ref.dinov2_preprocess(_nchw((image + 1) / 2)).permute(0, 2, 3, 1).numpy()
  got = np.asarray(repa.preprocess_for_teacher(jnp.asarray(image)))
  assert got.shape == want.shape == (2, hw[0] * 14 // 16, hw[1] * 14 // 16, 3)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
  # Normalise-then-resize is the official order; a model that resized first would still be close
  # for a linear resize, so check the constants instead: mean colour maps to zero.
  grey = np.broadcast_to(np.asarray(repa.IMAGENET_MEAN, np.float32) * 2 - 1, (1, 16, 16, 3))
  np.testing.assert_allclose(repa.preprocess_for_teacher(jnp.asarray(grey)), 0.0, atol=1e-6)


def test_teacher_input_size():
  assert repa.teacher_input_size(256, 256) == (224, 224)
  assert repa.teacher_input_size(512, 384) == (448, 336)
  assert repa.teacher_input_size(100, 30) == (87, 26)  # int() truncation, as PixNerd
  with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
    repa.preprocess_for_teacher(jnp.zeros((2, 16, 16)))


def test_teacher_tokens_match_pixnerd_pipeline():
  torch_model = ref.randomize_(
    ref.DinoViT(patch_size=14, embed_dim=32, depth=1, num_heads=2, pretrain_img_size=28), seed=3
  ).eval()
  model = dinov2.make_model("tiny/14")
  params = convert.dinov2_torch_to_flax(torch_model.state_dict(), model)
  image = np.random.default_rng(1).uniform(-1, 1, (2, 32, 48, 3)).astype(np.float32)
  with torch.no_grad():
    want = torch_model.forward_features(ref.dinov2_preprocess(_nchw((image + 1) / 2)))
  with jax.default_matmul_precision("highest"):
    got = repa.teacher_tokens(model, params, jnp.asarray(image))
  assert got.shape == (2, 2 * 3, 32) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want["x_norm_patchtokens"].numpy(), atol=2e-5)
  # No gradient reaches the teacher parameters or the image.
  grads = jax.grad(lambda p, x: repa.teacher_tokens(model, p, x).sum(), argnums=(0, 1))(
    params, jnp.asarray(image)
  )
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_projector_matches_torch_and_round_trips():
  d, hidden, out = 24, 40, 16
  torch_proj = _torch_projector(d, hidden, out)
  sd = {f"diffusion_trainer.proj.{k}": v for k, v in torch_proj.state_dict().items()}
  assert set(sd) == {
    f"diffusion_trainer.proj.0.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")
  }
  sd["denoiser.unrelated.weight"] = torch.zeros(3)  # the rest of a PixNerd checkpoint is ignored
  params = convert.projector_from_torch({"state_dict": sd})
  module = repa.Projector(hidden_dim=hidden, out_dim=out)
  x = np.random.default_rng(0).standard_normal((2, 5, d)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = module.apply({"params": params}, jnp.asarray(x))
  with torch.no_grad():
    want = torch_proj(torch.from_numpy(x)).numpy()
  assert got.shape == (2, 5, out)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  back = convert.projector_to_torch(params)
  assert set(back) == set(sd) - {"denoiser.unrelated.weight"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k].numpy(), err_msg=k)
  # Freshly initialised params have the same names/shapes as the converted ones.
  init = nn_linen.unbox(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, d))))
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert shapes(init["params"]) == shapes(params)


def test_projector_init_is_torch_default():
  module = repa.Projector(hidden_dim=256, out_dim=8)
  params = nn_linen.unbox(module.init(jax.random.key(0), jnp.zeros((1, 64))))["params"]
  k0, b0 = np.asarray(params["layers_0"]["kernel"]), np.asarray(params["layers_0"]["bias"])
  bound = 1 / np.sqrt(64)
  assert k0.shape == (64, 256) and np.abs(k0).max() <= bound and np.abs(k0).max() > 0.9 * bound
  assert np.abs(b0).max() <= bound and np.abs(b0).max() > 0.9 * bound
  b4 = np.asarray(params["layers_4"]["bias"])
  assert np.abs(b4).max() <= 1 / 16 and np.abs(b4).max() > 0.5 / 16  # fan_in = 256


def test_projector_conversion_errors():
  torch_proj = _torch_projector(8, 8, 4)
  sd = {f"proj.{k}": v for k, v in torch_proj.state_dict().items()}
  with pytest.raises(ValueError, match=r"missing keys \['diffusion_trainer.proj.0.0.weight'"):
    convert.projector_from_torch(sd)
  convert.projector_from_torch(sd, prefix="proj.0.")  # custom prefix works
  sd["proj.0.2.weight"] = torch.zeros(8, 5)
  with pytest.raises(ValueError, match=r"proj.0.2.weight: input width 5 != previous output 8"):
    convert.projector_from_torch(sd, prefix="proj.0.")


def test_repa_loss_matches_torch_with_truncation():
  rng = np.random.default_rng(0)
  src = rng.standard_normal((3, 10, 16)).astype(np.float32)
  dst = rng.standard_normal((3, 7, 16)).astype(np.float32)
  want = _torch_cos_loss(torch.from_numpy(src), torch.from_numpy(dst)).item()
  got = float(repa.repa_loss(jnp.asarray(src), jnp.asarray(dst)))
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Truncation keeps the *first* N tokens.
  shifted = np.concatenate([src[:, 3:], src[:, :3]], axis=1)
  assert abs(float(repa.repa_loss(jnp.asarray(shifted), jnp.asarray(dst))) - want) > 1e-3
  # Identical and opposite features: loss 0 and 2.
  np.testing.assert_allclose(
    float(repa.repa_loss(jnp.asarray(dst), jnp.asarray(dst))), 0, atol=1e-6
  )
  np.testing.assert_allclose(
    float(repa.repa_loss(-jnp.asarray(dst), jnp.asarray(dst))), 2, atol=1e-6
  )


def test_repa_loss_zero_and_tiny_vectors_match_torch():
  rng = np.random.default_rng(1)
  src = rng.standard_normal((2, 4, 8)).astype(np.float32)
  dst = rng.standard_normal((2, 4, 8)).astype(np.float32)
  src[0, 1] = 0.0  # zero projected vector
  dst[1, 2] = 0.0  # zero teacher vector
  src[1, 3] = 1e-5  # both tiny (norm ~3e-5 > eps): torch 2.x clamps each norm separately...
  dst[1, 3] = 1e-5
  src[0, 0] = 1e-10  # ...and below eps the clamp is active (norm 2.8e-10 < 1e-8)
  t_src, t_dst = torch.from_numpy(src), torch.from_numpy(dst)
  want_cos = F.cosine_similarity(t_src, t_dst, dim=-1).numpy()
  got_cos = np.asarray(repa.cosine_similarity(jnp.asarray(src), jnp.asarray(dst)))
  np.testing.assert_allclose(got_cos, want_cos, atol=1e-6)
  assert got_cos[0, 1] == 0.0 and got_cos[1, 2] == 0.0
  np.testing.assert_allclose(
    got_cos[1, 3], 1.0, atol=1e-6
  )  # product-clamp formula would give ~0.08
  want = _torch_cos_loss(t_src, t_dst).item()
  np.testing.assert_allclose(
    float(repa.repa_loss(jnp.asarray(src), jnp.asarray(dst))), want, atol=1e-6
  )
  # Gradients w.r.t. the projected features are finite, also at the zero vector, and match torch.
  grad = jax.grad(lambda s: repa.repa_loss(s, jnp.asarray(dst)))(jnp.asarray(src))
  assert np.isfinite(np.asarray(grad)).all()
  t_src.requires_grad_(True)
  _torch_cos_loss(t_src, t_dst).backward()
  ok = np.ones((2, 4), bool)
  ok[0, 0] = False  # nonzero below-eps vector: torch differentiates through the clamped norm
  ok[1, 3] = False  # parallel tiny vectors: the true gradient is 0, both give rounding noise
  np.testing.assert_allclose(np.asarray(grad)[ok], t_src.grad.numpy()[ok], atol=1e-5, rtol=1e-4)
  scale = 1 / np.linalg.norm(src[1, 3])  # ~3.5e4: the gradient's natural size for that vector
  assert np.abs(np.asarray(grad)[1, 3]).max() < 1e-6 * scale
  assert np.abs(t_src.grad.numpy()[1, 3]).max() < 1e-6 * scale


def test_repa_loss_bad_shapes():
  x = jnp.zeros((2, 4, 8))
  with pytest.raises(ValueError, match="fewer than the teacher's 5"):
    repa.repa_loss(x, jnp.zeros((2, 5, 8)))
  with pytest.raises(ValueError, match="batch/feature mismatch"):
    repa.repa_loss(x, jnp.zeros((2, 4, 9)))
  with pytest.raises(ValueError, match="batch/feature mismatch"):
    repa.repa_loss(x, jnp.zeros((3, 4, 8)))
  with pytest.raises(ValueError, match=r"expects \(B, L, D\)"):
    repa.repa_loss(jnp.zeros((4, 8)), jnp.zeros((4, 8)))


def test_config_defaults():
  cfg = repa.get_config()
  assert (cfg.align_layer, cfg.loss_weight, cfg.teacher_variant, cfg.denoiser_patch) == (
    8,
    0.5,
    "B/14",
    16,
  )
  assert cfg.proj_hidden_dim is None and cfg.cosine_eps == 1e-8
  cfg.proj_hidden_dim = 1152
  assert cfg.teacher_variant in dinov2.VARIANTS


@pytest.mark.parametrize("init_projector", [True, False])
def test_projector_restored_from_converted_pixnerd_checkpoint(tmp_path, init_projector):
  """A PixNerd checkpoint holding `diffusion_trainer.proj.*`: `flowseg convert pixnerd` stores the
  projector next to the denoiser, and model_init starts REPA's projector (online and EMA) from it,
  unless config.repa.init_projector is False (then it is the scratch initialisation)."""
  from flowseg_jax import sharding
  from flowseg_jax.convert import pixnerd as pixnerd_convert
  from flowseg_jax.models import pixnerd
  from tests.train_test import tiny_config

  teacher = dinov2.make_model("tiny/14")
  t_params = nn_linen.unbox(
    teacher.init(jax.random.key(3), np.zeros((1, 28, 28, 3), np.float32))["params"]
  )
  convert.save_orbax(t_params, teacher.arch_config, str(tmp_path / "teacher"))
  config = tiny_config()
  config.repa.enabled, config.repa.align_layer = True, 2
  config.repa.teacher_dir = str(tmp_path / "teacher")
  config.repa.init_projector = init_projector
  setup = train_step.TrainSetup(config)
  rng = np.random.default_rng(11)
  random = lambda tree: jax.tree.map(  # noqa: E731
    lambda a: rng.normal(0.0, 0.05, a.shape).astype(np.float32), tree
  )
  denoiser = random(pixnerd.abstract_params(setup.task.model))
  d = setup.task.model.hidden_size
  projector = random(
    {
      "layers_0": {"kernel": np.zeros((d, d)), "bias": np.zeros(d)},
      "layers_2": {"kernel": np.zeros((d, d)), "bias": np.zeros(d)},
      "layers_4": {"kernel": np.zeros((d, teacher.embed_dim)), "bias": np.zeros(teacher.embed_dim)},
    }
  )
  state_dict = {
    f"ema_denoiser.{k}": v
    for k, v in pixnerd_convert.flax_to_torch(denoiser, setup.task.model).items()
  }
  state_dict.update(convert.projector_to_torch(projector))
  torch.save(
    {"state_dict": {k: torch.from_numpy(v) for k, v in state_dict.items()}}, tmp_path / "c.ckpt"
  )
  pixnerd_convert.convert_to_orbax(tmp_path / "c.ckpt", tmp_path / "converted")
  info = json.load(open(tmp_path / "converted" / "conversion.json"))
  assert info["repa_projector"] is True
  config.model_init = str(tmp_path / "converted")

  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  rules = sharding.rules_from_config(config.sharding_rules)
  state, shardings = train_state.create_train_state(setup, mesh, rules, config.seed)
  scratch = jax.device_get(state.params["projector"])
  restored, origin = train_state.initialise(setup, mesh, rules, shardings)
  assert origin == "model_init"
  for tree in (restored.params, restored.ema_params):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree["denoiser"]), denoiser)
    want = projector if init_projector else scratch
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tree["projector"]), want)
