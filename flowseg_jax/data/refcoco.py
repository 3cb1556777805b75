"""RefCOCO / RefCOCO+ / RefCOCOg annotations: the `refs(<split_by>).p` pickle, converted to JSON.

The referring-expression annotations are distributed as Python pickles (`refs(unc).p`,
`refs(umd).p`, `refs(google).p`). Unpickling runs whatever the file names, so the pickle is read
once by `SafeUnpickler`, which refuses every class and function (`find_class` always raises) and
persistent ids, after a scan of the opcode stream has refused every opcode that imports, calls or
builds objects (defence in depth: e.g. EXT* codes can reach a cached callable without
`find_class`); the result is then checked to be plain data only — dicts with string keys, lists,
tuples, strings, numbers, booleans and None — and written as JSON, which the data pipeline reads
from then on.

Each ref is a dict like {'ref_id', 'ann_id', 'image_id', 'category_id', 'split', 'file_name',
'sent_ids', 'sentences': [{'sent_id', 'sent', 'raw', 'tokens'}]}; `ann_id` points at the COCO
train2014 instance (mask) in `instances.json`. Python 2 byte strings are decoded as UTF-8
(Latin-1 when that fails).

CLI: `python -m flowseg_jax.data.refcoco refs(unc).p refs_unc.json`.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import sys
from typing import Any

REQUIRED_REF_KEYS = ("ref_id", "ann_id", "image_id", "split", "sentences")
MAX_DEPTH = 64
# Opcodes that import a global, call something, build an object or use an extension/persistent id.
_REFUSED_OPCODES = frozenset(
  "GLOBAL STACK_GLOBAL INST OBJ REDUCE NEWOBJ NEWOBJ_EX BUILD EXT1 EXT2 EXT4 PERSID BINPERSID".split()
)


class UnsafePickleError(ValueError):
  """The pickle holds something other than plain data (or is not a refs file)."""


class SafeUnpickler(pickle.Unpickler):
  """An Unpickler that can build only the values pickle encodes natively (containers, numbers,
  strings, bytes, None): every global (class or function) and persistent id is refused, so no
  code named by the file runs."""

  def find_class(self, module: str, name: str):
    raise UnsafePickleError(f"refused to load the global {module}.{name} (plain data only)")

  def persistent_load(self, pid):
    raise UnsafePickleError(f"refused persistent id {pid!r} (plain data only)")


def safe_loads(data: bytes, *, source: str = "pickle") -> Any:
  """Unpickles plain data with `SafeUnpickler` and returns it JSON-ready (tuples as lists,
  bytes decoded).

  Raises:
    UnsafePickleError: a global, persistent id or non-plain value (e.g. a set) is present.
  """
  try:
    for op, arg, pos in pickletools.genops(data):
      if op.name in _REFUSED_OPCODES:
        shown = f" {arg!r}" if arg is not None else ""
        raise UnsafePickleError(f"refused opcode {op.name}{shown} at byte {pos} (plain data only)")
    obj = SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
  except UnsafePickleError as e:
    raise UnsafePickleError(f"{source}: {e}") from None
  except (pickle.UnpicklingError, EOFError, ValueError, IndexError, KeyError) as e:
    raise UnsafePickleError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None
  return _plain(obj, source, "", 0)


def _decode(b: bytes) -> str:
  try:
    return b.decode("utf-8")
  except UnicodeDecodeError:
    return b.decode("latin-1")


def _plain(obj: Any, source: str, where: str, depth: int) -> Any:
  if depth > MAX_DEPTH:
    raise UnsafePickleError(f"{source}: nesting deeper than {MAX_DEPTH} at {where or 'top'}")
  if obj is None or isinstance(obj, bool | str):
    return obj
  if isinstance(obj, int | float):
    return obj
  if isinstance(obj, bytes | bytearray):
    return _decode(bytes(obj))
  if isinstance(obj, list | tuple):
    return [_plain(v, source, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      key = _decode(k) if isinstance(k, bytes) else k
      if not isinstance(key, str):
        raise UnsafePickleError(f"{source}: non-string dict key {key!r} at {where or 'top'}")
      out[key] = _plain(v, source, f"{where}.{key}", depth + 1)
    return out
  raise UnsafePickleError(
    f"{source}: {type(obj).__name__} at {where or 'top'} is not plain data "
    "(dict, list, tuple, str, bytes, int, float, bool, None)"
  )


def load_refs_pickle(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a `refs(*).p` file safely and checks that it is a list of refs."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    refs = safe_loads(f.read(), source=path)
  if not isinstance(refs, list):
    raise UnsafePickleError(f"{path}: expected a list of refs, got a {type(refs).__name__}")
  for i, ref in enumerate(refs):
    missing = [k for k in REQUIRED_REF_KEYS if not isinstance(ref, dict) or k not in ref]
    if missing:
      raise UnsafePickleError(f"{path}: ref {i} lacks {missing}; is this a refs(*).p file?")
  return refs


def convert_refs(pickle_path: str | os.PathLike, json_path: str | os.PathLike) -> int:
  """Converts a refs pickle to JSON (written atomically); returns the number of refs."""
  refs = load_refs_pickle(pickle_path)
  json_path = os.fspath(json_path)
  tmp = json_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(refs, f, ensure_ascii=False)
  os.replace(tmp, json_path)
  return len(refs)


def load_refs_json(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The converted refs."""
  with open(os.fspath(path), encoding="utf-8") as f:
    return json.load(f)


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print("usage: python -m flowseg_jax.data.refcoco REFS.p OUT.json", file=sys.stderr)
    return 2
  try:
    n = convert_refs(argv[0], argv[1])
  except (UnsafePickleError, OSError) as e:
    print(f"refcoco: error: {e}", file=sys.stderr)
    return 1
  print(f"Converted {n} refs from {argv[0]} to {argv[1]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
