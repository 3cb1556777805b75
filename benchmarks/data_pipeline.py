"""Input-pipeline throughput: images/s of the training iterator, with augmentation.

Writes a fake ADE20K (ADEChallengeData2016 layout, 512x683 / 683x512 JPEGs at quality 90 with
texture-rich content, 8-bit PNG annotations with values 0..150) to a temporary folder and times
`pipeline.create_train_iterator` at 256x256 and 512x512 with random scale (0.5, 2.0), random crop
and flip, for several worker counts; also the built-in synthetic dataset at 64x64. Nothing is
downloaded.

  python -m benchmarks.data_pipeline                      # defaults below
  python -m benchmarks.data_pipeline --workers=0,2,4 --batches=40 --num_images=96
"""

import argparse
import os
import tempfile

from benchmarks import input_rate
from flowseg_jax.data import pipeline


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workers", default="0,2", help="comma-separated grain worker counts")
  parser.add_argument("--sizes", default="256,512", help="comma-separated square image sizes")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--num_images", type=int, default=64)
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  sizes = [int(s) for s in args.sizes.split(",")]
  print(f"CPU cores: {os.cpu_count()}; batch {args.batch_size}; {args.batches} timed batches")
  print(f"{'dataset':<26}{'size':>8}{'workers':>9}{'images/s':>11}{'cpu ms/img':>12}")
  with tempfile.TemporaryDirectory() as root:
    input_rate.write_fake_ade20k(root, args.num_images)
    for size in sizes:
      for w in workers:
        cfg = pipeline.default_input_config()
        cfg.update(dataset="ade20k", data_dir=root, image_size=(size, size), num_workers=w,
                   batch_size=args.batch_size, random_scale=(0.5, 2.0), random_flip=True)  # fmt: skip
        rate, cpu = input_rate.measure(cfg, args.batches, args.warmup)
        cpu_txt = f"{cpu:>12.1f}" if w == 0 else f"{'-':>12}"
        print(f"{'ade20k jpg+png, aug':<26}{size:>5}^2{w:>9}{rate:>11.1f}{cpu_txt}", flush=True)
    for w in workers:
      cfg = pipeline.default_input_config()
      cfg.update(num_workers=w, batch_size=args.batch_size * 4)
      rate, cpu = input_rate.measure(cfg, args.batches, args.warmup)
      cpu_txt = f"{cpu:>12.1f}" if w == 0 else f"{'-':>12}"
      print(f"{'synthetic (150 classes)':<26}{64:>5}^2{w:>9}{rate:>11.1f}{cpu_txt}", flush=True)


if __name__ == "__main__":
  main()
