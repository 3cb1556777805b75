"""The grain pipeline: batch format, determinism, epochs, resume (also through orbax), sharding,
augmentation geometry, worker processes."""

import io
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from flowseg_jax.data import datasets, pipeline, synthetic, transforms

from . import data_testutil as tu

NUM_CLASSES = 12
SIZE = (16, 16)


def _cfg(**kw):
  cfg = pipeline.default_input_config()
  cfg.synthetic.num_classes = NUM_CLASSES
  cfg.synthetic.num_train = 8
  cfg.synthetic.num_eval = 5
  cfg.synthetic.size = SIZE
  cfg.image_size = SIZE
  cfg.batch_size = 4
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _train(cfg, seed=0, pi=0, pc=1):
  return pipeline.create_train_iterator(cfg, seed=seed, process_index=pi, process_count=pc)


@pytest.fixture(scope="module")
def index_of():
  """Maps an un-augmented training image (bytes of its uint8 pixels) to its example index."""
  table = {}
  for i in range(8):
    image, _ = synthetic.make_example(i, num_classes=NUM_CLASSES, size=SIZE, seed=0)
    table[image.tobytes()] = i
  return lambda img: table[np.asarray(img, np.uint8).tobytes()]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_format_and_values(index_of):
  batch = next(_train(_cfg()))
  assert set(batch) == {"image", "label", "image_hw", "num_skipped"}
  assert batch["image"].shape == (4, *SIZE, 3) and batch["image"].dtype == np.uint8  # bytes cross
  assert batch["label"].shape == (4, *SIZE) and batch["label"].dtype == np.int32
  np.testing.assert_array_equal(batch["image_hw"], np.tile(SIZE, (4, 1)))  # nothing padded
  assert batch["num_skipped"].shape == () and int(batch["num_skipped"]) == 0
  for img, lab in zip(batch["image"], batch["label"]):  # exact: no resize at equal size
    i = index_of(img)
    expected = synthetic.make_example(i, num_classes=NUM_CLASSES, size=SIZE, seed=0)[1]
    np.testing.assert_array_equal(lab, expected)


def test_same_seed_same_batches_other_seed_other_batches():
  cfg = _cfg(random_scale=(0.5, 2.0), random_flip=True)
  a, b, c = _take(_train(cfg, seed=1), 3), _take(_train(cfg, seed=1), 3), _take(_train(cfg, 2), 3)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  cfg.shuffle_seed = 2  # shuffle_seed overrides the run seed for the data
  _assert_batches_equal(_take(_train(cfg, seed=1), 3), c)


def test_each_epoch_is_a_new_permutation(index_of):
  cfg = _cfg(batch_size=8)
  it = _train(cfg, seed=0)
  orders = [[index_of(img) for img in next(it)["image"]] for _ in range(3)]
  for order in orders:
    assert sorted(order) == list(range(8))
  assert orders[0] != orders[1] or orders[1] != orders[2]


def test_resume_from_state_reproduces_following_batches():
  cfg = _cfg(random_scale=(0.5, 2.0), random_flip=True)
  it = _train(cfg, seed=0)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  resumed = _train(cfg, seed=0)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 3), expected)
  assert state["input"]["process_count"] == 1 and state["input"]["batch_size"] == 4
  for other in (_train(_cfg(batch_size=8), seed=0), _train(cfg, seed=1), _train(cfg, pi=0, pc=2)):
    with pytest.raises(ValueError, match="another input setup"):
      other.set_state(state)


def test_orbax_checkpoint_of_iterator(tmp_path):
  cfg = _cfg(random_scale=(0.75, 1.5), random_flip=True)
  it = _train(cfg, seed=0)
  _take(it, 5)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 2)
  fresh = _train(cfg, seed=0)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    assert mngr.latest_step() == 5
    mngr.restore(5, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 2), expected)


def test_two_processes_see_disjoint_complete_halves(index_of):
  cfg = _cfg(batch_size=4)
  single = [[index_of(im) for im in b["image"]] for b in _take(_train(cfg), 4)]
  p0 = [[index_of(im) for im in b["image"]] for b in _take(_train(cfg, pi=0, pc=2), 4)]
  p1 = [[index_of(im) for im in b["image"]] for b in _take(_train(cfg, pi=1, pc=2), 4)]
  assert all(len(b) == 2 for b in p0 + p1)  # local batch = global / process_count
  for epoch in (0, 1):  # 8 examples = 2 global batches of 4 per epoch
    seen0 = p0[2 * epoch] + p0[2 * epoch + 1]
    seen1 = p1[2 * epoch] + p1[2 * epoch + 1]
    assert not set(seen0) & set(seen1)
    assert sorted(seen0 + seen1) == list(range(8))
  for step in range(4):  # the global batch does not depend on the process count
    assert sorted(p0[step] + p1[step]) == sorted(single[step])
  with pytest.raises(ValueError, match="multiple of the process count"):
    _train(_cfg(batch_size=5), pi=0, pc=2)


