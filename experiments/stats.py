"""The study's statistics: two-sided tests of claims over seeds, 95 % intervals, Holm's correction.

A claim says "A scores higher than B". Seeds pair up (seed k fixes the initialisation and the data
order of every setting), so when at least two seeds ran both settings the test is Student's paired
t on the per-seed differences (df = n − 1); otherwise the two-sample t with the pooled variance
(df = n_A + n_B − 2). Both are two-sided: a result in either direction must clear the same bar.
The 95 % confidence interval is that of the mean paired difference (or of the difference of means).
A study makes many claims at once, so their p-values are adjusted together by Holm's step-down
method (family-wise error rate 5 %, valid under any dependence), and verdicts use the adjusted p.
"""

from __future__ import annotations

import math
import statistics

from scipy import stats as scipy_stats

ALPHA = 0.05


def _t_test(mean: float, scale: float, df: int) -> tuple[float, float, float]:
  """(t, two-sided p, half-width of the 95 % interval) of `mean` with standard error `scale`."""
  half = scipy_stats.t.ppf(1 - ALPHA / 2, df) * scale
  if scale > 1e-12:
    t = mean / scale
    return t, float(2 * scipy_stats.t.sf(abs(t), df)), float(half)
  if abs(mean) <= 1e-12:  # every seed scored the same in both settings
    return 0.0, 1.0, 0.0
  return math.copysign(math.inf, mean), 0.0, 0.0  # the same non-zero difference in every seed


def compare(better: dict, worse: dict) -> dict:
  """The claim `better > worse` from {seed: score} of each setting.

  Returns diff (paired mean difference, or difference of means), its 95 % interval (ci_low,
  ci_high), t, df, the two-sided p, test ('paired' / 'unpaired'), n, and the per-setting means and
  sample stds; {'test': 'n < 2', ...} where no test is possible.
  """
  a, b = list(better.values()), list(worse.values())
  out = {
    "mean_better": statistics.fmean(a) if a else math.nan,
    "mean_worse": statistics.fmean(b) if b else math.nan,
  }
  common = sorted(set(better) & set(worse))
  if len(common) >= 2:
    diffs = [better[k] - worse[k] for k in common]
    n = len(diffs)
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    t, p, half = _t_test(mean, sd / math.sqrt(n), n - 1)
    out.update(test="paired", n=n, diff=mean, std=sd, df=n - 1)
  elif len(a) >= 2 and len(b) >= 2:
    na, nb = len(a), len(b)
    pooled = math.sqrt(
      ((na - 1) * statistics.variance(a) + (nb - 1) * statistics.variance(b)) / (na + nb - 2)
    )
    mean = out["mean_better"] - out["mean_worse"]
    t, p, half = _t_test(mean, pooled * math.sqrt(1 / na + 1 / nb), na + nb - 2)
    out.update(test="unpaired", n=min(na, nb), diff=mean, std=pooled, df=na + nb - 2)
  else:
    return {**out, "test": "n < 2", "diff": out["mean_better"] - out["mean_worse"]}
  return {**out, "t": t, "p": p, "ci_low": mean - half, "ci_high": mean + half}


def holm(pvalues: list[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the input's order (monotone, at most 1)."""
  m = len(pvalues)
  order = sorted(range(m), key=lambda i: pvalues[i])
  adjusted = [0.0] * m
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * pvalues[i]))
    adjusted[i] = running
  return adjusted


def verdict(diff: float, p_adjusted: float | None) -> str:
  """The verdict of a claim `better > worse` from its difference and Holm-adjusted p."""
  if p_adjusted is None or math.isnan(p_adjusted):
    return "n < 2"
  if p_adjusted < ALPHA:
    return "agrees" if diff > 0 else "disagrees"
  if diff > 0:
    return "same direction, not resolved"
  if diff < 0:
    return "opposite direction, not resolved"
  return "no difference"


def adjust_claims(claims: list[dict]) -> None:
  """Adds `p_holm` and `verdict` to each tested claim, the family being all of them."""
  tested = [c for c in claims if "p" in c]
  for c, p_adj in zip(tested, holm([c["p"] for c in tested]), strict=True):
    c["p_holm"] = p_adj
    c["verdict"] = verdict(c["diff"], p_adj)
  for c in claims:
    c.setdefault("verdict", "n < 2")
