"""experiments/study.py: runs settings x seeds end to end, skips finished runs, reports their own numbers."""

import json
import math
import os
import shutil

import jax
import pytest
import scipy.stats

from experiments import stats, study, study_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_table3_sampling_is_collected_from_its_eval_files(tiny_study):
  """`sampling` evaluates trained runs with other Euler step counts; the report reads each
  evaluation's own json (a name keyed by steps and mode) into Table 3."""
  study.sampling_all(tiny_study, "static", [0, 1], [1, 2])
  rep = study_report.report(tiny_study, plots=False)
  table = rep["sampling"]["static"]
  assert sorted(table) == [1, 2]
  for n in (1, 2):
    for seed in (0, 1):
      target = os.path.join(study.run_dir(tiny_study, "static", seed), "sampling", f"steps_{n}")
      with open(study.sampling_json(target, 2, n)) as f:
        saved = json.load(f)
      assert saved["num_steps"] == n
      assert table[n]["per_seed"][seed] == pytest.approx(100 * saved["mIoU"], abs=1e-12)


def test_finished_runs_are_skipped(tiny_study, capsys):
  path = os.path.join(study.run_dir(tiny_study, "static", 0), "eval", "step_2.json")
  before = os.path.getmtime(path)
  study.train_all(tiny_study, "smoke", ["static", "vanilla"], [0, 1], 2, parallel=0, threads=1)
  assert "0 runs to do" in capsys.readouterr().out
  assert os.path.getmtime(path) == before


