"""PyTorch reference <-> Flax parity, and the PixNerd checkpoint converter (files, keys, CLI)."""

import json
import os

import jax
import numpy as np
import pytest
import torch

from flowseg_jax.convert import common as convert_common
from flowseg_jax.convert import pixnerd as convert
from flowseg_jax.convert import torch_files
from flowseg_jax.models import pixnerd
from tests.torch_reference import pixnerd as ref

# Two small configs that differ in every architecture field.
CONFIGS = {
  "p4": dict(
    patch_size=4,
    hidden_size=64,
    num_heads=4,
    num_blocks=4,
    num_cond_blocks=2,
    nerf_hidden_size=16,
    nerf_mlp_ratio=2,
    num_classes=10,
  ),
  "p8": dict(
    patch_size=8,
    hidden_size=96,
    num_heads=2,
    num_blocks=5,
    num_cond_blocks=3,
    nerf_hidden_size=8,
    nerf_mlp_ratio=3,
    num_classes=7,
  ),
}
# float32 parity: both sides compute in float32 (JAX with "highest" matmul precision), but in a
# different order (fused qkv split, einsum vs bmm, XLA fusions), so outputs of magnitude ~1 agree
# to a few float32 ulps times the depth: observed <= 4e-6; a wrong layout is off by O(1).
PARITY_ATOL = 2e-5


@pytest.fixture(scope="module")
def torch_models():
  """name -> (torch reference with random non-zero weights, its state dict as NumPy)."""
  out = {}
  for i, (name, cfg) in enumerate(CONFIGS.items()):
    model = ref.randomize_(ref.PixNerDiT(**cfg), seed=i).eval()
    out[name] = (model, {k: v.numpy().copy() for k, v in model.state_dict().items()})
  return out


_apply = jax.jit(
  lambda m, p, x, t, y, k: m.apply({"params": p}, x, t, y, return_block_tokens=k),
  static_argnums=(0, 5),
)


def _inputs(cfg, h, w, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, size=(3, h, w, 3)).astype(np.float32)
  t = np.array([0.0, 0.37, 1.0], np.float32)
  y = np.array([0, cfg["num_classes"] - 1, cfg["num_classes"]])  # last one: the null class
  return x, t, y


def _torch_forward(model, x, t, y, k):
  with torch.no_grad():
    out, tok = model(
      torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(y), k
    )
  return out.permute(0, 2, 3, 1).numpy(), tok.numpy()


@pytest.mark.parametrize(
  "name,h,w,scan",
  [("p4", 16, 16, False), ("p4", 16, 32, True), ("p8", 16, 32, False), ("p8", 32, 16, True)],
)
def test_parity_with_torch_reference(torch_models, name, h, w, scan):
  tmodel, sd = torch_models[name]
  model = pixnerd.PixNerDiT(**CONFIGS[name], scan_blocks=scan)
  params = convert.torch_to_flax(sd, model)
  x, t, y = _inputs(CONFIGS[name], h, w)
  k = CONFIGS[name]["num_cond_blocks"] - 1  # REPA-style intermediate tokens too
  want, want_tok = _torch_forward(tmodel, x, t, y, k)
  assert np.abs(want).max() > 0.1  # random weights: a non-trivial output
  with jax.default_matmul_precision("highest"):
    got, got_tok = _apply(model, params, x, t, y, k)
  np.testing.assert_allclose(got, want, atol=PARITY_ATOL * max(1, np.abs(want).max()), rtol=0)
  np.testing.assert_allclose(got_tok, want_tok, atol=PARITY_ATOL * max(1, np.abs(want_tok).max()))


