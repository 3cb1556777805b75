"""A procedural segmentation dataset: deterministic from a seed, no download.

Every class owns a 4x4 binary texture tile. An object of class k is painted by tiling k's tile
(with a random phase) in two random colours A and B: pixel = A where the tile is 0, B where it is
1, plus Gaussian noise. Colours are drawn per object, independently of the class, so the mean
colour carries no information about the class; the class is visible only in the local pattern,
which any 4x4 window of the object contains (up to a cyclic shift, a swap of A and B, and a
horizontal mirror from the flip augmentation, which is why tiles are chosen distinct under those
64 symmetries). The first 29 tiles are pairwise at Hamming distance >= 4 under every symmetry, the
first 45 at >= 3, all 255 at >= 2, so small class counts (a demo) are easy to tell apart and large
ones (150, the default) are harder.

An image is a background object covering everything, then 2-6 overlapping objects (ellipses,
rounded rectangles and wobbly blobs, random rotation and aspect, radius 15-50 % of the short
side) painted in order so later ones occlude earlier ones. About one object in six is
"unlabelled": painted with unpatterned noise and labelled 255, which gives ~5-15 % ignored pixels
on average and exercises ignore handling.

With `class_colours=True` (off by default) a labelled object's two colours are instead its class's
fixed pair (`class_colour_pairs`) plus a small per-object jitter: the class is then visible in the
colour as well as in the pattern. The prompted CPU demo uses it (configs/rlfseg/demo.py says why);
the random stream is otherwise the same, so layouts and labels do not change.

With `compose=(C, T)` (compositional data, num_classes = C * T) class k is a combination: colour
k // T (the fixed pair `class_colour_pairs()[k // T]` plus jitter) and texture k % T (tile
`class_tiles()[k % T]`), so colour and texture vary independently across classes. `classes`
restricts the classes objects are drawn from (a training split that never shows some
combinations); None draws from all.
"""

import dataclasses
import functools

import numpy as np

from flowseg_jax.centroids import IGNORE_LABEL

TILE = 4
MAX_CLASSES = 255
EVAL_INDEX_OFFSET = 1 << 32  # make_example index of validation example 0 (train: index i).

_TILE_SEED = 38  # Fixed: the class -> texture table never depends on the dataset seed.
_UNLABELLED_PROB = 0.17
_NOISE_STD = 5.0
_MIN_CONTRAST = 90.0
_CLASS_COLOUR_SEED = (
  39  # Fixed, like the tiles: class k's colours never depend on the dataset seed.
)
_CLASS_COLOUR_JITTER = 12.0


def _tile_variants(code: int) -> np.ndarray:
  """The 64 symmetric versions of a 16-bit tile code: int64 (64,).

  Cyclic shifts (the object's random phase), colour swap (A and B are random) and horizontal
  mirror (the `random_flip` augmentation) do not change what class a texture shows.
  """
  bits = ((code >> np.arange(16)) & 1).reshape(TILE, TILE)
  out = []
  for tile in (bits, bits[:, ::-1]):
    for dy in range(TILE):
      for dx in range(TILE):
        v = int((np.roll(tile, (dy, dx), axis=(0, 1)).ravel() << np.arange(16)).sum())
        out += [v, v ^ 0xFFFF]
  return np.asarray(out, np.int64)


@functools.lru_cache(maxsize=1)
def class_tiles() -> np.ndarray:
  """The class texture table.

  Greedy selection over a fixed random order of 16-bit tiles with 5..11 ones: first every tile
  at Hamming distance >= 4 (under all 64 symmetries, see `_tile_variants`) from the tiles
  already chosen, then >= 3, then >= 2 (then >= 1, unused with this seed), until 255 are chosen.

  Returns:
    uint8 (255, 4, 4) of 0/1, read-only; row k is class k's tile.
  """
  popcount = np.asarray([bin(i).count("1") for i in range(1 << 16)], np.int64)
  order = np.random.default_rng(_TILE_SEED).permutation(1 << 16)
  order = order[(popcount[order] >= 5) & (popcount[order] <= 11)]
  chosen: list[int] = []
  for min_dist in (4, 3, 2, 1):
    ball = np.flatnonzero(popcount < min_dist)  # XOR masks of weight < min_dist.
    blocked = np.zeros(1 << 16, bool)
    for c in chosen:
      blocked[(_tile_variants(c)[:, None] ^ ball[None, :]).ravel()] = True
    for c in order:
      if len(chosen) == MAX_CLASSES:
        break
      if blocked[c]:
        continue
      chosen.append(int(c))
      blocked[(_tile_variants(int(c))[:, None] ^ ball[None, :]).ravel()] = True
  codes = np.asarray(chosen, np.int64)
  tiles = ((codes[:, None] >> np.arange(16)) & 1).reshape(-1, TILE, TILE).astype(np.uint8)
  tiles.setflags(write=False)
  return tiles


