"""The Flax Qwen3 against `transformers.Qwen3Model` (random tiny configurations written with
`save_pretrained`), and the Hugging Face directory loader's checks.

Tolerance: max abs error <= 1e-5 on outputs of magnitude ~1-5 (after the final RMSNorm); float32
reassociation differences between XLA and PyTorch are ~1e-6 here.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers", reason="transformers is not installed (the `text` extra)")

from flowseg_jax.convert import qwen3 as convert  # noqa: E402
from tests import qwen3_testutil  # noqa: E402

TOL = 1e-5
IDS = np.array([[2, 3, 4, 5, 6, 7], [0, 0, 8, 9, 10, 11], [8, 9, 4, 0, 0, 0]], np.int32)
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.int32)


def _hf(module, ids=IDS, mask=MASK):
  with torch.no_grad():
    out = module(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
  return out.last_hidden_state.float().numpy()


@pytest.mark.parametrize(
  "kind", ["sharded_base", "causal_lm_with_bias"], ids=["sharded", "causal_lm_bias"]
)
def test_parity_with_transformers(tmp_path, kind):
  if kind == "sharded_base":
    hf = qwen3_testutil.make_model_dir(tmp_path)
    assert os.path.isfile(tmp_path / convert.INDEX_FILE)
  else:  # model.-prefixed names, an lm_head to ignore, biased projections, MHA
    hf = qwen3_testutil.make_model_dir(
      tmp_path, causal_lm=True, shard=False, attention_bias=True, num_key_value_heads=4
    )
  model, params = convert.load_hf(tmp_path)
  got = np.asarray(model.apply({"params": params}, IDS, MASK))
  want = _hf(hf)
  assert got.shape == (3, 6, 32) and np.abs(want).max() > 1
  # Every position, padded ones included, with right padding (the official encoder's) and none.
  # Left padding: the valid positions; the padded ones are queries without any allowed key, whose
  # value differs between transformers versions (4.x attends to everything, 5.x's SDPA gives 0).
  np.testing.assert_allclose(got[[0, 2]], want[[0, 2]], atol=TOL, rtol=0)
  np.testing.assert_allclose(got[1, 2:], want[1, 2:], atol=TOL, rtol=0)
  print(f"Qwen3 {kind}: max |jax - transformers| = {np.abs(got - want).max():.2e}")
  # Valid tokens do not depend on the padding (RoPE is relative, padded keys are masked).
  for row, valid in ((1, slice(2, 6)), (2, slice(0, 3))):
    alone = model.apply({"params": params}, IDS[row : row + 1, valid], MASK[row : row + 1, valid])
    np.testing.assert_allclose(got[row, valid], np.asarray(alone)[0], atol=TOL)


def test_round_trip_bf16_and_checks(tmp_path):
  hf = qwen3_testutil.make_model_dir(tmp_path, shard=False)
  model, params = convert.load_hf(tmp_path)
  back = convert.flax_to_hf(params, model)
  want = {k: v.numpy() for k, v in hf.state_dict().items()}
  assert set(back) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(back[k]), v, err_msg=k)
  # bfloat16 parameters and compute (the official encoder's precision) stay close.
  bmodel, bparams = convert.load_hf(tmp_path, dtype=jnp.bfloat16)
  assert bparams["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  ref = np.asarray(model.apply({"params": params}, IDS, MASK))
  out = np.asarray(bmodel.apply({"params": bparams}, IDS, MASK), np.float32)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.05
  # A tensor missing / mis-shaped is named with the shapes.
  sd = dict(want)
  del sd["layers.1.mlp.up_proj.weight"]
  sd["norm.weight"] = np.ones(31, np.float32)
  with pytest.raises(ValueError) as e:
    convert.hf_to_flax(sd, model, source="dir")
  assert "missing (1): layers.1.mlp.up_proj.weight" in str(e.value)
  assert "norm.weight: got (31,), expected (32,)" in str(e.value)


def test_config_refusals(tmp_path):
  qwen3_testutil.make_model_dir(tmp_path, shard=False)
  path = tmp_path / "config.json"
  base = json.loads(path.read_text())
  for change, match in (
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "llama"}, "model_type='llama'"),
  ):
    cfg = {**base, **change}
    if "rope_scaling" in change:
      cfg.pop("rope_parameters", None)
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
      convert.load_hf(tmp_path)
  os.remove(path)
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.load_hf(tmp_path)
