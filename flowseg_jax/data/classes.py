"""Class names and visual palettes of the supported datasets.

Train ids are 0-based and contiguous; 255 is the ignore index everywhere. Names follow the
ADE20K-150 benchmark (ADEChallengeData2016, objectInfo150 first synonyms, as used by mmseg)
and the 171 used classes of COCO-Stuff-164k (80 things, then 91 stuff classes).

The palettes here are our own, generated deterministically: they are injective (no two classes
share a colour, unlike the customary ADE and COCO-Stuff palettes) and meant for pictures only.
They are unrelated to the flow's class centroids, which live in `flowseg_jax.centroids`.
"""

import colorsys
import functools

import numpy as np

ADE20K_CLASSES: tuple[str, ...] = (
  # 0
  "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
  # 10
  "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
  "chair",
  # 20
  "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
  # 30
  "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
  "cushion",
  # 40
  "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
  "skyscraper", "fireplace",
  # 50
  "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow",
  "screen door", "stairway",
  # 60
  "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill",
  "bench",
  # 70
  "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
  "arcade machine", "hovel",
  # 80
  "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
  "television receiver",
  # 90
  "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
  "bottle", "buffet",
  # 100
  "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
  "plaything", "swimming pool",
  # 110
  "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
  # 120
  "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
  "dishwasher",
  # 130
  "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
  "fan",
  # 140
  "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
  "clock", "flag",
)  # fmt: skip

COCO_STUFF_CLASSES: tuple[str, ...] = (
  # 0: things
  "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
  "traffic light", "fire hydrant", "stop sign",
  # 12
  "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear",
  "zebra", "giraffe",
  # 24
  "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
  "sports ball", "kite", "baseball bat", "baseball glove",
  # 36
  "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife",
  "spoon", "bowl", "banana", "apple",
  # 48
  "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
  "couch", "potted plant", "bed",
  # 60
  "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
  "microwave", "oven", "toaster", "sink",
  # 72
  "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
  # 80: stuff
  "banner", "blanket", "branch", "bridge",
  # 84
  "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
  "ceiling-tile", "cloth", "clothes", "clouds", "counter",
  # 96
  "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble",
  "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower",
  # 108
  "fog", "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
  "house", "leaves", "light", "mat",
  # 120
  "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net", "paper", "pavement",
  "pillow", "plant-other", "plastic",
  # 132
  "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
  "salad", "sand", "sea",
  # 144
  "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
  "structural-other", "table", "tent", "textile-other",
  # 156
  "towel", "tree", "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel",
  "wall-stone", "wall-tile", "wall-wood", "water-other", "waterdrops",
  # 168
  "window-blind", "window-other", "wood",
)  # fmt: skip


def synthetic_class_names(num_classes: int) -> list[str]:
  """Names of the procedural dataset's classes: 'texture_000', 'texture_001', ..."""
  return [f"texture_{k:03d}" for k in range(num_classes)]


@functools.lru_cache(maxsize=16)
def _palette(num_classes: int) -> np.ndarray:
  # Hue walks the circle by the golden ratio, so neighbouring ids get far-apart hues; brightness
  # and saturation cycle through a few levels so that more than ~30 classes stay distinguishable.
  golden = (5**0.5 - 1) / 2
  colours = []
  for k in range(num_classes):
    hue = (k * golden) % 1.0
    sat = (0.95, 0.55, 0.8)[k % 3]
    val = (0.95, 0.7, 0.5, 0.85)[(k // 3) % 4]
    colours.append(colorsys.hsv_to_rgb(hue, sat, val))
  palette = np.round(np.asarray(colours, np.float64).reshape(-1, 3) * 255).astype(np.uint8)
  # Quantisation can in principle collide for very large N; nudge duplicates until unique.
  seen = set()
  for k in range(num_classes):
    while tuple(palette[k]) in seen:
      palette[k, k % 3] = (int(palette[k, k % 3]) + 37) % 256
    seen.add(tuple(palette[k]))
  palette.setflags(write=False)
  return palette


def make_palette(num_classes: int) -> np.ndarray:
  """A deterministic, injective visual palette.

  Args:
    num_classes: number of classes N, 1 <= N <= 255.

  Returns:
    uint8 array (N, 3) of RGB colours, all rows distinct.
  """
  if not 1 <= num_classes <= 255:
    raise ValueError(f"num_classes must be in 1..255 (255 is the ignore label), got {num_classes}.")
  return _palette(int(num_classes)).copy()


# Candidates for the ignore colour, in order; the first one the palette does not use is taken. Black
# is not among them: the Kronecker centroid palette always paints class 0 black.
_IGNORE_COLOURS = ((255, 255, 255), (128, 128, 128), (255, 0, 255))


def colourise(label: np.ndarray, palette: np.ndarray, ignore_colour=None) -> np.ndarray:
  """Paints a label map with a palette.

  Args:
    label: integer array (..., H, W) of train ids, 255 = ignore.
    palette: uint8 (N, 3).
    ignore_colour: RGB used for 255 (and any id >= N); None: white, or the first of grey and magenta
      that the palette does not use, so that ignored pixels never look like a class.

  Returns:
    uint8 (..., H, W, 3).
  """
  palette = np.asarray(palette, np.uint8)
  if ignore_colour is None:
    used = {tuple(int(v) for v in c) for c in palette}
    ignore_colour = next((c for c in _IGNORE_COLOURS if c not in used), _IGNORE_COLOURS[0])
  table = np.zeros((256, 3), np.uint8)
  table[:] = np.asarray(ignore_colour, np.uint8)
  n = min(len(palette), 255)
  table[:n] = palette[:n]
  return table[np.asarray(label).astype(np.int64).clip(0, 255)]
