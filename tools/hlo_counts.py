"""Counts in optimised HLO text: collective result bytes (loop bodies times their trip counts) and
cuDNN fused-attention calls; for tools/scale.py."""

from __future__ import annotations

import collections
import re

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# The cuDNN fused-attention custom calls (forward, backward) in optimised GPU HLO.
_FUSED_ATTENTION = re.compile(r'custom_call_target="__cudnn\$fmha[^"]*"')
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_DTYPE_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_SHAPE = re.compile(r"\b(pred|[sufb]f?\d+)\[([\d,]*)\]")
_CALL = re.compile(
  r"\b(?:body|to_apply|calls|branch_computations|true_computation|false_computation)=\{?%?([\w.\-, %]+)\}?"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """Bytes of the results of each collective kind per device and step.

  A collective inside a while loop counts its known trip count times (loops nest); one inside a
  conditional branch counts once. Asynchronous pairs are counted at their `-start` (the result
  shape of a start op is a tuple holding the operand and the result: the larger half is taken).
  """
  computations: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    m = _HEADER.match(line)
    if m and not line.startswith(" "):
      current = m.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
    elif current is not None and line.startswith(" "):
      computations[current].append(line)
  if entry is None:
    return {}
  multiplier = collections.Counter({entry: 1})
  order, seen = [entry], {entry}
  while order:  # breadth-first over the call graph: callers before callees
    name = order.pop(0)
    for line in computations.get(name, []):
      trip = 1
      if " while(" in line:
        t = _TRIP.search(line)
        trip = int(t.group(1)) if t else 1
      for group in _CALL.findall(line):
        for callee in (c.strip().lstrip("%") for c in group.split(",")):
          if callee in computations:
            multiplier[callee] += multiplier[name] * trip
            if callee not in seen:
              seen.add(callee)
              order.append(callee)
  out: dict[str, int] = collections.Counter()
  for name, lines in computations.items():
    for line in lines:
      for kind in COLLECTIVES:
        if re.search(rf"\s{kind}(-start)?\(", line):
          lhs = line.split("=", 1)[1].split(kind, 1)[0]
          nbytes = _shape_bytes(lhs)
          if f"{kind}-start(" in line:
            halves = [_shape_bytes(m.group(0)) for m in _SHAPE.finditer(lhs)]
            nbytes = max(halves) if halves else nbytes
          out[kind] += nbytes * max(multiplier[name], 1)
          break
  return dict(out)


def fused_attention_calls(hlo_text: str) -> int:
  """cuDNN fused-attention custom calls (forward and backward) in an optimised GPU HLO module."""
  return len(_FUSED_ATTENTION.findall(hlo_text))
