"""Paths that may be local or on object storage (`gs://...`, anything etils.epath handles).

A pod's hosts share no disk, so a workdir, weights and datasets usually live on `gs://`. Every file
the project reads or writes goes through `path()` (an `epath.Path`) and the few helpers below, which
keep what a local disk gives for free where object stores lack it:
  - local paths are made absolute once: orbax and tensorstore need absolute paths, and a relative
    string joined onto the cwd is how `gs://b/run` used to become a local folder named `gs:`;
  - a file is replaced whole: locally through a temporary file and a rename (a reader never sees half
    a file); an object store has no rename, but its uploads are atomic already;
  - a line is appended: locally with O_APPEND; an object cannot be appended to, so the object is read
    and written back (log-step files of a few hundred kB at most);
  - a folder is moved: a rename locally, copy-and-delete of its objects on a store.
Listings of object storage are never cached (gcsfs caches them per process by default): the hosts
of a job and the readers of a training workdir see each other's checkpoints and moved-aside steps at
once. `FSSPEC_GCS_USE_LISTINGS_CACHE=true` turns the cache back on.
`gs://` needs the `gcs` extra (`pip install -e ".[gcs]"`: gcsfs, which epath uses through fsspec).
"""

from __future__ import annotations

import io
import os
import shutil

import fsspec.config
import fsspec.core
from etils import epath

PathLike = str | os.PathLike

for _protocol in ("gs", "gcs"):  # epath asks fsspec for "gcs"; fsspec.core.url_to_fs for "gs"
  fsspec.config.conf.setdefault(_protocol, {}).setdefault("use_listings_cache", False)


def is_url(p: PathLike) -> bool:
  """True for `scheme://...` paths (object storage), False for local ones."""
  return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
  """An epath.Path for `p`: URLs as they are, local paths made absolute (against the cwd, once)."""
  if isinstance(p, epath.Path) and (is_url(p) or p.is_absolute()):
    return p
  text = os.fspath(p)
  return epath.Path(text if is_url(text) else os.path.abspath(text))


def join(p: PathLike, *parts: str) -> str:
  """`p/parts...` as a string: URLs keep their scheme, local paths stay as given (relative ones too)."""
  return os.fspath(epath.Path(p).joinpath(*parts)) if is_url(p) else os.path.join(p, *parts)


def write_atomic(p: PathLike, data: str | bytes) -> None:
  """Replaces the file `p` as a whole: readers see the old content or the new one, never a part."""
  target = path(p)
  if is_url(target):  # an object upload is atomic
    target.write_bytes(data) if isinstance(data, bytes) else target.write_text(data)
    return
  tmp = target.with_name(target.name + ".tmp")
  tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
  os.replace(tmp, target)


def append_text(p: PathLike, text: str) -> None:
  """Appends `text` to the file `p` (created if absent). On object storage: read and rewrite."""
  target = path(p)
  if not is_url(target):
    with open(target, "a") as f:
      f.write(text)
    return
  old = target.read_text() if target.exists() else ""
  target.write_text(old + text)


def move(src: PathLike, dst: PathLike) -> None:
  """Moves the file or folder `src` to `dst` (dst's parent is created where folders exist)."""
  source, target = path(src), path(dst)
  if is_url(source):  # epath's rename wants dst's folder to exist: an object store has none
    fs, _ = fsspec.core.url_to_fs(os.fspath(source))
    fs.copy(os.fspath(source), os.fspath(target), recursive=True)  # copy + delete: every store
    fs.rm(os.fspath(source), recursive=True)  # has them (gcsfs's mv tries a newer API first)
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  shutil.move(source, target)


def create_new(p: PathLike, data: bytes) -> bool:
  """Writes the file `p` only if it does not exist yet, atomically; False if it exists.

  Locally O_CREAT | O_EXCL (also on NFS); on object storage an upload with the precondition "no
  live generation of this object" (gcsfs `mode="create"`, GCS `ifGenerationMatch=0`), which the
  store checks and applies as one step: of two concurrent creators exactly one succeeds.
  """
  if is_url(p):
    fs, key = fsspec.core.url_to_fs(os.fspath(p))
    try:
      fs.pipe_file(key, data, mode="create")
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  return True


def open_image(p: PathLike):
  """PIL's Image.open of the file `p` (read whole from object storage first)."""
  from PIL import Image

  if not is_url(p):
    return Image.open(p)
  return Image.open(io.BytesIO(path(p).read_bytes()))


def save_image(image, p: PathLike) -> None:
  """Saves a PIL image to `p` in the format its suffix names (PNG for `.png`)."""
  target = path(p)
  if not is_url(target):
    image.save(target)
    return
  from PIL import Image

  with target.open("wb") as f:
    image.save(f, format=Image.registered_extensions()[target.suffix.lower()])


def local_only(p: PathLike, what: str, instead: str) -> str:
  """`p` as a string; ValueError naming `p` when it is a URL (a reader that needs a local disk)."""
  text = os.fspath(p)
  if is_url(text):
    raise ValueError(f"{what} {text!r} must be on a local disk ({instead})")
  return text
