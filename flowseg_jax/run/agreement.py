"""One decision for all processes: stop requests and errors are agreed at fixed points of the loop.

On a pod only some hosts may get a preemption notice, and an error (a bad training example, a
failed write, the divergence guard) happens on one host. A decision taken by one process alone
leaves the others waiting in the next collective for a peer that has left. So each process keeps
its request and its error to itself until an agreement point, where every process contributes
(stop code, failed) and all act on the result:

- stop: the largest code asked by any process (run.status.STOP_CODES: SIGTERM < SIGINT) — every
  process checkpoints the same step and exits with the same status;
- failed: every process raises; the message is the lowest failing process's, broadcast to all
  (`PeerError` on the others, the original exception on that process).

An agreement point must lie between the host work that may fail and the next collective (the train
step, a checkpoint save, an evaluation), because a process that failed cannot join that collective.
The trainer calls `agree` once per step before dispatching it, at log steps, and before an
evaluation. The exchange goes through jax.distributed's coordination service (each process sets its
key, a barrier, one directory read): host RPCs that do not wait for the device, so the host still
runs ahead of it. A device collective (`process_allgather`) was tried first and rejected: it
queues behind the previous step, so each call blocked the host for a whole device step (2 processes x
4 CPU devices, tiny config: 670-830 ms median inside the call, against 16-20 ms for the store on the
same loaded 2-core machine, most of it the two processes arriving apart; about 1 ms alone). End to
end, 50 steps with the store took 998 ms per step against 1038 ms with no agreement at all: no cost
measurable within that machine's noise. One process: nothing at all.

A process that dies outright (killed, out of memory) never reaches the agreement point: the others
wait in it until jax.distributed's heartbeat notices the missing peer (heartbeat_timeout_seconds,
100 s by default) and the coordination service stops every process.
"""

from __future__ import annotations

import contextlib
import itertools

import jax
from absl import logging

from flowseg_jax.run.status import RunError

MESSAGE_CHARS = 2000  # the shared message is cut to this length
# How long a process waits at an agreement point for the others. Processes meet there once per step,
# and every collective between two points (a step, a save, an evaluation) keeps them in step, so
# only host-side work makes them arrive apart; a process that died is noticed sooner by
# jax.distributed's heartbeat (heartbeat_timeout_seconds, 100 s by default), which stops the job.
BARRIER_TIMEOUT_S = 1800.0


class PeerError(RunError):
  """Another process of the job failed; the message is that process's."""


def describe(error: BaseException) -> str:
  """One line for an exception: a RunError's own message, else 'Type: message'."""
  text = str(error) if isinstance(error, RunError) else f"{type(error).__name__}: {error}"
  return " ".join(text.split()) or type(error).__name__


def _client():
  """jax.distributed's runtime client (its key-value store and barriers: host RPCs to the
  coordinator, no device work). jax 0.10 has no public accessor; orbax reads it the same way."""
  from jax._src import distributed

  return distributed.global_state.client


class Agreement:
  """Holds this process's error until the next `agree`, where every process learns of it.

  Agreements are numbered in the order they are created, the same on every process (each process
  runs the same program), so that their keys in the coordinator's store match."""

  _created = itertools.count()

  def __init__(self, *, timeout_s: float = BARRIER_TIMEOUT_S):
    self._error: BaseException | None = None
    self._id = next(Agreement._created)
    self._timeout_ms = int(timeout_s * 1000)
    self.num_calls = 0

  @property
  def multi_process(self) -> bool:
    return jax.process_count() > 1

  @contextlib.contextmanager
  def hold(self):
    """Runs a block of this process's host work. On several processes an exception there is held
    for the next `agree` (the caller must not use the block's results before it); on one process
    it propagates at once, as it always did."""
    if not self.multi_process:
      yield
      return
    try:
      yield
    except Exception as e:  # noqa: BLE001 - every error must reach the other processes
      if self._error is None:
        self._error = e

  def agree(self, value: int = 0) -> int:
    """The largest `value` over processes (the trainer's: a stop code, 0 to go on). Raises on every
    process when any process holds an error: the lowest failing process's error, the same message
    everywhere."""
    if not self.multi_process:
      return int(value)
    error, self._error = self._error, None
    mine = f"{int(value)}|{describe(error)[:MESSAGE_CHARS] if error is not None else ''}"
    answers = self._exchange(mine)
    failed = [(i, text) for i, (_, text) in enumerate(answers) if text]
    if failed:
      first, message = failed[0]
      if first == jax.process_index():
        raise error
      if error is not None:  # this process failed too, later in process order: log its own error
        logging.error("This process also failed (%s); reporting process %d's error.", error, first)
      raise PeerError(f"process {first} of {len(answers)} stopped the run: {message}")
    return max(code for code, _ in answers)

  def _exchange(self, mine: str) -> list[tuple[int, str]]:
    """Every process's (stop code, message) at this point, in process order."""
    client, me = _client(), jax.process_index()
    key = f"flowseg/agreement/{self._id}/{self.num_calls}"
    self.num_calls += 1
    client.key_value_set(f"{key}/{me}", mine)
    try:
      client.wait_at_barrier(f"{key}/barrier", self._timeout_ms)
    except Exception as e:  # noqa: BLE001 - the runtime's error type is not public
      raise PeerError(
        f"not every process reached agreement point {key} within {self._timeout_ms // 1000} s "
        f"(a process died or hangs): {describe(e)}"
      ) from None
    values = {int(k.rsplit("/", 1)[1]): v for k, v in client.key_value_dir_get(f"{key}/")}
    if self.num_calls > 1:  # this process's previous answer: everyone has read it by now
      client.key_value_delete(f"flowseg/agreement/{self._id}/{self.num_calls - 2}/{me}")
    out = []
    for index in range(jax.process_count()):
      code, _, message = values[index].partition("|")
      out.append((int(code), message))
    return out
