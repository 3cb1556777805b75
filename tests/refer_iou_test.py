"""gIoU / cIoU / prec@k on hand-computed examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flowseg_jax.evaluators import refer_iou as pm


def _masks():
  t = np.zeros((3, 4, 4), np.int32)
  p = np.zeros((3, 4, 4), np.int32)
  t[0, :2, :2] = 1  # 4 target pixels, prediction covers them and 4 more: I 4, U 8
  p[0, :2, :4] = 1
  t[1, :, :] = 1  # 16 target pixels, 8 predicted; 4 target pixels ignored: I 8, U 12
  t[1, 3, :] = 255
  p[1, :2, :] = 1
  p[1, 3, :] = 1  # predictions on ignored pixels do not count
  return p, t  # example 2: both empty -> IoU 1, I 0, U 0


def test_intersection_union_and_metrics():
  p, t = _masks()
  inter, union = jax.jit(pm.intersection_union)(jnp.asarray(p), jnp.asarray(t))
  np.testing.assert_array_equal(inter, [4, 8, 0])
  np.testing.assert_array_equal(union, [8, 12, 0])
  m = pm.PromptedIoU.from_model_output(predictions=p, targets=t).to_host()
  r = m.compute()
  assert r["num_examples"] == 3
  np.testing.assert_allclose(r["giou"], (0.5 + 2 / 3 + 1) / 3)
  np.testing.assert_allclose(r["ciou"], 12 / 20)
  assert r["prec@0.5"] == pytest.approx(2 / 3)  # strict: IoU 0.5 is not a hit
  assert r["prec@0.6"] == pytest.approx(2 / 3) and r["prec@0.7"] == pytest.approx(1 / 3)


def test_merge_and_padding_mask_equal_one_batch():
  p, t = _masks()
  whole = pm.PromptedIoU.from_model_output(predictions=p, targets=t).to_host()
  # Two batches, the second padded with a junk example that the mask drops.
  a = pm.PromptedIoU.from_model_output(predictions=p[:2], targets=t[:2]).to_host()
  pad_p = np.concatenate([p[2:], np.ones_like(p[:1])])
  pad_t = np.concatenate([t[2:], np.zeros_like(t[:1])])
  b = pm.PromptedIoU.from_model_output(
    predictions=pad_p, targets=pad_t, mask=np.array([1, 0])
  ).to_host()
  merged = pm.PromptedIoU.empty().merge(a).merge(b).compute()
  for k, v in whole.compute().items():
    assert merged[k] == pytest.approx(v), k
  # gIoU and cIoU differ when object sizes differ: a small miss weighs more in gIoU.
  assert merged["giou"] != pytest.approx(merged["ciou"])


def test_errors():
  with pytest.raises(ValueError, match="differ"):
    pm.intersection_union(jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 3)))
  with pytest.raises(ValueError, match="no examples"):
    pm.PromptedIoU.empty().compute()