def test_paired_test_matches_scipy_on_fixed_numbers():
  """The x- vs v-prediction seeds of STUDY.md: scipy's two-sided paired t, and its 95 % interval."""
  v_pred, x_pred = {0: 9.14, 1: 8.61, 2: 7.88}, {0: 12.58, 1: 12.30, 2: 9.39}
  c = stats.compare(v_pred, x_pred)
  ref = scipy.stats.ttest_rel(list(v_pred.values()), list(x_pred.values()))
  assert c["test"] == "paired" and c["df"] == 2
  assert c["t"] == pytest.approx(ref.statistic, rel=1e-12)
  assert c["p"] == pytest.approx(ref.pvalue, rel=1e-12)  # two-sided: 0.053, not < 0.05
  assert 0.05 < c["p"] < 0.06
  low, high = ref.confidence_interval(0.95)
  assert (c["ci_low"], c["ci_high"]) == (pytest.approx(low), pytest.approx(high))
  assert c["ci_low"] < 0 < c["ci_high"]  # the interval holds 0, as p > 0.05 says
  # Seeds that do not pair up: the pooled two-sample t (df 4).
  a, b = {0: 30.0, 1: 31.0, 2: 32.5}, {3: 27.0, 4: 28.5, 5: 29.0}
  c = stats.compare(a, b)
  ref = scipy.stats.ttest_ind(list(a.values()), list(b.values()))
  assert c["test"] == "unpaired" and c["df"] == 4
  assert (c["t"], c["p"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
  low, high = ref.confidence_interval(0.95)
  assert (c["ci_low"], c["ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_holm_matches_its_definition_and_verdicts_use_it():
  p = [0.01, 0.04, 0.03, 0.005]
  # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max.
  assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
  assert stats.verdict(+1.0, 0.01) == "agrees" and stats.verdict(-1.0, 0.01) == "disagrees"
  assert stats.verdict(+1.0, 0.2) == "same direction, not resolved"
  assert stats.verdict(-1.0, 0.2) == "opposite direction, not resolved"
  assert stats.verdict(0.0, 1.0) == "no difference"
  # A claim significant alone (p 0.02) is not after correction within a family of three.
  claims = [
    stats.compare({0: 3.0, 1: 3.1, 2: 3.3}, {0: 1.0, 1: 1.2, 2: 1.2}),
    stats.compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.2, 1: 2.2, 2: 2.7}),
    stats.compare({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}),
    stats.compare({0: 5.0}, {0: 4.0}),
  ]
  assert claims[0]["p"] < 0.05
  stats.adjust_claims(claims)
  assert claims[0]["p_holm"] == pytest.approx(3 * claims[0]["p"])
  assert [c["verdict"] for c in claims] == [
    "agrees" if 3 * claims[0]["p"] < 0.05 else "same direction, not resolved",
    "opposite direction, not resolved",
    "no difference",
    "n < 2",
  ]
  every_seed = stats.compare({0: 30.0, 1: 31.0, 2: 32.0}, {0: 27.0, 1: 28.0, 2: 29.0})
  assert every_seed["t"] == math.inf and every_seed["p"] == 0.0  # +3 in every seed


def test_report_recomputes_from_a_report_json(tmp_path):
  """The committed report.json regenerates its tables: same rows, Holm-adjusted two-sided claims."""
  source = os.path.join(REPO, "experiments", "study", "report.json")
  rep = study_report.report(
    str(tmp_path), plots=False, results=study_report.results_from_report(source)
  )
  old = json.load(open(source))
  assert {g: [r["per_seed"] for r in t] for g, t in rep["rows"].items()} == {
    g: [{int(k): v for k, v in r["per_seed"].items()} for r in t] for g, t in old["rows"].items()
  }
  claims = {c["claim"]: c for c in rep["claims"]}
  x_vs_v = claims["Table 2: v-prediction 29.75 > x-prediction 29.06"]
  assert x_vs_v["p"] == pytest.approx(0.053, abs=5e-4) and x_vs_v["p_holm"] >= x_vs_v["p"]
  assert all(c["p_holm"] >= 0.05 for c in rep["claims"])  # none survives Holm at 3 seeds


def test_report_adds_the_seeds_of_a_recorded_report(tiny_study, tmp_path):
  """`report --with-report`: seeds whose run folders are gone come from a report.json, the runs
  that are there override the seeds they share, Table 3's step counts merge per step count."""
  recorded = {
    "static": {0: {"mIoU": 1.0, "steps": 2, "sampling": {7: 4.0}}, 2: {"mIoU": 50.0, "steps": 2}},
    "vanilla": {2: {"mIoU": 40.0, "steps": 5}},  # a longer run, as a merged study may hold
  }
  (tmp_path / "old").mkdir()
  study_report.report(str(tmp_path / "old"), plots=False, results=recorded)
  out = str(tmp_path / "study")
  shutil.copytree(os.path.join(tiny_study, "runs"), os.path.join(out, "runs"))
  study.sampling_all(out, "static", [0], [1])
  runs = study_report.collect(out)
  study.main(["report", "--out", out, "--with-report", str(tmp_path / "old" / "report.json")])
  rep = json.load(open(os.path.join(out, "report.json")))
  rows = {r["setting"]: r for r in rep["rows"]["table2"]}
  assert rows["static"]["per_seed"] == pytest.approx(
    {"0": runs["static"][0]["mIoU"], "1": runs["static"][1]["mIoU"], "2": 50.0}
  )
  assert rows["vanilla"]["per_seed"]["2"] == 40.0 and rows["vanilla"]["n"] == 3
  assert rows["vanilla"]["steps"] == [2, 5]
  assert "| vanilla FM | `vanilla` | 2, 5 | " in open(os.path.join(out, "report.md")).read()
  claim = next(c for c in rep["claims"] if c["worse"] == "vanilla")
  assert claim["n"] == 3  # paired over the three seeds both settings have
  assert rep["sampling"]["static"]["7"]["per_seed"] == {"0": 4.0}
  assert rep["sampling"]["static"]["1"]["per_seed"]["0"] == runs["static"][0]["sampling"][1]


def test_settings_build_the_ablations_they_name():
  static = study.run_config("demo", "static", 3, 100)
  assert static.seed == 3 and static.total_steps == 100 and static.eval_every_steps == 50
  assert static.ckpt_every_steps == 50  # at the middle evaluation
  long_run = study.run_config("demo", "static", 0, 27000)
  assert long_run.ckpt_every_steps == 3000  # a killed long run loses at most 3000 steps
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


def test_class_count_settings_and_the_gain_claim():
  """static_c48 is static at 48 classes; the gain claim pairs (static - vanilla) per seed at N
  classes with the same seed's gain at 12."""
  c48 = study.run_config("demo", "static_c48", 1, 10)
  assert c48.input.synthetic.num_classes == 48 and c48.objective.target == "static"
  assert study.run_config("demo", "vanilla_c24", 1, 10).input.synthetic.num_classes == 24
  scores = {"static": [60, 62, 61], "vanilla": [58, 59, 59], "static_c48": [40, 45, 41],
            "vanilla_c48": [30, 34, 33]}  # fmt: skip
  results = {s: {k: {"mIoU": float(v)} for k, v in enumerate(vals)} for s, vals in scores.items()}
  [claim] = study_report.gain_claims(results)  # 24 classes did not run: no claim
  gains48, gains12 = [10, 11, 8], [2, 3, 2]
  want = stats.compare(dict(enumerate(map(float, gains48))), dict(enumerate(map(float, gains12))))
  assert claim["diff"] == pytest.approx(22 / 3) and claim["p"] == pytest.approx(want["p"])
  assert claim["better"] == "gain@48" and "48 classes" in claim["claim"]


def test_claims_about_a_setting_that_did_not_train_get_no_verdict(tmp_path):
  """Two 48-class models at chance that differ by the same 0.4 points in every seed 'resolve' the
  test; the verdict says the claim is not a test of the method, and the claim stays in the family
  (the trained claims' Holm p is computed over all of them)."""
  scores = {"static": [60, 66, 61], "vanilla": [50, 59, 53], "static_c48": [3.0, 3.3, 2.9],
            "vanilla_c48": [2.6, 2.9, 2.5]}  # fmt: skip
  results = {
    s: {k: {"mIoU": v, "steps": 10} for k, v in enumerate(vals)} for s, vals in scores.items()
  }
  rep = study_report.report(str(tmp_path), plots=False, results=results)
  claims = {c["claim"]: c for c in rep["claims"]}
  at48 = claims["reshaping beats vanilla flow matching at 48 classes"]
  assert at48["p_holm"] < 0.05  # the test alone would call it resolved
  assert at48["verdict"].startswith("not a test: did not train")
  assert "`static_c48` 3.1 %" in at48["verdict"] and "`vanilla_c48` 2.7 %" in at48["verdict"]
  gain = claims["reshaping gains more at 48 classes than at 12 (the paper's motivation)"]
  assert gain["verdict"].startswith("not a test") and "`static`" not in gain["verdict"]
  trained = claims["reshaping beats vanilla flow matching (Table 2)"]
  assert "not a test" not in trained["verdict"]
  assert all("p" in c for c in rep["claims"])  # every claim was tested, the untrained ones too
  adjusted = stats.holm([c["p"] for c in rep["claims"]])
  assert trained["p_holm"] == pytest.approx(adjusted[rep["claims"].index(trained)])
