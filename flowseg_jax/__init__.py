"""FlowSeg in JAX: generative semantic segmentation by a reshaped rectified flow.

from flowseg_jax import Segmenter
seg = Segmenter.from_workdir("/tmp/flowseg_demo")
labels = seg("photo.jpg")
"""

__version__ = "0.1.0"
__all__ = ["Segmenter"]


def __getattr__(name: str):
  # Lazy: `import flowseg_jax` stays cheap (no JAX import) until the Segmenter is used.
  if name == "Segmenter":
    from flowseg_jax.inference import Segmenter

    return Segmenter
  raise AttributeError(f"module 'flowseg_jax' has no attribute {name!r}")
