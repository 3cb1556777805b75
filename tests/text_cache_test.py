"""Per-split text-feature caches (data.text_cache): chunked build with progress, resume after a
stop, refusal of a cache made for other inputs, and RefCOCO batches that stream their features
with host and device memory flat in the number of sentences."""

import hashlib
import json
import os
import pickle
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from flowseg_jax.data import datasets, pipeline, text_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, D = 8, 256  # features per sentence: 8 KiB in float32


class FakeEncoder:
  """A deterministic stand-in for `tasks.prompts.TextEncoder`: features from a hash of the text."""

  def __init__(self, identity="fake", max_length=T, embed_dim=D):
    self.identity, self.max_length, self.embed_dim = identity, max_length, embed_dim
    self.calls = 0

  def __call__(self, texts):
    self.calls += 1
    out = np.empty((len(texts), self.max_length, self.embed_dim), np.float32)
    for i, text in enumerate(texts):
      seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
      out[i] = np.random.default_rng(seed).normal(size=out.shape[1:])
    return out, np.ones(out.shape[:2], np.int32)


def refcoco_layout(root, num_sentences: int, per_ref: int = 5) -> dict:
  """A RefCOCO layout (4 tiny images, polygon instances, refs JSON) with `num_sentences`
  sentences; every 10th ref is in 'val', the others in 'train'."""
  os.makedirs(root / "train2014", exist_ok=True)
  images, anns = [], []
  for i in range(4):
    name = f"COCO_train2014_{i:012d}.jpg"
    Image.fromarray(np.full((20, 24, 3), 50 * i, np.uint8)).save(root / "train2014" / name)
    images.append({"id": i, "file_name": name, "height": 20, "width": 24})
    anns.append({"id": 100 + i, "image_id": i, "segmentation": [[2, 2, 12 + i, 2, 12, 9, 2, 9]]})
  refs = []
  for r in range(num_sentences // per_ref):
    sents = [
      {"sent_id": r * per_ref + j, "sent": f"object {r} seen as {j}"} for j in range(per_ref)
    ]
    refs.append(
      dict(ref_id=r, ann_id=100 + r % 4, image_id=r % 4, split="val" if r % 10 == 0 else "train")
      | {"sentences": sents}
    )
  (root / "refs.json").write_text(json.dumps(refs))
  (root / "instances.json").write_text(json.dumps({"images": images, "annotations": anns}))
  return dict(
    refs_json=str(root / "refs.json"),
    instances_json=str(root / "instances.json"),
    image_dir=str(root / "train2014"),
    name="refcoco",
  )


def input_config(layout: dict, features: str | None) -> ml_collections.ConfigDict:
  cfg = pipeline.default_input_config()
  cfg.dataset = "refcoco"
  cfg.refcoco = ml_collections.ConfigDict(layout)
  cfg.train_split, cfg.eval_split = "train", "val"
  cfg.image_size, cfg.batch_size = (16, 16), 8
  cfg.text_features = features
  return cfg


def build_split(cfg, split, encoder, **kw):
  keys, sentences = datasets.split_sentences(cfg, split)
  directory = text_cache.split_dir(cfg.text_features, split)
  return text_cache.build(directory, keys, sentences, encoder, split=split, **kw)


def test_a_stopped_build_resumes_and_equals_an_uninterrupted_one(tmp_path):
  layout = refcoco_layout(tmp_path / "data", 400)
  once, twice = (input_config(layout, str(tmp_path / name)) for name in ("once", "twice"))
  lines = []
  build_split(once, "train", FakeEncoder(), chunk_size=32, log=lines.append)
  assert len(lines) == 12 and lines[-1].startswith("train: chunk 12/12 (360/360 sentences,")

  def stop_after_5(k):
    if k == 4:
      raise KeyboardInterrupt  # as a kill between two chunks

  with pytest.raises(KeyboardInterrupt):
    build_split(twice, "train", FakeEncoder(), chunk_size=32, after_chunk=stop_after_5, log=None)
  directory = text_cache.split_dir(twice.text_features, "train")
  with pytest.raises(text_cache.StaleFeatureCacheError, match="7 of 12 chunks missing"):
    text_cache.SplitFeatures(directory)
  with open(os.path.join(directory, "chunk-00005.npy.tmp"), "wb") as f:
    f.write(b"half a chunk")  # a kill during a write leaves only a temporary file
  resumed, lines = FakeEncoder(), []
  build_split(twice, "train", resumed, chunk_size=32, log=lines.append)
  assert resumed.calls == 7 and lines[0] == "train: resuming, 5/12 chunks already built"
  for name in sorted(os.listdir(directory)):
    if not name.endswith(".tmp"):
      want = (tmp_path / "once" / "train" / name).read_bytes()
      assert (tmp_path / "twice" / "train" / name).read_bytes() == want, name
  features = text_cache.SplitFeatures(directory)
  keys, sentences = datasets.split_sentences(twice, "train")
  want, _ = FakeEncoder()([sentences[100]])
  np.testing.assert_allclose(features.features(keys[100]), want[0], rtol=1 / 128)  # bfloat16


def test_a_cache_made_for_other_inputs_is_refused_in_one_line(tmp_path):
  layout = refcoco_layout(tmp_path / "data", 100)
  cfg = input_config(layout, str(tmp_path / "features"))
  build_split(cfg, "val", FakeEncoder(), chunk_size=4, storage_dtype="float32")
  pipeline.create_eval_dataset(cfg, process_index=0, process_count=1)  # the same inputs: fine
  with pytest.raises(text_cache.StaleFeatureCacheError, match="encoder fake") as e:
    build_split(cfg, "val", FakeEncoder(identity="another"), chunk_size=4)
  assert "\n" not in str(e.value)
  with pytest.raises(text_cache.StaleFeatureCacheError, match="max_length 8 != expected 16"):
    build_split(cfg, "val", FakeEncoder(max_length=16), chunk_size=4)
  refs = json.loads(open(layout["refs_json"]).read())
  refs[0]["sentences"][2]["sent"] = "another sentence"  # other refs, same sizes
  open(layout["refs_json"], "w").write(json.dumps(refs))
  with pytest.raises(text_cache.StaleFeatureCacheError, match="sentences [0-9a-f]+ != expected"):
    pipeline.create_eval_dataset(cfg, process_index=0, process_count=1)
  with pytest.raises(text_cache.StaleFeatureCacheError, match="no text-feature cache"):
    text_cache.SplitFeatures(text_cache.split_dir(cfg.text_features, "train"))
  check = text_cache.check_manifest
  with pytest.raises(text_cache.StaleFeatureCacheError, match="embed_dim 256 != expected 2048"):
    check(text_cache.read_manifest(tmp_path / "features" / "val"), {"embed_dim": 2048})


def test_batches_carry_their_examples_features(tmp_path):
  layout = refcoco_layout(tmp_path / "data", 200)
  cfg = input_config(layout, str(tmp_path / "features"))
  build_split(cfg, "train", FakeEncoder(), chunk_size=16, storage_dtype="float32")
  batch = next(pipeline.create_train_iterator(cfg, seed=0, process_index=0, process_count=1))
  assert batch["text"].shape == (8, T, D) and batch["text"].dtype == np.float32
  prompts = datasets.prompt_list(cfg)
  want, _ = FakeEncoder()([prompts[int(p)] for p in batch["prompt"]])
  np.testing.assert_array_equal(batch["text"], want)
  src, _ = datasets.make_source(cfg, "train", prepare=False)
  src[0]  # opens a chunk file; a copy for a grain worker process opens its own
  again = pickle.loads(pickle.dumps(src))
  assert again.cache._files == {} and len(again) == len(src)
  np.testing.assert_array_equal(again[3]["text"], src[3]["text"])


def _probe(root: str, features: str) -> None:
  """In a fresh process: RSS growth while building the train pipeline and reading 4 batches, the
  argument bytes of a jitted T2I forward on a batch's own features and the bytes on the device
  (JSON on stdout)."""
  import jax
  import jax.numpy as jnp

  from flowseg_jax import defaults, tasks
  from flowseg_jax.data import transforms

  def rss() -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

  config = defaults.load_config_file(os.path.join(REPO, "configs/rlfseg/refcoco.py"))
  layout = {k: os.path.join(root, v) for k, v in json.loads(os.environ["LAYOUT"]).items()}
  config.input = input_config(layout | {"name": "refcoco"}, features)
  config.prompted.variant = "tiny"
  config.prompted.overrides = ml_collections.ConfigDict({"text_dim": D})
  config.model.dtype, config.model.remat_policy = "float32", "none"
  task = tasks.create_task(config)
  x, t, cond = task.init_inputs((16, 16))
  params = task.model.init(jax.random.key(0), x, t, cond)["params"]
  before = rss()
  iterator = pipeline.create_train_iterator(config.input, seed=0, process_index=0, process_count=1)
  batches = [next(iterator) for _ in range(4)]
  grown = rss() - before
  batch = {k: jnp.asarray(v) for k, v in batches[-1].items() if k != "num_skipped"}

  def forward(params, batch):
    images = transforms.normalize_on_device(batch["image"], batch.get("image_hw"))
    t = jnp.full((images.shape[0],), 0.5)
    return task.apply(params, images, t, task.condition(batch))

  lowered = jax.jit(forward).lower(params, batch)  # what the step is given; compiling adds nothing
  print(
    json.dumps(
      dict(
        rss_growth=grown,
        argument_bytes=sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(lowered.in_avals)),
        live_device_bytes=sum(a.nbytes for a in jax.live_arrays()),
      )
    )
  )