def test_eval_shards_are_strided_disjoint_and_complete():
  cfg = _cfg()
  assert datasets.num_eval_examples(cfg) == 5
  everything = [
    e["name"] for e in pipeline.create_eval_dataset(cfg, process_index=0, process_count=1)
  ]
  shards = [pipeline.create_eval_dataset(cfg, process_index=i, process_count=2) for i in (0, 1)]
  names = [[e["name"] for e in s] for s in shards]
  assert [len(s) for s in shards] == [3, 2]
  assert names[0] == everything[0::2] and names[1] == everything[1::2]
  assert sorted(names[0] + names[1]) == sorted(everything) and len(set(everything)) == 5
  ex = next(iter(shards[0]))
  assert ex["image"].shape == (*SIZE, 3) and ex["image_orig"].dtype == np.uint8
  np.testing.assert_array_equal(
    ex["image_orig"],
    synthetic.make_example(synthetic.EVAL_INDEX_OFFSET, num_classes=NUM_CLASSES, size=SIZE, seed=0)[
      0
    ],
  )


def test_config_errors():
  with pytest.raises(ValueError, match="dataset"):
    _train(_cfg(dataset="imagenet"))
  with pytest.raises(ValueError, match="random_scale"):
    _train(_cfg(random_scale=(2.0, 1.0)))
  with pytest.raises(ValueError, match="on_bad_example"):
    _train(_cfg(on_bad_example="ignore"))
  with pytest.raises(ValueError, match="data_dir"):
    _train(_cfg(dataset="ade20k"))


# ---------------------------------------------------------------------------------------------
# Augmentation geometry: image and label stay aligned; labels are never blended.
# ---------------------------------------------------------------------------------------------

_COLOURS = np.array([[230, 30, 30], [30, 230, 30], [30, 30, 230], [230, 230, 30]], np.uint8)


