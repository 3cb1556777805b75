"""How many grain workers a host needs to feed its accelerators at 50 % MFU.

Per target of `configs/flowseg_ade20k.py` and stage: the images/s one chip consumes at 50 % of its
dense bf16 peak (benchmarks/hardware.py datasheets) training XL/16 (3x the forward's matmul FLOPs,
benchmarks/flops.py; the REPA teacher's forward is left out, so the demand is if anything
overstated), times the chips one host drives, over the images/s one grain worker produces: the
CPU time per image of the ADE20K pipeline (JPEG decode at reduced DCT scale, random scale 0.5-2,
crop, flip; uint8 out, normalised on the device), measured here on a fake ADE20K in this process
(process CPU time, so other load on the machine does not inflate it). Workers = ceil(demand /
per-worker rate). The per-worker rate is this machine's core; a TPU/GPU host's cores are usually
faster, so the figures are upper bounds.

  python -m benchmarks.input_demand                   # prints the table (markdown)
"""

from __future__ import annotations

import argparse
import math
import tempfile

from benchmarks import flops, hardware, input_rate
from configs import flowseg_ade20k
from flowseg_jax.data import pipeline
from flowseg_jax.models import pixnerd

MFU = 0.5
# Chips one host drives (a v4/v5p host has 4; v5e and v6e have 8 on a single-host slice and 4 on
# multi-host ones; GPU servers have 8).
CHIPS_PER_HOST = {"v4-16": 4, "v5e-8": 8, "v5e-16": 4, "v5e-64": 4, "v5p-16": 4, "v6e-8": 8,
                  "h100-8": 8, "a100-8": 8}  # fmt: skip
# One worker's CPU ms per image as measured on 2026-12-06 (README table): configs/flowseg_ade20k.py's
# INPUT_WORKERS are table(MEASURED_MS_PER_IMAGE)'s workers.
MEASURED_MS_PER_IMAGE = {256: 6.4, 512: 11.7}
DEVICE_KIND = {"v4": "tpu v4", "v5e": "tpu v5e", "v5p": "tpu v5", "v6e": "tpu v6e",
               "h100": "h100", "a100": "a100"}  # fmt: skip
STAGE_SIZE = {"1": 256, "2": 512}


def peak_bf16(target: str) -> float:
  kind = DEVICE_KIND[target.split("-")[0]]
  for key, peak in hardware.DEVICE_PEAKS:
    if key == kind:
      return peak.bf16 * 1e12
  raise KeyError(target)


def worker_ms_per_image(size: int, root: str, batches: int) -> float:
  cfg = pipeline.default_input_config()
  cfg.update(dataset="ade20k", data_dir=root, image_size=(size, size), num_workers=0,
             batch_size=8, random_scale=(0.5, 2.0), random_flip=True)  # fmt: skip
  return input_rate.measure(cfg, batches, warmup=2)[1]


def table(ms_per_image: dict[int, float]) -> list[dict]:
  arch = {**pixnerd.VARIANTS["XL/16"], "in_channels": 3}
  rows = []
  for target, stages in flowseg_ade20k.TARGETS.items():
    for stage in stages:
      size = STAGE_SIZE[stage]
      per_image = flops.train_step_flops(arch, 1, size, size)
      chip = MFU * peak_bf16(target) / per_image
      host = chip * CHIPS_PER_HOST[target]
      worker = 1e3 / ms_per_image[size]
      rows.append(dict(target=target, stage=stage, size=size, tflop_per_image=per_image / 1e12,
                       images_per_s_chip=chip, chips_per_host=CHIPS_PER_HOST[target],
                       images_per_s_host=host, images_per_s_worker=worker,
                       workers=math.ceil(host / worker)))  # fmt: skip
  return rows


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batches", type=int, default=8)
  p.add_argument("--num_images", type=int, default=32)
  args = p.parse_args(argv)
  with tempfile.TemporaryDirectory() as root:
    input_rate.write_fake_ade20k(root, args.num_images)
    ms = {s: worker_ms_per_image(s, root, args.batches) for s in sorted(set(STAGE_SIZE.values()))}
  print(f"one worker: {', '.join(f'{s}²: {m:.1f} ms/image' for s, m in ms.items())} (CPU time)")
  print("| target | stage | TFLOP/image | images/s per chip at 50 % MFU | chips/host | "
        "images/s per host | images/s per worker | workers |")  # fmt: skip
  print("|---|---|---|---|---|---|---|---|")
  rows = table(ms)
  for r in rows:
    print(f"| {r['target']} | {r['stage']} ({r['size']}²) | {r['tflop_per_image']:.2f} | "
          f"{r['images_per_s_chip']:.0f} | {r['chips_per_host']} | {r['images_per_s_host']:.0f} | "
          f"{r['images_per_s_worker']:.0f} | {r['workers']} |")  # fmt: skip
  return rows


if __name__ == "__main__":
  main()
