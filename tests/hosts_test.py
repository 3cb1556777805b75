"""Many hosts: launch flags, the pre-flight, one decision for all processes, multi-process inference.

The multi-process tests start two `jax.distributed` processes on localhost (4 CPU devices each, gloo
collectives) through the real CLI, with FSDP spanning both processes, and make something happen on
process 1 only: a SIGTERM, a bad training example. Both processes must end the same way, at the same
step, within seconds.
"""

import argparse
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from flowseg_jax import checkpointing, evaluate, inference, main, train
from flowseg_jax.run import agreement, hosts
from flowseg_jax.run import status as run_status
from tests.train_test import REPO, read_jsonl, tiny_config

# ------------------------------------------------------------------------------------------------
# Launch arguments and the pre-flight (one process).
# ------------------------------------------------------------------------------------------------


def _args(**kw):
  base = dict(distributed=True, coordinator_address=None, num_processes=None, process_id=None)
  return argparse.Namespace(**{**base, **kw})


def test_launch_arguments_from_flags_environment_or_auto_detection():
  flags = _args(coordinator_address="h:1234", num_processes=2, process_id=1)
  want = {"coordinator_address": "h:1234", "num_processes": 2, "process_id": 1}
  assert hosts.launch_arguments(flags, environ={}) == want
  env = {"JAX_COORDINATOR_ADDRESS": "h:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  assert hosts.launch_arguments(_args(), environ=env) == want
  assert hosts.launch_arguments(_args(), environ={}) == {}  # auto-detect
  assert hosts.launch_arguments(_args(distributed=False), environ=env) is None
  for args, environ, match in [
    (_args(coordinator_address="h:1"), {}, "--num_processes, --process_id missing"),
    (_args(), {"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"),
    (_args(), {**env, "JAX_PROCESS_ID": "2"}, r"process id 2 is not in \[0, 2\)"),
    (_args(), {**env, "JAX_NUM_PROCESSES": "two"}, "must be integers"),
    (_args(coordinator_address="h", num_processes=2, process_id=0), {}, "needs a port"),
  ]:
    with pytest.raises(hosts.LaunchError, match=match):
      hosts.launch_arguments(args, environ=environ)


def test_cli_missing_launch_piece_is_one_line_exit_2(tmp_path, capsys):
  from flowseg_jax import main

  code = main.run(
    ["train", "--config", os.path.join(REPO, "configs/demo.py:smoke"), "--workdir",
     str(tmp_path / "run"), "--distributed", "--coordinator_address=localhost:1"]
  )  # fmt: skip
  err = capsys.readouterr().err
  assert code == 2 and err.count("\n") == 1, err
  assert "--num_processes, --process_id missing" in err
  assert not os.path.exists(tmp_path / "run")


def _readme_train_commands(section: str) -> list[list[str]]:
  """The `flowseg train` commands of a README section, continuation lines joined, split as a shell
  would (variables left as written)."""
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  body = text[text.index(section) :]
  body = body[: body.index("\n## ", 1)].replace("\\\n", " ")
  commands = []
  for line in body.splitlines():
    if "flowseg train " in line and "..." not in line:
      words = shlex.split(line[line.index("flowseg train ") :].rstrip("'`"))
      commands.append(words[2:])
  return commands


def test_readme_pod_recipes_parse_into_configs():
  """Each many-hosts recipe of the README is a valid command: its config and overrides load, it
  asks for --distributed, and the SLURM/TPU ones leave the job to JAX's detection."""
  commands = _readme_train_commands("## Training on many hosts")
  assert len(commands) == 2
  for argv in commands:
    rest, overrides = main.split_overrides(argv)
    args = main._parser("train").parse_args(rest)
    config = main.load_config(args.config, args.workdir, overrides, from_workdir=False)
    assert args.distributed and hosts.launch_arguments(args, environ={}) == {}
    assert config.repa.enabled and config.model_init.endswith("pixnerd_xl16")


def test_preflight_names_the_missing_path_before_any_work(tmp_path):
  config = tiny_config(model_init=str(tmp_path / "no-such-export"))
  with pytest.raises(
    hosts.PreflightError, match="config.model_init=.*no-such-export does not exist"
  ):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")  # found before the workdir is created


def test_a_dev_shm_too_small_for_grains_workers_is_one_line(tmp_path, monkeypatch, capsys):
  """Docker's default /dev/shm is 64 MiB; grain's workers pass batches through it. Pre-flight
  compares the need (workers x (prefetch + 1) x batch bytes) with what is free, before any work."""
  config = tiny_config(**{"input.num_workers": 2, "input.batch_size": 4})
  h, w = config.input.image_size
  need = 2 * (config.input.prefetch_buffer + 1) * 4 * (h * w * 7 + 8)
  assert hosts.shm_needed(config) == need
  assert hosts.shm_needed(tiny_config(**{"input.num_workers": 0})) == 0  # no workers, no check
  monkeypatch.setattr(hosts, "shm_free_bytes", lambda: need - 1)
  workdir = tmp_path / "run"
  code = main.run(["train", "--config", os.path.join(REPO, "configs/demo.py:smoke"), f"--workdir={workdir}",
                   "--config.input.num_workers=2", "--config.input.batch_size=4"])  # fmt: skip
  err = capsys.readouterr().err.strip().splitlines()
  assert code != 0 and len(err) == 1, err
  assert "/dev/shm on this host has" in err[0] and "config.input.num_workers" in err[0]
  assert "--shm-size=" in err[0]
  assert not workdir.exists()
  monkeypatch.setattr(hosts, "shm_free_bytes", lambda: need)
  hosts.check_inputs(config)  # exactly enough passes


def test_agreement_on_one_process_is_free_and_transparent():
  a = agreement.Agreement()
  assert a.agree(2) == 2 and a.num_calls == 0
  with pytest.raises(KeyError):
    with a.hold():
      raise KeyError("x")
  assert agreement.describe(KeyError("x")) == "KeyError: 'x'"
  assert agreement.describe(run_status.RunError("two\n lines")) == "two lines"


# ------------------------------------------------------------------------------------------------
# Two processes through the CLI.
# ------------------------------------------------------------------------------------------------

# argv[1]: JSON {"argv": CLI arguments, "fault": None | "sigterm" | "bad_example", "at": batch
# number, "stamp": file for the time of the fault}. The fault happens on process 1 only, inside its
# data iterator (where a real bad example or a preemption notice would meet the loop).
_WORKER = """
import json, os, signal, sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
spec = json.loads(sys.argv[1])
from flowseg_jax import main
from flowseg_jax.data import pipeline, sources

calls = [0]

def faulty_next(self):
  calls[0] += 1
  if calls[0] == spec["at"] and jax.process_index() == 1:
    with open(spec["stamp"], "w") as f:
      f.write(repr(time.time()))
    if spec["fault"] == "sigterm":
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      raise sources.BadExampleError("img_7", "image img_7.jpg is corrupt (process 1 only)")
  return super(type(self), self).__next__()

def faulty(*args, **kwargs):  # the same grain iterator (its checkpointing intact), faulty __next__
  it = real(*args, **kwargs)
  it.__class__ = type("Faulty", (type(it),), {"__next__": faulty_next})
  return it

if spec.get("fault"):
  real = pipeline.create_train_iterator
  pipeline.create_train_iterator = faulty
sys.exit(main.run(spec["argv"]))
"""

TRAIN_FLAGS = [
  "--config.mesh.data=1", "--config.mesh.fsdp=8", "--config.async_checkpointing=False",
  "--config.eval_every_steps=0", "--config.log_every_steps=1", "--config.optim.warmup_steps=0",
]  # fmt: skip


def _port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch_two(argv, *, script=_WORKER, spec=None, via_env=False, timeout=400, cwds=(REPO, REPO)):
  """Runs `flowseg argv` as two processes of one job (through `script`, given {"argv": ..., **spec},
  process i in cwds[i]); returns (exit statuses, outputs, exit times)."""
  port = _port()
  procs = []
  for i in range(2):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    if via_env == "slurm":  # what `srun --ntasks=2` sets; JAX's auto-detection reads it
      launch = ["--distributed"]
      env.update(
        SLURM_JOB_ID=str(port), SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
        SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_STEP_NUM_NODES="1",
      )  # fmt: skip
    elif via_env:
      launch = ["--distributed"]
      env.update(
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)
      )
    else:
      launch = [f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
      launch.insert(0, "--distributed")
    procs.append(
      subprocess.Popen(
        [sys.executable, "-c", script, json.dumps({**(spec or {}), "argv": [*argv, *launch]})],
        cwd=cwds[i],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
      )
    )
  # Poll so that each exit time is seen (communicate() would wait on one process at a time).
  ended = [None, None]
  deadline = time.time() + timeout
  outputs = [b"", b""]
  while None in ended and time.time() < deadline:
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.time()
    time.sleep(0.05)
  for i, p in enumerate(procs):
    if ended[i] is None:
      p.kill()
    outputs[i] = p.communicate()[0]
  return [p.returncode for p in procs], [o.decode(errors="replace") for o in outputs], ended


def _train_argv(workdir, *flags):
  config = os.path.join(REPO, "configs/demo.py:smoke")
  return ["train", "--config", config, f"--workdir={workdir}", *TRAIN_FLAGS, *flags]


def train_with_fault_on_process_1(workdir, fault, want_codes, **kwargs):
  """Trains 6 steps on two processes, `fault` on process 1 at batch 2; returns the outputs after
  checking the exit statuses and that both processes exited within a minute of the fault."""
  stamp = workdir + ".stamp"
  argv = _train_argv(workdir, "--config.total_steps=6", "--config.ckpt_every_steps=100")
  spec = {"fault": fault, "at": 2, "stamp": stamp}
  codes, outputs, ended = launch_two(argv, spec=spec, **kwargs)
  assert codes == want_codes, "\n".join(o[-3000:] for o in outputs)
  with open(stamp) as f:
    seconds = max(ended) - float(f.read())
  print(f"{fault} on process 1 -> both processes exited: {seconds:.2f} s")
  assert seconds < 60
  return outputs


def test_a_workdir_one_host_cannot_see_stops_both_before_any_work(tmp_path):
  """A relative --workdir is another folder for each process here, as a local path is on two hosts
  with their own disks: process 1 cannot read process 0's probe, both exit 1 naming process 1, and
  no checkpoint is written anywhere."""
  hosts_dirs = [tmp_path / "host0", tmp_path / "host1"]
  for d in hosts_dirs:
    d.mkdir()
  argv = _train_argv("run", "--config.total_steps=2")
  codes, outputs, _ = launch_two(argv, cwds=hosts_dirs, timeout=200)
  assert codes == [1, 1], "\n".join(o[-3000:] for o in outputs)
  for out in outputs:
    lines = [x for x in out.splitlines() if x.startswith("flowseg train:")]
    assert len(lines) == 1 and "pre-flight: workdir=" in lines[0], out[-3000:]
    assert "does not exist on process 1 of 2 (it must be visible to every host" in lines[0]
  assert not any((d / "run" / "checkpoints").exists() for d in hosts_dirs)
  assert not (hosts_dirs[0] / "run" / hosts.PROBE_FILE).exists()  # the probe is removed


def test_the_slurm_recipe_trains_on_two_processes(tmp_path):
  """README's SLURM recipe, simulated: two processes with the variables `srun` sets and nothing
  else; JAX's auto-detection finds the job (the coordinator on the first node, a port from the job
  id) and the run trains across both processes to the end."""
  workdir = str(tmp_path / "run")
  argv = _train_argv(workdir, "--config.total_steps=2", "--config.ckpt_every_steps=2")
  codes, outputs, _ = launch_two(argv, via_env="slurm", timeout=300)
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  assert "2 process(es)" in outputs[0]
  with open(os.path.join(workdir, "train_result.json")) as f:
    assert json.load(f)["status"] == "finished"


def test_sigterm_to_one_process_checkpoints_both_at_the_same_step(tmp_path):
  """Only process 1 gets SIGTERM (while reading batch 2): both processes finish step 2, checkpoint
  it, write status 'preempted' and exit 75 — within seconds of the signal."""
  workdir = str(tmp_path / "run")
  train_with_fault_on_process_1(workdir, "sigterm", [75, 75])
  with open(os.path.join(workdir, "train_result.json")) as f:
    result = json.load(f)
  assert result["status"] == "preempted" and result["step"] == 2
  assert [r["step"] for r in read_jsonl(workdir)] == [1, 2]
  manager = checkpointing.create_manager(os.path.join(workdir, "checkpoints"))
  assert manager.all_steps() == [2]  # one checkpoint, written by both processes together
  manager.close()


def test_bad_example_on_one_process_stops_both_with_its_message(tmp_path):
  """Process 1's data iterator raises a bad example at batch 2 (launched through the JAX_*
  environment variables): both processes exit 1 within seconds, both print that example's line,
  nothing is checkpointed and no process waits in a collective."""
  workdir = str(tmp_path / "run")
  outputs = train_with_fault_on_process_1(workdir, "bad_example", [1, 1], via_env=True)
  for i, out in enumerate(outputs):
    lines = [line for line in out.splitlines() if line.startswith("flowseg train:")]
    assert len(lines) == 1, out[-3000:]
    assert "image img_7.jpg is corrupt (process 1 only)" in lines[0]
    assert ("process 1 of 2 stopped the run" in lines[0]) == (i == 0)
    assert "Traceback" not in out
  with open(os.path.join(workdir, "train_result.json")) as f:
    result = json.load(f)
  assert result["status"] == "failed" and result["step"] == 1
  assert not os.path.exists(os.path.join(workdir, "checkpoints", "2"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step one-process run (FSDP over 8 devices) with its one-process evaluation."""
  workdir = str(tmp_path_factory.mktemp("hosts") / "run")
  config = tiny_config(total_steps=2, ckpt_every_steps=2, **{"mesh.data": 1, "mesh.fsdp": 8})
  config.eval.batch_per_device = 1
  train.train_and_evaluate(config, workdir)
  return workdir, evaluate.evaluate(None, workdir)


# argv[1]: JSON {"argv": the `flowseg evaluate` arguments, "images": .npz, "out": prefix}. After the
# evaluation, every process segments its own share of the images with a Segmenter over the job's mesh.
_SEGMENT = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
import numpy as np
from flowseg_jax import inference, main
spec = json.loads(sys.argv[1])
code = main.run(spec["argv"])
seg = inference.Segmenter.from_workdir(spec["argv"][spec["argv"].index("--workdir") + 1])
with np.load(spec["images"]) as z:
  images = [z[k] for k in z.files]
mine = [(i, images[i], None) for i in range(jax.process_index(), len(images), jax.process_count())]
labels = {str(k): lab for k, _, lab, _ in seg.segment_stream(mine, len(mine))}
np.savez(f"{spec['out']}.{jax.process_index()}.npz", **labels)

def unreadable():  # process 1 cannot read its second image
  yield mine[0]
  raise OSError("image 99 cannot be read (process 1 only)")

try:
  list(seg.segment_stream(unreadable() if jax.process_index() else iter(mine), 2))
except Exception as e:
  with open(f"{spec['out']}.{jax.process_index()}.error", "w") as f:
    f.write(f"{type(e).__name__}: {e}")
sys.exit(code)
"""


def test_evaluate_and_segmenter_on_two_processes_equal_one(trained, tmp_path):
  """`flowseg evaluate --distributed` on 2 processes (FSDP over both) writes the metrics of the
  1-process evaluation; a Segmenter over the 2-process mesh, each process segmenting its own images
  (of different sizes, so the processes have different numbers of windows), returns the 1-process
  label maps. An error reading one process's image then reaches both processes."""
  workdir, one = trained
  two_dir = str(tmp_path / "run")
  shutil.copytree(workdir, two_dir)
  shutil.rmtree(os.path.join(two_dir, "eval"))
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(32, 32), (40, 24), (20, 36)]]
  np.savez(tmp_path / "images.npz", *images)
  seg = inference.Segmenter.from_workdir(workdir)
  want = [seg(image) for image in images]

  spec = {"images": str(tmp_path / "images.npz"), "out": str(tmp_path / "labels")}
  codes, outputs, _ = launch_two(["evaluate", "--workdir", two_dir], script=_SEGMENT, spec=spec)
  assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
  with open(one["path"]) as f:
    want_metrics = json.load(f)
  with open(os.path.join(two_dir, "eval", os.path.basename(one["path"]))) as f:
    got_metrics = json.load(f)
  for key in ("aAcc", "mIoU", "mAcc", "num_examples"):
    assert got_metrics[key] == pytest.approx(want_metrics[key], abs=1e-3), key
  got = {}
  for i in range(2):
    with np.load(tmp_path / f"labels.{i}.npz") as z:
      got.update({int(k): z[k] for k in z.files})
  assert sorted(got) == [0, 1, 2]
  for k, labels in enumerate(want):
    np.testing.assert_array_equal(got[k], labels)
  errors = [(tmp_path / f"labels.{i}.error").read_text() for i in range(2)]
  assert errors == [
    "PeerError: process 1 of 2 stopped the run: OSError: image 99 cannot be read (process 1 only)",
    "OSError: image 99 cannot be read (process 1 only)",
  ]
