"""What decoding after the resize is worth: mIoU of the two orders on annotations finer than the input.

Evaluation (`inference.Segmenter`) resizes the network's continuous colours bilinearly to the
annotation's size and decodes them there (nearest centroid), as mmseg resizes logits before the
argmax. The other order decodes at the network's resolution and resizes the labels (nearest). On
the built-in data at the training size both orders are the same map, so this script regenerates
the eval images at k times the trained size with k-pixel texture cells
(`synthetic.make_example(texel=k)`): shrunk to the network's input they show the trained textures,
while their labels keep the shapes' edges at k times the resolution, as real annotations do.

  flowseg train --config configs/demo.py --workdir /tmp/flowseg_demo      # first, ~4 min on a CPU
  python -m experiments.decode_order --workdir /tmp/flowseg_demo --scales 1,2,4
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from flowseg_jax import inference, inference_host, scoring
from flowseg_jax.data import synthetic, transforms
from flowseg_jax.evaluators import miou

ORDERS = ("resize_then_decode", "decode_then_resize")


def compare_orders(segmenter: inference.Segmenter, examples, *, num_steps=None) -> dict:
  """(uint8 image, uint8 label) pairs -> {order: mmseg metrics (fractions)} for both orders."""
  n = segmenter.num_classes
  matrices = {order: np.zeros((n, n), np.int64) for order in ORDERS}
  items = ((i, image, None) for i, (image, _) in enumerate(examples))
  for i, colours, labels, _ in segmenter.segment_stream(items, len(examples), num_steps=num_steps):
    label = examples[i][1]
    coarse = inference_host.decode_colours_host(colours, segmenter.centroids)
    preds = {
      "resize_then_decode": labels,
      "decode_then_resize": transforms.resize_label(coarse, label.shape),
    }
    for order, pred in preds.items():
      matrices[order] += scoring.confusion_matrix(pred, label, n)
  return {order: miou.compute_metrics(m) for order, m in matrices.items()}


def scaled_eval_examples(config, scale: int, num: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """The config's synthetic eval examples at `scale` times their size, with `scale`-pixel texels."""
  syn = config.input.synthetic
  size = tuple(scale * int(s) for s in syn.size)
  return [
    synthetic.make_example(
      synthetic.EVAL_INDEX_OFFSET + i,
      num_classes=syn.num_classes,
      size=size,
      seed=syn.seed,
      class_colours=bool(syn.get("class_colours", False)),
      texel=scale,
    )
    for i in range(num)
  ]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training workdir on the synthetic dataset")
  p.add_argument("--scales", default="1,2,4", help="annotation size / training size")
  p.add_argument("--num", type=int, default=None, help="eval examples (default: the config's)")
  p.add_argument("--num-steps", type=int, default=None, help="Euler steps (default: the config's)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  segmenter = inference.Segmenter.from_workdir(args.workdir)
  config = segmenter.config
  if config.input.dataset != "synthetic":
    raise SystemExit(
      f"decode_order.py: {args.workdir} was trained on {config.input.dataset!r}; this needs the "
      "built-in synthetic dataset (configs/demo.py)"
    )
  num = int(config.input.synthetic.num_eval if args.num is None else args.num)
  rows = []
  print(f"{args.workdir} step {segmenter.step}: {num} eval images, mIoU / aAcc %")
  print(
    f"{'scale':>5} {'annotation':>10} {'resize, decode':>15} {'decode, resize':>15} {'gain':>6}"
  )
  for scale in (int(s) for s in args.scales.split(",")):
    examples = scaled_eval_examples(config, scale, num)
    result = compare_orders(segmenter, examples, num_steps=args.num_steps)
    new, old = (result[o] for o in ORDERS)
    h, w = examples[0][1].shape
    rows.append(
      {
        "scale": scale,
        "annotation": [h, w],
        **{f"{o}_{k}": result[o][k] for o in ORDERS for k in ("mIoU", "aAcc", "mAcc")},
      }
    )
    print(
      f"{scale:>5} {f'{h}x{w}':>10} {100 * new['mIoU']:>7.2f} / {100 * new['aAcc']:5.2f} "
      f"{100 * old['mIoU']:>7.2f} / {100 * old['aAcc']:5.2f} {100 * (new['mIoU'] - old['mIoU']):+6.2f}"
    )
  result = {"workdir": args.workdir, "step": segmenter.step, "num": num, "rows": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
