"""Listing image and mask folders and pairing them by stem, for every on-disk source.

What a listing finds besides pairs is not dropped: an image without its mask, a mask without its
image, an image of another format than the layout holds, two images sharing a stem. Each becomes a
*problem* `(name, message)`, whose message names the file and the fix; the pre-flight
(`data.preflight`) reports the first one ('raise') or counts them ('skip'). Images without a mask
stay in the pair list with the mask path they should have, so that reading them fails with that
path too.
"""

from __future__ import annotations

import os

# What counts as an image file (lower-case suffixes; matching is case-insensitive: cameras write .JPG).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

Problem = tuple[str, str]  # (example name, message naming the file and the fix)
Item = tuple[str, str, str]  # (image path, mask path, example name)


def require_dir(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}: folder {path} does not exist.")


def _files(folder: str) -> list[os.DirEntry]:
  return sorted(
    (e for e in os.scandir(folder) if not e.name.startswith(".") and e.is_file()),
    key=lambda e: e.name,
  )


def list_images(
  folder: str, suffixes: tuple[str, ...], dataset: str
) -> tuple[dict[str, str], list[Problem]]:
  """{stem: path} of the images in `folder` whose suffix is one of `suffixes` (any case).

  Images of another image format become problems (a PNG among ADE20K's JPEGs is not silently left
  out); files that are no image at all (notes, thumbnails databases) are ignored.

  Raises:
    FileNotFoundError: the folder is missing, or holds no image of the accepted suffixes.
  """
  require_dir(folder, dataset)
  accepted = tuple(s.lower() for s in suffixes)
  images, problems, others = {}, [], []
  for entry in _files(folder):
    stem, suffix = os.path.splitext(entry.name)
    if suffix.lower() in accepted:
      if stem in images:
        problems.append(
          (
            stem,
            f"{dataset}: images {images[stem]} and {entry.path} share the stem {stem!r}, so the "
            "mask cannot tell which it belongs to; rename or remove one of them.",
          )
        )
        continue
      images[stem] = entry.path
    elif suffix.lower() in IMAGE_SUFFIXES:
      others.append(entry.path)
      problems.append(
        (
          stem,
          f"{dataset}: image {entry.path} is not a {'/'.join(suffixes)} file, which this layout "
          "holds; convert it (or remove it)"
          + (", or set config.input.folder.image_suffix=''" if dataset == "folder" else "")
          + ".",
        )
      )
  if not images:
    hint = f"; {len(others)} other image file(s) there, e.g. {others[0]}" if others else ""
    raise FileNotFoundError(
      f"{dataset}: no images found in {folder} (looked for {'/'.join(suffixes)} files{hint})."
    )
  return images, problems


def list_masks(folder: str, suffix: str, dataset: str) -> dict[str, str]:
  """{stem: path} of the files in `folder` ending in `suffix` (any case); the stem drops it."""
  require_dir(folder, dataset)
  n = len(suffix)
  return {e.name[:-n]: e.path for e in _files(folder) if e.name.lower().endswith(suffix.lower())}


def pair(
  images: dict[str, str],
  masks: dict[str, str],
  *,
  dataset: str,
  image_dir: str,
  mask_dir: str,
  mask_suffix: str,
) -> tuple[tuple[Item, ...], list[Problem]]:
  """Items sorted by stem (images without a mask keep the path their mask should have) and the
  problems: images without a mask, masks without an image."""
  problems = []
  for stem in sorted(set(images) - set(masks)):
    expected = os.path.join(mask_dir, stem + mask_suffix)
    problems.append(
      (
        stem,
        f"{dataset}: image {images[stem]} has no mask {expected}; add it, or remove the image.",
      )
    )
  for stem in sorted(set(masks) - set(images)):
    problems.append(
      (
        stem,
        f"{dataset}: mask {masks[stem]} has no image {stem}.* in {image_dir}; add the image, "
        "or remove the mask.",
      )
    )
  items = tuple(
    (images[k], masks.get(k, os.path.join(mask_dir, k + mask_suffix)), k) for k in sorted(images)
  )
  return items, problems