def _block_example(h, w):
  label = np.zeros((h, w), np.int32)
  label[: h // 2, w // 2 :] = 1
  label[h // 2 :, : w // 3] = 2
  label[h // 2 :, w // 3 :] = 3
  label[h // 3 : h // 3 + 8, 10:30] = 255
  image = _COLOURS[np.where(label == 255, 0, label)]
  image[label == 255] = 128
  return image, label


def _check_alignment(out):
  lab, img = out["label"], out["image"].astype(np.float64)
  assert np.isin(lab, [0, 1, 2, 3, 255]).all()
  # Pixels whose 5x5 neighbourhood has a single class show that class's colour.
  pad = np.pad(lab, 2, mode="edge")
  windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5))
  uniform = (windows == lab[..., None, None]).all((-1, -2)) & (lab != 255)
  assert uniform.sum() > 50
  np.testing.assert_allclose(img[uniform], _COLOURS[lab[uniform]], atol=12)


@pytest.mark.parametrize("scale", [None, (0.5, 2.0)])
def test_train_transform_keeps_image_and_label_aligned(scale):
  image, label = _block_example(90, 120)
  for seed in range(6):
    out = transforms.train_example(
      image, label, image_size=(48, 64), random_scale=scale, random_flip=True,
      rng=np.random.default_rng(seed), name="blocks",
    )  # fmt: skip
    assert out["image"].shape == (48, 64, 3) and out["label"].shape == (48, 64)
    _check_alignment(out)


def test_jpeg_reduced_scale_decoding_stays_aligned():
  image, label = _block_example(400, 520)
  data = tu.jpeg_bytes(image, quality=98)
  for seed in range(4):
    opened = Image.open(io.BytesIO(data))
    out = transforms.train_example(
      opened, label, image_size=(48, 64), random_scale=(0.5, 1.0), random_flip=True,
      rng=np.random.default_rng(seed), name="jpeg",
    )  # fmt: skip
    assert opened.size[0] < 520  # decoded at a reduced DCT scale
    _check_alignment(out)


def test_padding_when_scaled_below_crop():
  image, label = _block_example(32, 32)
  rng = np.random.default_rng(0)
  out = transforms.train_example(
    image, label, image_size=(64, 64), random_scale=(0.25, 0.25), random_flip=False,
    rng=rng, name="small",
  )  # fmt: skip
  # Scale 0.25 x (64/32) = 0.5: content 16x16 at the top left, the rest padded.
  assert (out["label"][16:, :] == 255).all() and (out["label"][:, 16:] == 255).all()
  np.testing.assert_array_equal(out["image_hw"], [16, 16])
  assert (out["label"][:16, :16] != 255).any()
  # On the device: the content normalised exactly as on the host, the padding IMAGE_PAD_VALUE.
  on_device = np.asarray(transforms.normalize_on_device(out["image"][None], out["image_hw"][None]))
  want = transforms.normalize_image(out["image"][:16, :16])
  np.testing.assert_array_equal(on_device[0, :16, :16], want)
  assert (on_device[0, 16:] == transforms.IMAGE_PAD_VALUE).all()
  assert (on_device[0, :, 16:] == transforms.IMAGE_PAD_VALUE).all()


def test_device_normalisation_is_the_hosts_to_the_bit():
  """Every uint8 value maps to the float32 normalize_image gives (the train step's input is the
  same whether the pipeline normalises on the host or the device); float images pass through."""
  values = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
  on_device = np.asarray(transforms.normalize_on_device(values))
  np.testing.assert_array_equal(on_device, transforms.normalize_image(values))
  hw = np.array([[16, 16]], np.int32)
  np.testing.assert_array_equal(np.asarray(transforms.normalize_on_device(values, hw)), on_device)
  floats = transforms.normalize_image(values)
  assert transforms.normalize_on_device(floats) is floats


def test_label_resize_is_nearest():
  label = np.arange(16, dtype=np.int32).reshape(4, 4)
  np.testing.assert_array_equal(transforms.resize_label(label, (2, 2)), [[5, 7], [13, 15]])
  np.testing.assert_array_equal(transforms.resize_label(label, (8, 8))[::2, ::2], label)
  np.testing.assert_array_equal(
    transforms.resize_label(label, (2, 2), box=(2.0, 0.0, 4.0, 2.0)), [[2, 3], [6, 7]]
  )


# ---------------------------------------------------------------------------------------------
# Worker processes: deterministic, resumable, and the skip count reaches the main process.
# ---------------------------------------------------------------------------------------------


def test_worker_processes_resume_and_count_skips(tmp_path):
  files = tu.ade20k_files(6, "training", 3, sizes=((20, 24),))
  tu.write_ade20k(str(tmp_path), {"training": files})
  bad = tmp_path / "ADEChallengeData2016" / "images" / "training" / "ADE_train_00000004.jpg"
  bad.write_bytes(b"not a jpeg")
  cfg = pipeline.default_input_config()
  cfg.update(dataset="ade20k", data_dir=str(tmp_path), image_size=(12, 12), batch_size=5,
             num_workers=2, on_bad_example="skip", random_flip=True)  # fmt: skip
  it = _train(cfg, seed=0)
  first = _take(it, 2)
  state = it.get_state()
  expected = _take(it, 4)
  # 6 batches x 5 good examples = 30 good reads = 6 epochs of 5: about one skip per epoch.
  skips = sum(int(b["num_skipped"]) for b in first + expected)
  assert 4 <= skips <= 6, skips
  assert all(b["image"].shape == (5, 12, 12, 3) for b in first + expected)
  resumed = _train(cfg, seed=0)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), expected)
  it.close()
  resumed.close()


def _two_worker_cfg():
  cfg = pipeline.default_input_config()
  cfg.update(batch_size=4, num_workers=2, image_size=(16, 16))
  cfg.synthetic.update(num_train=32, num_eval=4, size=(16, 16))
  return cfg


def _uninterrupted(cfg, n):
  reference = _train(cfg)
  batches = _take(reference, n)
  reference.close()
  return batches


