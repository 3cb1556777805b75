"""experiments/study.py: runs settings x seeds end to end, skips finished runs, reports their own numbers."""

import json
import math
import os

import jax
import pytest

from experiments import study


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
  """2 settings x 2 seeds x 2 steps of the smoke demo, in this process (~1 min on 2 cores)."""
  out = str(tmp_path_factory.mktemp("study"))
  # Both seeds of a setting compile the same programs: the persistent cache serves the second one.
  jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    study.main(
      ["train", "--out", out, "--base", "smoke", "--settings", "static,vanilla"]
      + ["--seeds", "0,1", "--steps", "2", "--parallel", "0"]
    )
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
  return out


def test_report_holds_each_runs_own_eval_numbers(tiny_study):
  rep = json.load(open(os.path.join(tiny_study, "report.json")))
  rows = {r["setting"]: r for r in rep["rows"]["table2"]}
  assert set(rows) == {"static", "vanilla"}
  for setting, row in rows.items():
    own = {}
    for seed in (0, 1):
      workdir = study.run_dir(tiny_study, setting, seed)
      with open(os.path.join(workdir, "eval", "step_2.json")) as f:
        own[str(seed)] = 100 * json.load(f)["mIoU"]
      config = json.load(open(os.path.join(workdir, "config.json")))
      assert config["seed"] == seed and config["total_steps"] == 2
      assert config["objective"]["reshape"] == (setting == "static")
    assert row["per_seed"] == pytest.approx(own, abs=1e-12)
    assert row["n"] == 2 and row["mean"] == pytest.approx(sum(own.values()) / 2)
    values = list(own.values())
    assert row["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2), abs=1e-9)
  claim = next(c for c in rep["claims"] if c["worse"] == "vanilla")
  assert claim["diff"] == pytest.approx(rows["static"]["mean"] - rows["vanilla"]["mean"])
  assert os.path.getsize(os.path.join(tiny_study, "table2.png")) > 1000
  assert "| static + mask | `static` |" in open(os.path.join(tiny_study, "report.md")).read()


def test_finished_runs_are_skipped(tiny_study, capsys):
  path = os.path.join(study.run_dir(tiny_study, "static", 0), "eval", "step_2.json")
  before = os.path.getmtime(path)
  study.train_all(tiny_study, "smoke", ["static", "vanilla"], [0, 1], 2, parallel=0, threads=1)
  assert "0 runs to do" in capsys.readouterr().out
  assert os.path.getmtime(path) == before


def test_compare_statistics_and_verdicts():
  better = {0: 30.0, 1: 31.0, 2: 32.0}
  c = study.compare(better, {0: 27.0, 1: 28.0, 2: 29.0})
  assert c["diff"] == pytest.approx(3.0) and c["pooled_std"] == pytest.approx(1.0)
  assert c["t"] == pytest.approx(3.0 / math.sqrt(2 / 3))
  assert c["paired_t"] == math.inf and c["verdict"] == "agrees (p < 0.05)"  # every seed +3
  # Paired differences 0.5, 1.5, 1.0: mean 1, std 0.5, t = 1 / (0.5 / sqrt 3) = 3.46 > 2.920 (df 2).
  c = study.compare(better, {0: 29.5, 1: 29.5, 2: 31.0})
  assert c["paired_diff"] == pytest.approx(1.0) and c["paired_std"] == pytest.approx(0.5)
  assert c["paired_t"] == pytest.approx(2 * math.sqrt(3)) and c["verdict"] == "agrees (p < 0.05)"
  assert c["t"] < 2.132  # unpaired, the seed-to-seed spread hides it
  c = study.compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.2, 1: 2.2, 2: 2.7})
  assert c["verdict"] == "opposite direction, not significant"
  c = study.compare({0: 27.0, 1: 28.0, 2: 29.0}, {0: 30.0, 1: 31.5, 2: 32.0})
  assert c["verdict"] == "disagrees (p < 0.05)"
  # Seeds that do not pair up: the unpaired t (df 4) decides.
  c = study.compare({0: 30.0, 1: 31.0, 2: 32.0}, {3: 27.0, 4: 28.0, 5: 29.0})
  assert "paired_t" not in c and c["verdict"] == "agrees (p < 0.05)"
  assert study.compare({0: 2.0, 1: 2.0}, {0: 2.0, 1: 2.0})["verdict"] == "no difference"
  assert study.compare({0: 5.0}, {0: 4.0})["verdict"] == "n < 2"


def test_settings_build_the_ablations_they_name():
  static = study.run_config("demo", "static", 3, 100)
  assert static.seed == 3 and static.total_steps == 100 and static.eval_every_steps == 50
  assert study.run_config("demo", "annealing", 0, 10).objective.mask_ignored is False
  assert study.run_config("demo", "annealing", 0, 10).objective.target == "annealing"
  assert study.run_config("demo", "tau=0.5", 0, 10).objective.tau == 0.5
  assert study.run_config("demo", "eps=1e-3", 0, 10).objective.eps == 1e-3
  assert study.run_config("demo", "no_clip", 0, 10).optim.grad_clip_norm == 0.0
  assert study.run_config("demo", "norm_reduced", 0, 10).objective.transform == "norm_reduced"
  assert study.settings_of("fig5c", "no_clip") == [
    "static",
    "sqrt",
    "norm_reduced",
    "linear",
    "no_clip",
  ]
  with pytest.raises(ValueError, match="unknown setting"):
    study.settings_of("", "typo")
