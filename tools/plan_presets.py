"""Plans of the paper configs' `:target=` presets from the real compiler of each preset's hardware.

Every preset of `configs/flowseg_ade20k.py` TARGETS (cocostuff shares them) names its hardware in
HARDWARE (a `tools/compile_targets.py` target: a TPU topology or a GPU target config). For each
config, stage and preset this compiles the train step and the sampler with that compiler through
`tools.scale` (compile-only devices: no TPU or GPU is needed) and, with `--cpu`, the same program on
as many XLA:CPU host devices, and writes one table: per device arguments / temporaries / peak,
the fit against the chip's memory, XLA:CPU's peak and how far it is off, compile times, the
eval peak (the larger of the sampler's and the scorer's, `tools.scale.plan_sampler`) and the cuDNN
fused-attention calls of the GPU programs.

The TPU and GPU compilers live in different installs (libtpu; the CUDA plugin), so each kind of
target runs under its own interpreter (`--tpu-python`, `--gpu-python`; default this one). Rows
are kept in `--json` as they finish and a rerun plans only what is missing (`--redo` all);
`--also-json` adds rows of other runs (e.g. `tools.scale --json` plans of a changed preset), and
`--keep-table benchmarks/RESULTS.md` keeps that file's table rows for presets no JSON plans and
does not compile them again (a preset whose mesh or remat changed is not kept: its old row planned
another program).

  python -m tools.plan_presets --tpu-python VENV_TPU/bin/python \\
    --gpu-python VENV_GPU/bin/python --cpu --json plans.json --markdown plans.md

(VENV_TPU: this project plus `pip install "jax[tpu]==<our jax>"`; VENV_GPU: plus
`pip install "jax[cuda12]==<our jax>"`, run with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys

from tools import compile_targets, scale

REPO = compile_targets.REPO
CONFIGS = ("configs/flowseg_ade20k.py", "configs/flowseg_cocostuff.py")


def presets() -> tuple[dict, dict]:
  """(TARGETS, HARDWARE) of configs/flowseg_ade20k.py (the cocostuff config loads that file)."""
  path = os.path.join(REPO, "configs", "flowseg_ade20k.py")
  spec = importlib.util.spec_from_file_location("flowseg_ade20k_presets", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.TARGETS, module.HARDWARE


def cases(configs, stages, names=None) -> list[dict]:
  """One case per (config, stage, preset with that stage)."""
  targets, hardware = presets()
  out = []
  for config in configs:
    for stage in stages:
      for name, by_stage in targets.items():
        if stage in by_stage and (not names or name in names):
          out.append(
            dict(config=config, stage=stage, preset=name, target=hardware[name], **by_stage[stage])
          )
  return out


def spec(case: dict) -> str:
  return f"{case['config']}:stage={case['stage']},target={case['preset']}"


def compile_target(case: dict, compiler: str) -> str:
  """The preset's own hardware ('native') or as many XLA:CPU host devices ('cpu')."""
  return str(_device_count(case["target"])) if compiler == "cpu" else case["target"]


def find(rows: list[dict], case: dict, compiler: str) -> dict | None:
  """The newest row planning this case's program (config, preset, mesh, remat) for the compiler;
  an error row only when no row succeeded. Rows of `tools.scale --json` files count too."""
  target, found = compile_target(case, compiler), None
  for row in reversed(rows):
    if row.get("config") != spec(case) or row.get("target", str(row.get("devices"))) != target:
      continue
    if "error" in row:
      found = found or row
    elif (row["data"], row["fsdp"], row["remat"]) == (case["data"], case["fsdp"], case["remat"]):
      return row
  return found


def load_rows(paths) -> list[dict]:
  """Rows of plan_presets / tools.scale JSON files (missing files hold none)."""
  out = []
  for path in paths:
    if path and os.path.exists(path):
      with open(path) as f:
        rows = json.load(f)["rows"]
      out.extend(rows.values() if isinstance(rows, dict) else rows)
  return out