def test_a_ctrl_c_to_the_process_group_leaves_data_workers_running(tmp_path):
  """A terminal's Ctrl-C reaches the data workers too: they ignore it (the trainer checkpoints and
  stops them), so the batches keep coming, equal to an uninterrupted iterator's."""
  cfg = _two_worker_cfg()
  want = _uninterrupted(cfg, 6)
  others = {p.pid for p in multiprocessing.active_children()}  # e.g. earlier tests' (xdist)
  it = _train(cfg)
  # One batch from each worker (they take turns): both have run their init function (a Ctrl-C
  # while they are still starting: the next test).
  got = _take(it, 2)
  workers = [p for p in multiprocessing.active_children() if p.pid not in others]
  assert len(workers) == 2
  for worker in workers:
    os.kill(worker.pid, signal.SIGINT)
  time.sleep(1.0)
  assert all(w.is_alive() for w in workers)
  got += _take(it, 4)
  it.close()
  _assert_batches_equal(got, want)


# In a fresh interpreter, as a run starts: multiprocessing's resource tracker is not running yet
# (starting it unblocks SIGINT in its thread; data.pipeline starts it first). A thread sends each
# new data worker a SIGINT every 2 ms from its first moment; the script saves 4 batches and the
# number of SIGINTs each worker got, and checks the workers are still alive.
_CTRL_C_AT_START = """
import os, signal, sys, threading, time
import numpy as np
from flowseg_jax.data import pipeline

def spawned_children():
  pids = set()
  for task in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{task}/children") as f:
        pids.update(int(p) for p in f.read().split())
    except FileNotFoundError:  # a thread that ended meanwhile
      pass
  out = set()
  for pid in pids:
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        if f.read().endswith(b"--multiprocessing-fork\\x00"):  # exec'd (a bare fork has our argv)
          out.add(pid)
    except FileNotFoundError:
      pass
  return out

hits, done = {}, threading.Event()
def interrupt_new_workers():
  while not done.is_set():
    for pid in spawned_children():
      try:
        os.kill(pid, signal.SIGINT)
        hits[pid] = hits.get(pid, 0) + 1
      except ProcessLookupError:
        pass
    time.sleep(0.002)

sender = threading.Thread(target=interrupt_new_workers, daemon=True)
sender.start()
cfg = pipeline.default_input_config()
cfg.update(batch_size=4, num_workers=2, image_size=(16, 16))
cfg.synthetic.update(num_train=32, num_eval=4, size=(16, 16))
it = pipeline.create_train_iterator(cfg, seed=0, process_index=0, process_count=1)
batches = [next(it) for _ in range(4)]
done.set()
sender.join()
alive = all(os.path.exists(f"/proc/{pid}") for pid in hits)
np.savez(sys.argv[1], hits=np.array(sorted(hits.values())), alive=alive,
         **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
it.close()
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads children from /proc")
def test_a_ctrl_c_while_data_workers_start_does_not_kill_them(tmp_path):
  """A Ctrl-C in the first second of a run, while the workers are still importing (before their
  init function ignores it), must not kill them: they start with it held. The batches still
  come, equal to an uninterrupted iterator's."""
  out = tmp_path / "got.npz"
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  run = subprocess.run(
    [sys.executable, "-c", _CTRL_C_AT_START, str(out)],
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  got = np.load(out)
  assert len(got["hits"]) == 2 and got["hits"].min() >= 10, got["hits"]  # both, from start-up on
  assert bool(got["alive"])
  want = _uninterrupted(_two_worker_cfg(), 4)
  _assert_batches_equal([{k: got[f"{i}_{k}"] for k in b} for i, b in enumerate(want)], want)


def test_workers_start_with_ctrl_c_held_but_the_caller_stays_interruptible():
  """grain_ops._InterruptsHeldThread: calls run where SIGINT is blocked (workers started from
  there inherit it), while the waiting main thread still takes a Ctrl-C at once: a batch can hang
  (a worker stuck starting) and a second Ctrl-C must still get the user out, and the hung call
  must not hold up the interpreter's exit either."""
  script = """
import os, signal, sys, threading, time
from flowseg_jax.data import grain_ops
held = grain_ops._InterruptsHeldThread()
blocked = held(lambda: signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))
assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, []), "the caller's mask changed"
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
start = time.monotonic()
try:
  held(time.sleep, 120)
except KeyboardInterrupt:
  print(f"blocked={blocked} interrupted_after={time.monotonic() - start:.1f}")
"""
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  start = time.monotonic()
  out = subprocess.run(
    [sys.executable, "-c", script], capture_output=True, text=True, timeout=200, env=env
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert time.monotonic() - start < 60  # it exits with the 120 s call still running
  blocked, after = (kv.split("=")[1] for kv in out.stdout.split())
  assert blocked == "True" and float(after) < 5.0, out.stdout
