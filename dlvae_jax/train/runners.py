"""Three ways to run the one train step on many devices, and the mesh helpers.

    jit        (default) the global batch sharded on the mesh axis "data" with
               NamedSharding; XLA partitions the step and inserts the
               reductions (gradients, batch-norm statistics) itself.
    shard_map  `jax.shard_map` over the same mesh: each device runs the step on
               its rows; gradients, metrics and batch-norm statistics are
               averaged with explicit `lax.pmean` over "data".
    pmap       `jax.pmap` over the local devices with axis "data", the state
               replicated with a leading device axis.

All three wrap `dlvae_jax.train.step.train_step` / `eval_outputs`; none copies
them. The model passed in is cloned with `norm_axis_name="data"` for
shard_map and pmap so batch norm sees the global batch, as under jit.

Every random draw of a step (augmentation, K-means restarts, the model's
VAE noise, label dropout and dropout) is keyed by the example's record index
(`fold_in(key, index_B)`), so it is the same whatever device an example lands
on: the three runners give the same numbers at any device count, up to the
order of floating-point reductions.

Evaluation: `eval_variables(state)` gives the parameters in the placement the
runner's eval takes, once per evaluation; `eval` then runs on every device,
each on its rows of the global batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlvae_jax.errors import DlvaeError

AXIS = "data"
RUNNERS = ("jit", "shard_map", "pmap")


def data_mesh(devices=None) -> Mesh:
    """1-D mesh over all (global) devices with the batch axis named "data"."""
    devices = devices if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host batch (this process's rows) -> global arrays sharded on axis 0."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_iterator(batches: Iterable[dict], put: Callable[[dict], Any], prefetch: int = 2) -> Iterator[Any]:
    """Yields `put(batch)` for each host batch, keeping `prefetch` transfers in
    flight ahead of the consumer."""
    queue: list = []
    for batch in batches:
        queue.append(put(batch))
        if len(queue) > prefetch:
            yield queue.pop(0)
    yield from queue


class Runner:
    """Places state and batches on the devices and runs the step there.

    step_fn(state, batch) -> (state, metrics) and eval_fn(variables, batch) ->
    outputs are the pure functions with every static option bound; under
    shard_map / pmap they are called with `axis_name` bound too.
    """

    name = "jit"

    def __init__(self, step_fn: Callable, eval_fn: Callable, mesh: Mesh | None = None):
        self.mesh = mesh or data_mesh()
        self.batch_sharding = batch_sharding(self.mesh)
        self.replicated = replicated(self.mesh)
        self._step = self._build_step(step_fn) if step_fn is not None else None
        self._eval = self._build_eval(eval_fn) if eval_fn is not None else None

    # -- jit: the default
    def _build_step(self, step_fn):
        return jax.jit(step_fn, in_shardings=(self.replicated, self.batch_sharding),
                       out_shardings=(self.replicated, self.replicated), donate_argnums=0)

    def _build_eval(self, eval_fn):
        return jax.jit(eval_fn, in_shardings=(self.replicated, self.batch_sharding), out_shardings=self.batch_sharding)

    def put_state(self, state):
        """A host (or single-device) state -> the runner's placement."""
        return jax.device_put(state, self.replicated)

    def get_state(self, state):
        """The runner's state -> one logical copy (for checkpoints and inference)."""
        return state

    def put_batch(self, batch: dict[str, np.ndarray]):
        return to_global(batch, self.batch_sharding)

    def put_variables(self, variables):
        """Host (or any) variables -> the placement `eval` takes."""
        return jax.device_put(variables, self.replicated)

    def eval_variables(self, state):
        """The runner's state -> its variables, already in the placement `eval` takes (no copy)."""
        return state.variables()

    def step(self, state, batch):
        return self._step(state, batch)

    def eval(self, variables, batch):
        """variables from `eval_variables` / `put_variables`; batch from `put_batch`."""
        return self._eval(variables, batch)

    def local_rows(self, outputs: dict) -> dict[str, np.ndarray]:
        """This process's rows of eval outputs, in the order of its host batch."""
        return {k: np.concatenate([np.asarray(s.data) for s in sorted(
            v.addressable_shards, key=lambda s: s.index[0].start or 0)]) for k, v in outputs.items()}


class ShardMapRunner(Runner):
    name = "shard_map"

    def _build_step(self, step_fn):
        fn = jax.shard_map(functools.partial(step_fn, axis_name=AXIS), mesh=self.mesh,
                           in_specs=(P(), P(AXIS)), out_specs=(P(), P()), check_vma=False)
        return jax.jit(fn, donate_argnums=0)

    def _build_eval(self, eval_fn):
        fn = jax.shard_map(eval_fn, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P(AXIS), check_vma=False)
        return jax.jit(fn)


class PmapRunner(Runner):
    """pmap over this process's devices; batches arrive as [devices, rows, ...]."""

    name = "pmap"

    def __init__(self, step_fn, eval_fn, mesh=None):
        self.devices = jax.local_devices()
        super().__init__(step_fn, eval_fn, mesh)

    def _build_step(self, step_fn):
        return jax.pmap(functools.partial(step_fn, axis_name=AXIS), axis_name=AXIS, donate_argnums=0)

    def _build_eval(self, eval_fn):
        return jax.pmap(eval_fn, axis_name=AXIS)

    def _stacked(self, x: np.ndarray):
        """[devices, ...] host array -> one slice per local device, laid out as
        pmap with axis AXIS returns its outputs: the state fed back from one
        step to the next then keeps one layout, and the step compiles once."""
        return jax.device_put(x, NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), P(AXIS)))

    def _replicate(self, tree):
        n = len(self.devices)
        return jax.tree_util.tree_map(lambda x: self._stacked(np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x))),
                                      jax.device_get(tree))

    def put_state(self, state):
        return self._replicate(state)

    def get_state(self, state):
        return jax.tree_util.tree_map(lambda x: x[0], state)

    def put_batch(self, batch):
        n = len(self.devices)
        rows = len(next(iter(batch.values())))
        if rows % n:
            raise DlvaeError(f"the per-process batch of {rows} does not split over {n} local devices")
        return {k: self._stacked(v.reshape((n, rows // n) + v.shape[1:])) for k, v in batch.items()}

    def put_variables(self, variables):
        return self._replicate(variables)

    def step(self, state, batch):
        state, metrics = self._step(state, batch)
        return state, jax.tree_util.tree_map(lambda x: x[0], metrics)

    def local_rows(self, outputs):
        return {k: np.asarray(v).reshape((-1,) + v.shape[2:]) for k, v in outputs.items()}


def make_runner(name: str, step_fn: Callable, eval_fn: Callable, mesh: Mesh | None = None) -> Runner:
    cls = {"jit": Runner, "shard_map": ShardMapRunner, "pmap": PmapRunner}.get(name)
    if cls is None:
        raise DlvaeError(f"unknown --parallel {name!r}; choose one of {', '.join(RUNNERS)}")
    return cls(step_fn, eval_fn, mesh)