def test_host_and_device_memory_flat_in_the_number_of_sentences(tmp_path):
  """2 000 vs 20 000 sentences (8 KiB of features each: a resident table would be 16 vs 160 MiB):
  the jitted step's argument bytes and the device's live bytes are equal, and building the train
  pipeline and reading 4 batches grows RSS by < 16 MiB more at 20k. What does grow with the
  sentences on the host is the index (sentence ids, the refs' strings, the example list: well
  under 1 KiB a sentence, measured ~0.5 MiB per 1 000 sentences), not their features."""
  results = {}
  for n in (2_000, 20_000):
    root = tmp_path / str(n)
    layout = refcoco_layout(root, n)
    cfg = input_config(layout, str(root / "features"))
    build_split(cfg, "train", FakeEncoder(), storage_dtype="float32", log=None)
    rel = {k: os.path.relpath(v, root) for k, v in layout.items() if k != "name"}
    proc = subprocess.run(
      [
        sys.executable,
        "-c",
        f"from tests.text_cache_test import _probe; _probe({str(root)!r}, {cfg.text_features!r})",
      ],
      cwd=REPO,
      env={**os.environ, "LAYOUT": json.dumps(rel), "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"},
      capture_output=True,
      text=True,
      timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results[n] = json.loads(proc.stdout.strip().splitlines()[-1])
  print(results)
  small, large = results[2_000], results[20_000]
  assert large["argument_bytes"] == small["argument_bytes"]
  assert large["live_device_bytes"] == small["live_device_bytes"]
  assert large["rss_growth"] - small["rss_growth"] < 16 * 2**20  # a table: + 140 MiB


def test_cache_text_without_an_encoder_is_refused_in_one_line(tmp_path, capsys):
  from flowseg_jax import main

  layout = refcoco_layout(tmp_path / "data", 20)
  fields = [f"--config.input.refcoco.{k}={v}" for k, v in layout.items() if k != "name"]
  spec = "--config=configs/rlfseg/refcoco.py"
  assert main.run(["cache-text", spec, "--split=train", *fields]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "config.prompted.encoder_dir" in err


def test_evaluation_reads_each_examples_features_from_the_cache(tmp_path, monkeypatch):
  """A 'cache' model is evaluated on the eval split's cached features (never its encoder), the
  wrong-prompt pass on other examples' cached features."""
  import jax

  from flowseg_jax import defaults, evaluate, inference, tasks

  layout = refcoco_layout(tmp_path / "data", 60)
  config = defaults.load_config_file("configs/rlfseg/refcoco.py")
  config.input = input_config(layout, str(tmp_path / "features"))
  config.prompted.variant = "tiny"
  config.prompted.overrides = ml_collections.ConfigDict({"text_dim": D})
  config.prompted.eval_wrong_prompt = True
  config.model.dtype, config.model.remat_policy = "float32", "none"
  config.eval.batch_per_device = 2
  build_split(config.input, "val", FakeEncoder(), chunk_size=4)
  task = tasks.create_task(config)
  params = task.model.init(jax.random.key(0), *task.init_inputs((16, 16)))["params"]
  read = []
  cache_read = text_cache.SplitFeatures.features
  monkeypatch.setattr(
    text_cache.SplitFeatures, "features", lambda self, k: read.append(k) or cache_read(self, k)
  )
  monkeypatch.setattr(type(task), "encode", lambda *a: pytest.fail("the encoder ran"))
  seg = inference.Segmenter(config, params, task=task)
  result = evaluate.evaluate_segmenter(seg, str(tmp_path / "work"), step=0, num_steps=1)
  keys, _ = datasets.split_sentences(config.input, "val")
  assert result["num_examples"] == len(keys) == 10 and 0 <= result["wrong_giou"] <= 1
  assert sorted(set(read)) == sorted(keys.tolist())


def test_the_preflight_counts_streamed_features_and_checks_their_folder():
  from flowseg_jax import defaults
  from flowseg_jax.run import hosts

  config = defaults.load_config_file("configs/rlfseg/refcoco.py", "target=v5e-8")
  config.input.num_workers = 4  # each holds prefetch_buffer + 1 = 3 batches of 32 in /dev/shm
  without = hosts.shm_needed(config)
  config.input.text_features = "/data/refcoco_text"
  assert hosts.shm_needed(config) - without == 4 * 3 * 32 * 128 * 2048 * 4  # 1 MiB an example
  assert hosts.input_paths(config)["config.input.text_features"] == "/data/refcoco_text"