@functools.lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:height, 0:width]
  return yy.astype(np.float32), xx.astype(np.float32)


def _random_colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  while True:
    a, b = rng.uniform(0.0, 255.0, size=(2, 3))
    if np.linalg.norm(a - b) >= _MIN_CONTRAST:
      return a.astype(np.float32), b.astype(np.float32)


@functools.lru_cache(maxsize=1)
def class_colour_pairs() -> np.ndarray:
  """float32 (255, 2, 3): class k's two colours under `class_colours` (contrast >= 90), read-only."""
  rng = np.random.default_rng(_CLASS_COLOUR_SEED)
  pairs = np.stack([np.stack(_random_colour_pair(rng)) for _ in range(MAX_CLASSES)])
  pairs.setflags(write=False)
  return pairs


def _object_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A random shape: bool (H, W)."""
  yy, xx = _grid(height, width)
  short = min(height, width)
  radius = short * np.exp(rng.uniform(np.log(0.15), np.log(0.5)))
  aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
  ry, rx = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
  cy, cx = rng.uniform(-0.1, 1.1) * height, rng.uniform(-0.1, 1.1) * width
  theta = rng.uniform(0.0, np.pi)
  dy, dx = yy - cy, xx - cx
  u = (np.cos(theta) * dx + np.sin(theta) * dy) / rx
  v = (-np.sin(theta) * dx + np.cos(theta) * dy) / ry
  kind = rng.integers(3)
  if kind == 0:  # ellipse
    return u * u + v * v <= 1.0
  if kind == 1:  # rounded rectangle (superellipse)
    return np.abs(u) ** 6 + np.abs(v) ** 6 <= 1.0
  # Blob: ellipse whose radius wobbles with the angle.
  lobes, phase, amp = rng.integers(3, 6), rng.uniform(0, 2 * np.pi), rng.uniform(0.15, 0.35)
  return np.sqrt(u * u + v * v) <= 1.0 + amp * np.sin(lobes * np.arctan2(v, u) + phase)


def make_example(
  index: int,
  *,
  num_classes: int = 150,
  size: tuple[int, int] = (64, 64),
  seed: int = 0,
  class_colours: bool = False,
  texel: int = 1,
  compose: tuple[int, int] | None = None,
  classes: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Generates one example, a pure function of its arguments.

  Args:
    index: example index (non-negative; validation uses EVAL_INDEX_OFFSET + i).
    num_classes: number of classes N, 1..255.
    size: (H, W) of the image.
    seed: dataset seed (non-negative).
    class_colours: colour labelled objects by class (module docstring).
    texel: pixels per texture cell. An image at size k*S with texel k, shrunk k times, shows
      the textures of size S with texel 1, while its label keeps the shapes' edges at k*S: an
      annotation finer than the network's input, as in real datasets. The labels do not depend
      on texel.
    compose: (C, T) colours x textures with C * T == num_classes (module docstring), or None.
    classes: class ids objects are drawn from (None: all).

  Returns:
    image: uint8 (H, W, 3).
    label: uint8 (H, W), values in 0..N-1 or 255 (unlabelled).
  """
  if not 1 <= num_classes <= MAX_CLASSES:
    raise ValueError(f"synthetic.num_classes must be in 1..{MAX_CLASSES}, got {num_classes}.")
  height, width = (int(s) for s in size)
  if height < TILE or width < TILE:
    raise ValueError(f"synthetic.size must be at least {TILE}x{TILE}, got {size}.")
  if index < 0 or seed < 0:
    raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}.")
  if texel < 1:
    raise ValueError(f"synthetic texel must be >= 1, got {texel}.")
  if compose is not None and int(compose[0]) * int(compose[1]) != num_classes:
    raise ValueError(
      f"synthetic.compose {tuple(compose)} needs num_classes = {int(compose[0]) * int(compose[1])}"
      f", got {num_classes}."
    )
  if classes is not None and (
    not len(classes) or any(not 0 <= int(c) < num_classes for c in classes)
  ):
    raise ValueError(
      f"synthetic classes must be non-empty ids in [0, {num_classes}), got {classes}."
    )

  # (texture, colour pair) of class k: (k, k), or (k % T, k // T) for compositional data.
  def texture_colour(k: int) -> tuple[int, int]:
    return (k, k) if compose is None else (k % int(compose[1]), k // int(compose[1]))

  rng = np.random.default_rng([seed, index])
  colour_rng = np.random.default_rng([seed, index, _CLASS_COLOUR_SEED])
  tiles = class_tiles()
  yy, xx = _grid(height, width)
  iy, ix = yy.astype(np.int64), xx.astype(np.int64)
  image = np.empty((height, width, 3), np.float32)
  label = np.empty((height, width), np.uint8)

  num_objects = 1 + int(rng.integers(2, 7))  # background + 2..6 objects
  for k in range(num_objects):
    if k == 0:
      ys, xs = iy.ravel(), ix.ravel()
    else:
      ys, xs = np.nonzero(_object_mask(rng, height, width))
    a, b = _random_colour_pair(rng)
    if k > 0 and rng.uniform() < _UNLABELLED_PROB:
      # Unpatterned noise between the two colours: looks like no class, labelled 255.
      pattern = rng.uniform(0.0, 1.0, size=ys.size).astype(np.float32)
      cls = IGNORE_LABEL
    else:
      cls = int(
        rng.integers(num_classes) if classes is None else classes[rng.integers(len(classes))]
      )
      py, px = rng.integers(TILE, size=2)
      pattern = tiles[texture_colour(cls)[0]][(ys // texel + py) % TILE, (xs // texel + px) % TILE]
      pattern = pattern.astype(np.float32)
      if class_colours or compose is not None:  # jitter from its own stream: `rng` draws the
        jitter = colour_rng.normal(0.0, _CLASS_COLOUR_JITTER, size=(2, 3))  # same layout either way
        a, b = (class_colour_pairs()[texture_colour(cls)[1]] + jitter).astype(np.float32)
    image[ys, xs] = a + (b - a) * pattern[:, None]
    label[ys, xs] = cls
  image += rng.normal(0.0, _NOISE_STD, size=image.shape).astype(np.float32)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


@dataclasses.dataclass(frozen=True)
class SyntheticSource:
  """grain random-access source over `make_example`.

  Records are `{'image': uint8 (H, W, 3), 'label': uint8 (H, W), 'name': str}`; examples are
  generated on access (in the grain worker that reads them).
  """

  num_examples: int
  num_classes: int = 150
  size: tuple[int, int] = (64, 64)
  seed: int = 0
  split: str = "train"
  class_colours: bool = False
  compose: tuple[int, int] | None = None
  classes: tuple[int, ...] | None = None  # object classes of this split's images (None: all)

  def __post_init__(self):
    if self.split not in ("train", "validation"):
      raise ValueError(f"synthetic split must be 'train' or 'validation', got {self.split!r}.")
    if self.num_examples <= 0:
      raise ValueError(f"synthetic dataset needs num_examples > 0, got {self.num_examples}.")

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {self!r}")
    offset = 0 if self.split == "train" else EVAL_INDEX_OFFSET
    image, label = make_example(
      offset + index,
      num_classes=self.num_classes,
      size=tuple(self.size),
      seed=self.seed,
      class_colours=self.class_colours,
      compose=self.compose,
      classes=self.classes,
    )
    return {"image": image, "label": label, "name": f"synthetic_{self.split}_{index:06d}"}
