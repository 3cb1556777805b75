"""What every task shares: the objective, decoding, sampling, parameter shapes.

A task is built once from a config and decides what the trainer, the sampler and the evaluator would
otherwise each decide: the network and its call, the condition of each example, the centroid table
(`centroids`, the training table; `decode_centroids`, what predictions decode to), the objective
(`flow.Objective`, the only reader of `config.objective`), the sampler settings and the evaluator.
"""

from __future__ import annotations

import abc
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from flowseg_jax import centroids as centroids_lib
from flowseg_jax import flow, sampling, sharding
from flowseg_jax.data import datasets


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
  """What a model knows besides its weights that a task otherwise reads from the dataset config:
  its class names (index = train id) and, for a prompted model, its prompts (index = prompt id)
  and their cached text features (N, T, D) float32 (None where the network learns its own table).
  `palette` (uint8 (N, 3)) colours pictures only; None: the dataset's own (a folder's classes.json),
  else the centroid colours. A model folder records it (`pretrained.py`), so loading one needs no
  dataset."""

  class_names: tuple[str, ...]
  prompts: tuple[str, ...] = ()
  prompt_features: np.ndarray | None = None
  palette: np.ndarray | None = None


class Task(abc.ABC):
  """A task: subclasses set the network, the tables, the condition and the evaluator."""

  name: str
  best_metric: str  # the evaluator's result key that picks the best checkpoint
  batch_keys: tuple[str, ...]
  model: nn.Module
  num_classes: int  # classes a prediction can take
  centroids: jax.Array  # (table size, 3) float32: the training table
  prompts: tuple[str, ...] | list[str] = ()  # the prompt texts a prompted model knows
  encodes_text = False  # a text model: conditions are texts its own encoder turns into features
  evaluator: type  # built with a Segmenter of this task (evaluators/)

  def __init__(self, config: ml_collections.ConfigDict, vocabulary: Vocabulary | None = None):
    self.config = config
    self.objective = flow.Objective.from_config(config.objective)
    self._vocabulary = vocabulary

  @property
  def class_names(self) -> list[str]:
    """Class names, index = train id: the vocabulary's, else the dataset config's."""
    if self._vocabulary is not None:
      return list(self._vocabulary.class_names)
    return datasets.class_names(self.config.input)

  @property
  def palette(self) -> np.ndarray:
    """uint8 (num_classes, 3): the colours pictures draw classes in. The vocabulary's, else the
    dataset's own (a folder's classes.json), else the centroid colours, which a perfect colour
    output equals."""
    given = None
    if self._vocabulary is not None:
      given = self._vocabulary.palette
    else:
      given = datasets.dataset_palette(self.config.input)
    if given is None:
      return centroids_lib.palette(self.decode_centroids)
    return np.asarray(given, np.uint8)

  def vocabulary(self) -> Vocabulary:
    """This model's vocabulary, as a model folder records it."""
    features = getattr(self, "features", None)
    return Vocabulary(
      tuple(self.class_names),
      tuple(self.prompts),
      None if features is None else np.asarray(features, np.float32),
      self.palette,
    )

  @property
  def decode_centroids(self) -> np.ndarray:
    """(num_classes, 3) float32: the colours a prediction decodes to (no ignore colour)."""
    return np.asarray(self.centroids[: self.num_classes], np.float32)

  # -- the network ---------------------------------------------------------------------------------

  @abc.abstractmethod
  def condition(self, batch) -> jax.Array:
    """int32 (B,): each training example's condition (class label or prompt id)."""

  def condition_batch_spec(self, batch_size: int) -> dict:
    """{key: (shape, dtype)} of what a training batch carries for `condition` besides the image
    and label (prompt ids, streamed text features); none by default."""
    del batch_size
    return {}

  def check_inputs(self, splits) -> None:
    """Raises ValueError (one line) when what the splits' batches will carry does not suit this
    model (e.g. a prompted model's text-feature caches); nothing to check by default."""
    del splits

  @abc.abstractmethod
  def condition_of(self, prompt) -> int:
    """The condition inference passes for one image given the user's `prompt` argument."""

  def condition_spec(self) -> tuple[tuple[int, ...], type]:
    """(shape, dtype) of one image's condition at inference (a class or prompt id)."""
    return (), np.int32

  def encode(self, params, prompts) -> np.ndarray:
    """A text model's features of prompt texts (`encodes_text`)."""
    raise ValueError(f"the {self.name} task encodes no text")

  def apply(self, params, x, t, cond, **kw):
    """The network: x (B, H, W, 3), t (B,), cond int32 (B,) -> output (B, H, W, 3)."""
    return self.model.apply({"params": params}, x, t, cond, **kw)

  def architecture(self) -> dict:
    """The network's shape-determining fields (a model folder records and checks them)."""
    return self.model.arch_config()

  def init_inputs(self, image_size) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dummy (x, t, cond) of batch 1 for `model.init`."""
    x = jnp.zeros((1, *tuple(image_size), 3), jnp.float32)
    return x, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)

  def abstract_params(self, mesh, rules):
    """The network's parameters as ShapeDtypeStructs laid out by the logical-axis rules on mesh."""
    x, t, cond = self.init_inputs(self.config.input.image_size)
    key = jax.random.key(0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      boxed = jax.eval_shape(self.model.init, key, x, t, cond)["params"]
      shardings = sharding.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed), shardings
    )

  # -- training ------------------------------------------------------------------------------------

  @abc.abstractmethod
  def pretrained_params(self, path: str):
    """The network's parameters from a pretrained checkpoint (`config.model_init`)."""

  def train_targets(self, ema_params, images, labels, cond, step):
    """(labels the step trains toward, metrics): the annotations, unless the task refines them."""
    del ema_params, images, cond, step
    return labels, {}

  # -- sampling ------------------------------------------------------------------------------------

  def sampler_options(
    self, num_steps: int | None = None, adaptive: bool | None = None
  ) -> sampling.SamplerOptions:
    """`config.eval`'s sampler with the objective's prediction; num_steps overrides the config."""
    del adaptive  # only tasks with an adaptive rule use it
    cfg = self.config.eval
    return sampling.SamplerOptions(
      num_steps=int(cfg.num_steps if num_steps is None else num_steps),
      shift=float(cfg.shift),
      method=cfg.method,
      prediction=self.objective.prediction,
      t_eps=float(self.objective.t_eps),
    )

  def integrate(self, apply_fn, x0, options: sampling.SamplerOptions):
    """(x at t = 1 (B, H, W, 3), step scale dt (B,)): the ODE from the image to its colours."""
    return options.sample(apply_fn, x0), jnp.ones((x0.shape[0],), jnp.float32)
