"""FlowSeg in JAX: generative semantic segmentation by a reshaped rectified flow."""

__version__ = "0.1.0"