def test_scanned_and_unscanned_conversions_agree(torch_models):
  _, sd = torch_models["p4"]
  x, t, y = _inputs(CONFIGS["p4"], 16, 32)
  outs = []
  for scan in (False, True):
    model = pixnerd.PixNerDiT(**CONFIGS["p4"], scan_blocks=scan)
    outs.append(np.asarray(_apply(model, convert.torch_to_flax(sd, model), x, t, y, 1)[0]))
  np.testing.assert_allclose(outs[1], outs[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact_and_config_inferred(torch_models, name):
  _, sd = torch_models[name]
  assert convert.infer_model_config(sd) == {**CONFIGS[name], "in_channels": 3}
  for scan in (False, True):
    model = pixnerd.PixNerDiT(**CONFIGS[name], scan_blocks=scan)
    back = convert.flax_to_torch(convert.torch_to_flax(sd, model), model)
    assert list(back) == list(sd)  # official names, registration order
    for key, value in sd.items():
      np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_patch_embedding_permutation_and_transposes(torch_models):
  _, sd = torch_models["p4"]
  params = convert.torch_to_flax(sd, pixnerd.PixNerDiT(**CONFIGS["p4"]))
  w = sd["s_embedder.proj.weight"]  # (D, C*p*p), input index c*16 + ki*4 + kj
  # Flax input index (ki*4 + kj)*3 + c.
  ki, kj, c = 1, 2, 2
  np.testing.assert_array_equal(
    params["s_embedder"]["kernel"][(ki * 4 + kj) * 3 + c], w[:, c * 16 + ki * 4 + kj]
  )
  np.testing.assert_array_equal(
    params["blocks_0"]["attn"]["proj"]["kernel"], sd["blocks.0.attn.proj.weight"].T
  )


def test_xl_official_names_and_shapes():
  shapes = convert.expected_torch_shapes(pixnerd.make_model("XL/16"))
  assert len(shapes) == 336
  assert sum(int(np.prod(s)) for s in shapes.values()) == 700_589_219
  assert shapes["s_embedder.proj.weight"] == (1152, 768)
  assert shapes["x_embedder.embedder.0.weight"] == (64, 67)
  assert shapes["y_embedder.embedding_table.weight"] == (1001, 1152)
  assert shapes["blocks.25.attn.qkv.weight"] == (3456, 1152)
  assert shapes["blocks.25.mlp.w2.weight"] == (1152, 3072)
  assert shapes["blocks.0.attn.q_norm.weight"] == (72,)
  assert shapes["blocks.26.param_generator1.0.weight"] == (16384, 1152)
  assert shapes["blocks.29.norm.weight"] == (64,)
  assert "blocks.30.norm.weight" not in shapes and "blocks.26.attn.qkv.weight" not in shapes
  scanned = pixnerd.make_model("XL/16", scan_blocks=True)
  assert convert.expected_torch_shapes(scanned) == shapes


def test_mismatched_state_dict_names_every_offending_key(torch_models):
  _, sd = torch_models["p4"]
  model = pixnerd.PixNerDiT(**CONFIGS["p4"])
  bad = dict(sd)
  del bad["blocks.1.attn.k_norm.weight"]
  bad["blocks.9.extra.weight"] = np.zeros(3, np.float32)
  bad["blocks.3.param_generator1.0.bias"] = np.zeros(5, np.float32)
  # Inference from shapes survives the damage, so the full check below can name everything.
  assert convert.infer_model_config(bad) == model.arch_config()
  with pytest.raises(ValueError) as err:
    convert.torch_to_flax(bad, model, source="bad.ckpt")
  msg = str(err.value)
  assert "bad.ckpt" in msg
  assert "missing (1): blocks.1.attn.k_norm.weight" in msg
  assert "unexpected (1): blocks.9.extra.weight" in msg
  assert "blocks.3.param_generator1.0.bias: got (5,), expected (1024,)" in msg
  # Each problem alone is also caught.
  for mutate, needle in (
    (lambda d: d.pop("final_layer.linear.bias"), "missing (1): final_layer.linear.bias"),
    (lambda d: d.update(foo=np.zeros(1)), "unexpected (1): foo"),
    (
      lambda d: d.update({"blocks.0.attn.qkv.weight": np.zeros((64, 192), np.float32)}),
      "blocks.0.attn.qkv.weight: got (64, 192), expected (192, 64)",
    ),
  ):
    one = dict(sd)
    mutate(one)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
      convert.torch_to_flax(one, model)


def _lightning_checkpoint(torch_models):
  """A Lightning-style dict with distinct EMA and online copies and a REPA projector."""
  _, ema = torch_models["p4"]
  online = {k: (v + 1.0).astype(np.float32) for k, v in ema.items()}
  state = {f"ema_denoiser.{k}": torch.from_numpy(v) for k, v in ema.items()}
  state.update({f"denoiser.{k}": torch.from_numpy(v) for k, v in online.items()})
  state["diffusion_trainer.proj.0.0.weight"] = torch.zeros(64, 64)
  ckpt = {
    "epoch": 3,
    "global_step": 1234,
    "pytorch-lightning_version": "2.5.0",
    "state_dict": state,
    "loops": {},
    "optimizer_states": [],
    "lr_schedulers": [],
  }
  return ckpt, ema, online


def test_ema_and_online_selection_from_lightning_file(torch_models, tmp_path):
  ckpt, ema, online = _lightning_checkpoint(torch_models)
  path = tmp_path / "last.ckpt"
  torch.save(ckpt, path)
  for weights, want in (("ema", ema), ("online", online)):
    model, params = convert.load_torch_checkpoint(path, weights)
    assert model.arch_config() == {**CONFIGS["p4"], "in_channels": 3}
    back = convert.flax_to_torch(params, model)
    for key in want:
      np.testing.assert_array_equal(back[key], want[key], err_msg=f"{weights}: {key}")
  only_ema = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("denoiser.")}
  with pytest.raises(ValueError, match=r"no 'denoiser\.\*' tensors for weights='online'"):
    convert.select_weights({"state_dict": only_ema}, "online")


def test_orig_mod_prefix_plain_dict_safetensors_and_bf16(torch_models, tmp_path):
  from safetensors.torch import save_file

  _, sd = torch_models["p4"]
  compiled = {f"ema_denoiser._orig_mod.{k}": torch.from_numpy(v) for k, v in sd.items()}
  plain = {k: torch.from_numpy(v) for k, v in sd.items()}
  torch.save(compiled, tmp_path / "compiled.pt")
  torch.save(plain, tmp_path / "plain.pth")
  save_file(plain, str(tmp_path / "plain.safetensors"))
  for name in ("compiled.pt", "plain.pth", "plain.safetensors"):
    model, params = convert.load_torch_checkpoint(tmp_path / name, scan_blocks=True)
    assert model.scan_blocks
    back = convert.flax_to_torch(params, model)
    for key in sd:
      np.testing.assert_array_equal(back[key], sd[key], err_msg=f"{name}: {key}")
  # bfloat16 tensors are widened to float32 exactly.
  bf16 = {k: v.to(torch.bfloat16) for k, v in plain.items()}
  model = pixnerd.PixNerDiT(**CONFIGS["p4"])
  params = convert.torch_to_flax(bf16, model)
  assert params["x_embedder"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(
    params["x_embedder"]["kernel"], bf16["x_embedder.embedder.0.weight"].float().numpy().T
  )


def test_orbax_conversion_cli_and_variant_check(torch_models, tmp_path, capsys):
  ckpt, ema, _ = _lightning_checkpoint(torch_models)
  path = tmp_path / "epoch=3-step=1234.ckpt"
  torch.save(ckpt, path)
  out = tmp_path / "converted"
  assert convert.cli(["--ckpt", str(path), "--out", str(out)]) == 0
  assert "Converted 42 tensors" in capsys.readouterr().out
  with open(out / "model_config.json") as f:
    assert json.load(f) == {**CONFIGS["p4"], "in_channels": 3, "scan_blocks": False}
  with open(out / "conversion.json") as f:
    info = json.load(f)
  assert info["global_step"] == 1234 and info["weights"] == "ema"
  model, params = convert.load_converted(out, scan_blocks=True)
  assert model.scan_blocks and params["cond_blocks"]["norm1"]["scale"].shape == (2, 64)
  back = convert.flax_to_torch(params, model)
  for key in ema:
    np.testing.assert_array_equal(back[key], ema[key], err_msg=key)
  # Existing output, then a variant that does not match: clear errors, non-zero status.
  assert convert.cli(["--ckpt", str(path), "--out", str(out)]) == 1
  assert "already exists" in capsys.readouterr().err
  status = convert.cli(["--ckpt", str(path), "--out", str(tmp_path / "o2"), "--model", "tiny/4"])
  err = capsys.readouterr().err
  assert status == 1 and "not PixNerd tiny/4" in err and "num_heads: checkpoint 4, tiny/4 2" in err
  assert not os.path.exists(tmp_path / "o2" / "checkpoint")
  assert convert.cli(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o3")]) == 1
  assert "does not exist" in capsys.readouterr().err


def test_lazy_conversion_reads_only_the_chosen_copy(torch_models, tmp_path, monkeypatch):
  """convert_to_orbax reads each chosen tensor once, never the other copy or the Adam moments,
  and drops each source tensor's mapped pages after copying it, without changing what it reads."""
  ckpt, ema, online = _lightning_checkpoint(torch_models)
  names = [k for k in ckpt["state_dict"] if k.startswith("denoiser.")]
  ckpt["optimizer_states"] = [
    {
      "state": {
        i: {"exp_avg": ckpt["state_dict"][k] * 2, "exp_avg_sq": ckpt["state_dict"][k] ** 2}
        for i, k in enumerate(names)
      },
      "param_groups": [{"lr": 1e-4, "params": list(range(len(names)))}],
    }
  ]
  path = tmp_path / "last.ckpt"
  torch.save(ckpt, path)

  loaded, read, released = {}, [], []
  read_checkpoint, to_numpy = torch_files.read, convert_common.to_numpy
  release = torch_files.release_mapped_pages

  def spy_read(p, what):
    loaded["raw"], loaded["mapped"] = read_checkpoint(p, what)
    return loaded["raw"], loaded["mapped"]

  def spy_to_numpy(value, name):
    read.append(value.data_ptr())
    return to_numpy(value, name)

  def spy_release(tensor):
    released.append(tensor.data_ptr())
    before = tensor.numpy().copy()
    release(tensor)
    np.testing.assert_array_equal(tensor.numpy(), before)  # re-read from the file, not zeroed

  monkeypatch.setattr(torch_files, "read", spy_read)
  monkeypatch.setattr(convert_common, "to_numpy", spy_to_numpy)
  monkeypatch.setattr(torch_files, "release_mapped_pages", spy_release)
  convert.convert_to_orbax(path, tmp_path / "out", weights="ema")

  assert loaded["mapped"]  # the zip format is memory-mapped, so tensors are read on use
  sd = loaded["raw"]["state_dict"]
  chosen = {sd[f"ema_denoiser.{k}"].data_ptr() for k in ema}
  others = {v.data_ptr() for k, v in sd.items() if not k.startswith("ema_denoiser.")}
  for state in loaded["raw"]["optimizer_states"][0]["state"].values():
    others |= {state["exp_avg"].data_ptr(), state["exp_avg_sq"].data_ptr()}
  assert sorted(read) == sorted(chosen) and not others & set(read), "read outside the EMA copy"
  assert sorted(released) == sorted(chosen)
  model, params = convert.load_converted(tmp_path / "out")
  back = convert.flax_to_torch(params, model)
  for key in ema:
    np.testing.assert_array_equal(back[key], ema[key], err_msg=key)
  # A legacy (non-zip) file cannot be memory-mapped: it is read whole and never released.
  legacy = tmp_path / "legacy.ckpt"
  torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
  released.clear()
  convert.convert_to_orbax(legacy, tmp_path / "out_legacy", weights="online")
  assert not loaded["mapped"] and not released
  model, params = convert.load_converted(tmp_path / "out_legacy")
  back = convert.flax_to_torch(params, model)
  for key in online:
    np.testing.assert_array_equal(back[key], online[key], err_msg=key)


def test_convert_memory_benchmark_writes_the_official_layout(tmp_path, capsys):
  """benchmarks/convert_memory.py on tiny/4: the random file has PixNerd's Lightning layout (two
  different copies, the REPA projector, Adam moments for every trained tensor) and converts."""
  import sys

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from benchmarks import convert_memory

  path = str(tmp_path / "random.ckpt")
  size = convert_memory.write_random_checkpoint(path, "tiny/4", optimizer=True)
  ckpt = torch.load(path, weights_only=True, mmap=True)
  sd = ckpt["state_dict"]
  names = convert.expected_torch_shapes(pixnerd.make_model("tiny/4"))
  assert {k for k in sd if k.startswith("ema_denoiser.")} == {f"ema_denoiser.{k}" for k in names}
  assert {k for k in sd if k.startswith("denoiser.")} == {f"denoiser.{k}" for k in names}
  assert sum(k.startswith("diffusion_trainer.proj.") for k in sd) == 6
  for k in names:
    assert not torch.equal(sd[f"denoiser.{k}"], sd[f"ema_denoiser.{k}"]), k
  (opt,) = ckpt["optimizer_states"]
  assert len(opt["state"]) == len(names) + 6 and len(opt["param_groups"]) == 3
  assert size == os.path.getsize(path) and not os.path.exists(path + ".pool")
  assert convert_memory.main(["--model", "tiny/4", "--dir", str(tmp_path)]) == 0
  assert "x the converted copy" in capsys.readouterr().out
