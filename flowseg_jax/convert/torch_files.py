"""Reading PyTorch weight files for the converters: torch pickles (memory-mapped) and safetensors."""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import sys
from collections.abc import Mapping
from typing import Any

from flowseg_jax import storage

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux


def read(path: str | os.PathLike, what: str = "checkpoint") -> tuple[Mapping[str, Any], bool]:
  """Loads a `.safetensors` file or a torch pickle (`.ckpt`, `.pt`, `.pth`, weights only).

  Returns (the mapping, whether its tensors are views of a private memory map of the file). Torch
  zip files are memory-mapped, so no tensor is read until it is used (XL PixNerd `.ckpt` files are
  ~11 GB); legacy (non-zip) files are read whole. Safetensors come as torch tensors when torch is
  installed (bf16 needs it), else as NumPy arrays. `what` names the file in errors.
  """
  path = storage.local_only(path, what, "torch files are memory-mapped")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path!r} does not exist.")
  if path.endswith(".safetensors"):
    from safetensors import safe_open

    try:
      import torch  # noqa: F401

      framework = "pt"
    except ImportError:
      framework = "numpy"
    with safe_open(path, framework=framework) as f:
      return {k: f.get_tensor(k) for k in f.keys()}, False
  import torch

  try:
    obj, mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
  except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
    obj, mapped = torch.load(path, map_location="cpu", weights_only=True), False
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a dict of tensors or a checkpoint, got {type(obj)}.")
  return obj, mapped


def release_mapped_pages(tensor) -> None:
  """Drops the pages of a memory-mapped tensor from this process's memory (Linux).

  Only for tensors of a private, read-only-used file mapping (`read` with mapped=True): their
  pages are clean copies of the file, so dropping them loses nothing (a later read maps them in
  again). Without this, every tensor converted would stay resident next to its converted copy.
  """
  if not sys.platform.startswith("linux") or not hasattr(tensor, "data_ptr"):
    return
  start = tensor.data_ptr()
  end = start + tensor.numel() * tensor.element_size()
  first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside the tensor
  if last > first:
    _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


@functools.cache
def _libc():
  return ctypes.CDLL(None, use_errno=True)
