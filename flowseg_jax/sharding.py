"""Device mesh ('data', 'fsdp'), logical-axis rules and the shardings of state and batches."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
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


def _resolve_sizes(data: int, fsdp: int, n: int) -> tuple[int, int]:
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data, fsdp may be -1")
  if data == -1:
    if fsdp < 1 or n % fsdp:
      raise ValueError(f"config.mesh.fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if fsdp == -1:
    if data < 1 or n % data:
      raise ValueError(f"config.mesh.data={data} does not divide the {n} devices")
    fsdp = n // data
  if data * fsdp != n or data < 1 or fsdp < 1:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} must equal the {n} devices")
  return data, fsdp


def _granules(devices, attr: str) -> int:
  """Number of distinct `attr` values (slice_index / process_index) over the devices; 0 if absent."""
  values = {getattr(d, attr, None) for d in devices}
  return 0 if None in values else len(values)


def device_grid(data: int = -1, fsdp: int = 1, devices=None, *, dcn_data: int = 1) -> np.ndarray:
  """The (data, fsdp) array of devices, laid out along the physical topology.

  Within a slice (a TPU slice, a GPU host or an NVLink domain) `mesh_utils.create_device_mesh`
  puts 'fsdp', the axis with the most traffic (per-layer all-gathers and reduce-scatters), on the
  fastest links (neighbours on the TPU torus, ids sorted on GPUs). Across slices
  (`dcn_data` > 1) `mesh_utils.create_hybrid_device_mesh` splits 'data' as `dcn_data` slices x
  `data / dcn_data` devices per slice, so the only traffic over the data-centre network is the
  once-per-step gradient all-reduce. Slices are `device.slice_index` (multi-slice TPU) or, where
  devices have none (GPU clusters), processes (one granule per host).

  Args:
    data: size of 'data' (all slices together); -1 fills the devices left by `fsdp`.
    fsdp: size of 'fsdp' (within one slice); -1 fills the devices left by `data`.
    devices: the devices (default `jax.devices()`).
    dcn_data: how many slices 'data' spans; 1 = a single slice.

  Returns:
    np.ndarray of devices, shape (data, fsdp); row-block i // (data / dcn_data) is slice i.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  data, fsdp = _resolve_sizes(data, fsdp, n)
  if dcn_data < 1 or data % dcn_data:
    raise ValueError(f"config.mesh.dcn_data={dcn_data} must divide config.mesh data size {data}")
  slices = _granules(devices, "slice_index")
  if dcn_data == 1:
    if slices > 1:
      raise ValueError(
        f"the {n} devices span {slices} slices: set config.mesh.dcn_data={slices} (the data "
        "axis over the data-centre network)"
      )
    return mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
  if slices == dcn_data:
    by_process = False
  elif _granules(devices, "process_index") == dcn_data:
    by_process = True
  else:
    raise ValueError(
      f"config.mesh.dcn_data={dcn_data} must equal the number of slices ({slices or 'none'}) or "
      f"of processes ({_granules(devices, 'process_index')}) the {n} devices span"
    )
  return mesh_utils.create_hybrid_device_mesh(
    (data // dcn_data, fsdp),
    (dcn_data, 1),
    devices,
    process_is_granule=by_process,
    allow_split_physical_axes=True,
  )


def make_mesh(data: int = -1, fsdp: int = 1, devices=None, *, dcn_data: int = 1) -> Mesh:
  """A topology-aware ('data', 'fsdp') mesh; one of the two sizes may be -1 (fill the rest).

  See `device_grid` for the layout and `dcn_data` (multi-slice / multi-host data parallelism).
  """
  grid = device_grid(data, fsdp, devices, dcn_data=dcn_data)
  auto = (jax.sharding.AxisType.Auto,) * 2  # linen logical constraints want Auto axes
  return Mesh(grid, MESH_AXES, axis_types=auto)


def mesh_from_config(mesh_config, devices=None) -> Mesh:
  """`make_mesh` from `config.mesh` (data, fsdp and, if present, dcn_data)."""
  return make_mesh(
    mesh_config.data, mesh_config.fsdp, devices, dcn_data=int(mesh_config.get("dcn_data", 1))
  )


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


def place_host_tree(tree, shardings):
  """Arrays of a host-side copy (NumPy, or jax.Arrays on this process's devices) -> global arrays
  with `shardings` (one sharding for every leaf, or a matching tree of them).

  Each process fills its own devices from its own copy: no cross-host transfer (`jax.device_put` of
  a committed array onto a mesh spanning several processes is refused) and no comparison between
  processes (`device_put` of a NumPy array gathers it from every process to check equality). Every
  process must therefore hold the same values, e.g. because all read the same files.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def place(x, s):
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(place, tree, shardings)


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


def local_rows(array: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in the order they were given: each device's
  shard is fetched on its own (no gather of a split array through one device)."""
  shards = {}
  for shard in array.addressable_shards:
    shards.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([shards[k] for k in sorted(shards)], axis=0)