def plan(case: dict, compiler: str, args) -> dict:
  """One row: the case compiled for its own hardware ('native') or on XLA:CPU host devices."""
  target = compile_target(case, compiler)
  python = {"tpu": args.tpu_python, "gpu": args.gpu_python}.get(compile_targets.parse(target)[0])
  options = argparse.Namespace(
    remat=None, fsdp=[case["fsdp"]], sampler=True, set={}, timeout=args.timeout
  )
  (row,) = scale.run_target(options, target, spec(case), python=python or sys.executable)
  return row


def _device_count(target: str) -> int:
  """Devices of a target without its compiler: the preset names them (e.g. v5e-8: 8)."""
  kind, rest = compile_targets.parse(target)
  if kind == "gpu":
    return int(rest.rsplit(":", 1)[1])
  chips = 1
  for d in rest.split(":")[1].split("x"):
    chips *= int(d)
  return chips


def marked_table(path: str, marker: str) -> list[dict]:
  """The rows (header -> cell text) of the markdown table between `<!-- marker -->` and
  `<!-- /marker -->` in a file."""
  with open(path) as f:
    text = f.read()
  body = text.split(f"<!-- {marker} -->", 1)[1].split(f"<!-- /{marker} -->", 1)[0]
  lines = [line.strip().strip("|").split("|") for line in body.strip().splitlines()]
  header = [h.strip() for h in lines[0]]
  return [dict(zip(header, (c.strip() for c in cells))) for cells in lines[2:]]


def cpu_table_peaks(path: str) -> dict[tuple, float]:
  """XLA:CPU peaks (GiB) of the host-device plan table in benchmarks/RESULTS.md (between
  `<!-- plan table -->` markers), by (config file, stage, N, 'DATAxFSDP', remat): the figures
  `tools.scale` printed for the same programs, used when `--cpu` does not recompile them."""
  out = {}
  for row in marked_table(path, "plan table"):
    m = re.fullmatch(r"(\w+) stage=(\d)", row["config"])
    if m and row["peak GiB"]:
      k = (f"configs/flowseg_{m[1]}.py", m[2], int(row["N"]), row["data x fsdp"], row["remat"])
      out.setdefault(k, float(row["peak GiB"]))
  return out


def kept_lines(path: str) -> dict[tuple, dict]:
  """The planned lines of the compiler plan table in benchmarks/RESULTS.md (between
  `<!-- compiler plan table -->` markers), by (config stage, preset, data x fsdp, remat), as
  `table` makes them: earlier runs' rows whose JSON is gone are kept, not compiled again."""
  keys = {header: key for key, header in COLUMNS}
  out = {}
  for row in marked_table(path, "compiler plan table"):
    line = {keys[h]: cell for h, cell in row.items() if h in keys and cell}
    if "peak" in line:
      out[line["config"], line["preset"], line["mesh"], line["remat"]] = line
  return out


def line_key(case: dict) -> tuple[str, str, str, str]:
  """The table cells naming a case's program: config and stage, preset, mesh, remat/attention."""
  return (
    f"{os.path.basename(case['config'])[len('flowseg_') : -3]} {case['stage']}",
    case["preset"],
    f"{case['data']}x{case['fsdp']}",
    case["remat"] + (", cuDNN attn" if case.get("attention") == "cudnn" else ""),
  )


def table(cases_: list[dict], rows: list[dict], cpu_peaks: dict | None = None) -> list[dict]:
  out = []
  for case in cases_:
    native, cpu = find(rows, case, "native"), find(rows, case, "cpu")
    line = dict(zip(("config", "preset", "mesh", "remat"), line_key(case)), target=case["target"])
    if native is None or "error" in native:
      line["note"] = native["error"] if native else "not planned"
      out.append(line)
      continue
    m, t = native["train"]["memory"], native["train"]
    peak = m["peak_bytes"]
    line.update(
      args=scale._gib(m["argument_bytes"]),
      temp=scale._gib(m["temp_bytes"]),
      peak=scale._gib(peak),
      fit=f"{native['fit']} ({native['device_gib']:.0f})",
      compile=f"{t['compile_s']:.0f}",
    )
    if "sampler" in native:
      line["sampler"] = scale._gib(native["sampler"]["eval_peak_bytes"])
    if case["target"].startswith("gpu:"):
      line["fused"] = str(t["fused_attention"])
    cpu_peak = None
    if cpu and "error" not in cpu:
      cpu_peak = cpu["train"]["memory"]["peak_bytes"]
      line["cpu_compile"] = f"{cpu['train']['compile_s']:.0f}"
    else:  # the host-device plan table's figure for the same program, if it has one
      n, mesh = case["data"] * case["fsdp"], f"{case['data']}x{case['fsdp']}"
      gib = (cpu_peaks or {}).get((case["config"], case["stage"], n, mesh, case["remat"]))
      cpu_peak = None if gib is None else gib * scale.GIB
    if cpu_peak is not None:
      line["cpu_peak"] = scale._gib(cpu_peak)
      line["cpu_over"] = f"{round(100 * (cpu_peak / peak - 1)) or 0:+d} %"
    out.append(line)
  return out


