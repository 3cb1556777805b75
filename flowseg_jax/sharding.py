"""Device mesh ('data', 'fsdp'), logical-axis rules and the shardings of state and batches."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Parameter logical axes used by the models (see models/pixnerd.py, models/dinov2.py) -> mesh axes.
DEFAULT_RULES = (
  ("embed", "fsdp"),
  ("mlp", None),
  ("heads", None),
  ("vocab", None),
  ("norm", None),
  ("layers", None),
  ("batch", BATCH_AXES),
)


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh over all devices; one of the two sizes may be -1 (fill the rest)."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data, fsdp may be -1")
  if data == -1:
    if n % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if fsdp == -1:
    if n % data:
      raise ValueError(f"config.mesh.data={data} does not divide the {n} devices")
    fsdp = n // data
  if data * fsdp != n or data < 1 or fsdp < 1:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} must equal the {n} devices")
  grid = np.asarray(devices).reshape(data, fsdp)
  auto = (jax.sharding.AxisType.Auto,) * 2  # linen logical constraints want Auto axes
  return jax.sharding.Mesh(grid, MESH_AXES, axis_types=auto)


def rules_from_config(rules) -> tuple:
  """Config rules are lists of [logical, mesh axis | [axes] | None]; returns the tuple form flax wants."""
  out = []
  for logical, physical in rules:
    if isinstance(physical, list):
      physical = tuple(physical)
    out.append((logical, physical))
  return tuple(out)


def logical_shardings(boxed_tree, mesh, rules):
  """NamedShardings for a tree whose leaves carry flax logical-partitioning boxes (others replicate)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict, mesh) -> dict:
  """Process-local NumPy batch -> global jax.Arrays sharded along the batch axis."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def assert_sufficiently_sharded(params, shardings, mesh, *, min_bytes: int = 4 * 2**20) -> None:
  """Fails when FSDP is on but a parameter of >= min_bytes is fully replicated (a missing rule)."""
  if mesh.shape["fsdp"] == 1:
    return
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  offenders = []
  for (path, p), s in zip(flat_p, flat_s, strict=True):
    nbytes = int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
    if nbytes >= min_bytes and all(axis is None for axis in s.spec):
      offenders.append(f"{jax.tree_util.keystr(path)} {p.shape}")
  if offenders:
    raise ValueError(
      "FSDP is on but these parameters are replicated (add a logical-axis rule): "
      + ", ".join(offenders)
    )
  logging.info("All parameters >= %d bytes are sharded over 'fsdp'.", min_bytes)