COLUMNS = [
  ("config", "config stage"),
  ("preset", "preset"),
  ("target", "compiler target"),
  ("mesh", "data x fsdp"),
  ("remat", "remat"),
  ("args", "args GiB"),
  ("temp", "temp GiB"),
  ("peak", "peak GiB"),
  ("fit", "fit (GiB/chip)"),
  ("cpu_peak", "XLA:CPU peak GiB"),
  ("cpu_over", "CPU vs real"),
  ("compile", "compile s"),
  ("cpu_compile", "CPU compile s"),
  ("sampler", "eval peak GiB"),
  ("fused", "fused attn calls"),
  ("note", "note"),
]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--configs", default=",".join(CONFIGS))
  p.add_argument("--stages", default="1,2")
  p.add_argument("--presets", default=None, help="only these presets, e.g. v5e-8,h100-8")
  p.add_argument("--cpu", action="store_true", help="also compile each on XLA:CPU host devices")
  p.add_argument(
    "--cpu-table",
    default=os.path.join(REPO, "benchmarks", "RESULTS.md"),
    help="without --cpu: XLA:CPU figures from this file's host-device plan table",
  )
  p.add_argument("--tpu-python", default=None, help="interpreter with libtpu")
  p.add_argument("--gpu-python", default=None, help="interpreter with jax[cuda12]")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per compile worker")
  p.add_argument("--json", required=True, help="rows so far (read, extended, rewritten)")
  p.add_argument(
    "--also-json",
    action="append",
    default=[],
    help="more rows to use (read only): other plan_presets or tools.scale --json files",
  )
  p.add_argument(
    "--keep-table",
    default=None,
    help="keep the planned rows of this file's compiler plan table (e.g. benchmarks/RESULTS.md)"
    " for presets the JSON files have no row of",
  )
  p.add_argument("--markdown", default=None, help="write the table to this file")
  p.add_argument("--redo", action="store_true", help="recompile rows already in --json")
  p.add_argument("--table-only", action="store_true", help="plan nothing: tabulate the rows")
  args = p.parse_args(argv)
  args.configs = args.configs.split(",")
  args.stages = args.stages.split(",")
  args.presets = args.presets.split(",") if args.presets else None
  return args


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  rows = load_rows(args.also_json + ([] if args.redo else [args.json]))
  todo = cases(args.configs, args.stages, args.presets)
  kept = kept_lines(args.keep_table) if args.keep_table else {}
  for case in [] if args.table_only else todo:
    for compiler in ("native", "cpu") if args.cpu else ("native",):
      done = find(rows, case, compiler)
      if done is not None and "error" not in done:
        continue
      if compiler == "native" and line_key(case) in kept and not args.redo:
        continue
      rows.append(plan(case, compiler, args))
      print(json.dumps({"planned": scale._short(rows[-1])}), flush=True)
      with open(args.json, "w") as f:
        json.dump({"benchmark": "plan_presets", "rows": rows}, f, indent=1)
  cpu_peaks = None if args.cpu or not args.cpu_table else cpu_table_peaks(args.cpu_table)
  lines = table(todo, rows, cpu_peaks)
  for i, (case, line) in enumerate(zip(todo, lines)):  # a compiled row wins over a kept one
    if line.get("note") == "not planned" and line_key(case) in kept:
      lines[i] = kept[line_key(case)]
  text = scale.markdown(lines, COLUMNS)
  print(text)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(text + "\n")
  return lines


if __name__ == "__main__":
  main()
