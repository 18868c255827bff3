"""One sharding story: a ('data', 'fsdp', 'tensor') mesh and a logical-axis rule table.

    partitioner = Partitioner({"data": 1, "fsdp": -1, "tensor": 1})
    param_shardings = partitioner.shardings_for(llama.param_logical_axes(cfg), shapes)
    params = partitioner.init(lambda: llama.init_params(cfg, key), param_shardings)
    step = partitioner.partition(train_step, in_shardings=..., out_shardings=...,
                                 donate_argnums=(0,))

Every array that matters carries logical axis names; the rule table maps each name to mesh
axes (or None = replicated). A job on 1 CPU, 8 fake CPU devices, one GPU or a pod runs the
same code; only the mesh sizes and the rules change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from xwin_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, Any]]

# Weights: embed over fsdp, the wide axes over tensor. Activations (act_*): batch over
# data+fsdp, the head/mlp/vocab axes over tensor, never embed (it is whole in every shard).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("act_batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("layers", None),
    ("length", None),
    ("act_length", None),
    ("head_dim", None),
    ("act_head_dim", None),
    ("act_embed", None),
    ("norm", None),
    ("score", None),
)


def resolve_mesh_shape(mesh_shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in the one axis given as -1 with the rest of the devices; checks the product."""
    unknown = [k for k in MESH_AXES if mesh_shape.get(k, 1) == -1]
    extra = sorted(set(mesh_shape) - set(MESH_AXES))
    if extra:
        raise ConfigError(f"mesh axes {extra} are unknown; use {list(MESH_AXES)}")
    if len(unknown) > 1:
        raise ConfigError(f"mesh {dict(mesh_shape)}: only one axis may be -1")
    sizes = {k: mesh_shape.get(k, 1) for k in MESH_AXES}
    known = math.prod(v for v in sizes.values() if v != -1)
    if unknown:
        if num_devices % known:
            raise ConfigError(f"mesh {dict(mesh_shape)}: {num_devices} devices are not divisible "
                              f"by the fixed axes' product {known}")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; "
                          f"{num_devices} are available")
    return sizes


def _as_tuple(mesh_axes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


@dataclasses.dataclass
class Partitioner:
    mesh_shape: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: {"data": 1, "fsdp": -1, "tensor": 1})
    rules: Rules = DEFAULT_RULES
    devices: Sequence[Any] | None = None

    def __post_init__(self):
        devices = list(self.devices if self.devices is not None else jax.devices())
        wanted = math.prod(self.mesh_shape.get(k, 1) for k in MESH_AXES)
        if self.devices is None and 0 < wanted < len(devices) and jax.process_count() == 1:
            # A fully specified smaller mesh (e.g. mesh/single.gin) runs on the first devices.
            devices = devices[:wanted]
        self.sizes = resolve_mesh_shape(self.mesh_shape, len(devices))
        shape = tuple(self.sizes[k] for k in MESH_AXES)
        # Auto axes: GSPMD propagates shardings from the constraints we give it (the t5x /
        # MaxText model), rather than every op's sharding being explicit in its type.
        axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
        if self.devices is None:
            self.mesh = jax.make_mesh(shape, MESH_AXES, devices=devices, axis_types=axis_types)
        else:  # explicit devices: in exactly this order (decoding() relies on it)
            self.mesh = jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                                          axis_types=axis_types)
        self._rules = {name: _as_tuple(axes) for name, axes in self.rules}

    # --- logical → physical -------------------------------------------------------------------

    def spec(self, logical_axes: Sequence[str | None], shape: Sequence[int] | None = None
             ) -> PartitionSpec:
        """PartitionSpec for logical names; a mesh axis that does not divide the dimension
        (e.g. 2 KV heads over tensor=4), or that an earlier dimension already took, is dropped
        so the dimension stays whole rather than failing."""
        used: set[str] = set()
        out = []
        for dim, name in enumerate(logical_axes):
            if name is not None and name not in self._rules:
                raise ConfigError(f"logical axis {name!r} has no rule; add one to the rule table "
                                  f"(known: {sorted(self._rules)})")
            axes = [a for a in (self._rules[name] if name else ()) if self.sizes[a] > 1
                    and a not in used]
            if shape is not None:
                kept = []
                for axis in axes:
                    together = math.prod(self.sizes[a] for a in kept) * self.sizes[axis]
                    if shape[dim] % together == 0:
                        kept.append(axis)
                axes = kept
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
        return PartitionSpec(*out)

    def sharding(self, logical_axes, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical_axes, shape))

    def shardings_for(self, logical_tree, shape_tree) -> Any:
        """NamedShardings for a tree of logical PartitionSpecs and matching shapes."""
        is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
        return jax.tree.map(lambda spec, shaped: self.sharding(tuple(spec), shaped.shape),
                            logical_tree, shape_tree, is_leaf=is_spec)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def data_sharding(self, ndim: int = 2) -> NamedSharding:
        """Batch-major arrays: the leading axis over (data, fsdp), the rest whole."""
        return NamedSharding(self.mesh, PartitionSpec(
            tuple(a for a in BATCH_AXES if self.sizes[a] > 1) or None, *([None] * (ndim - 1))))

    @property
    def batch_sharding(self) -> NamedSharding:
        """Leading axis over (data, fsdp), whatever the rank: for whole batch dicts."""
        return self.data_sharding(1)

    @property
    def batch_divisor(self) -> int:
        """The global batch must be a multiple of this."""
        return self.sizes["data"] * self.sizes["fsdp"]

    def decoding(self, tensor: int = 0) -> "Partitioner":
        """The decode layout on the same devices: every weight split `tensor` ways along its
        heads / MLP / vocab axis (tensor-parallel) and whole along embed, so a decode step
        gathers no weights; the other devices (n / tensor) each hold a copy and split the
        batch. tensor=0: this host's devices in the mesh, so tensor parallelism never
        crosses hosts and each host decodes its own rows."""
        devices = sorted(self.mesh.devices.flat, key=lambda d: (d.process_index, d.id))
        tensor = tensor or sum(d.process_index == jax.process_index() for d in devices)
        if len(devices) % tensor:
            raise ConfigError(f"decode layout tensor={tensor} does not divide the "
                              f"{len(devices)} devices")
        return Partitioner({"data": len(devices) // tensor, "fsdp": 1, "tensor": tensor},
                           self.rules, devices)

    # --- placing and compiling ----------------------------------------------------------------

    def put_global_batch(self, global_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """The whole global batch — the same numpy arrays on every host — → global arrays
        sharded over (data, fsdp), each device taking its own rows (unlike shard_batch,
        which takes each host's slice). For jobs where every host reads every prompt."""
        out = {}
        for key, value in global_batch.items():
            value = np.asarray(value)
            if value.shape[0] % self.batch_divisor:
                raise ConfigError(f"batch field {key!r}: batch {value.shape[0]} is not "
                                  f"divisible by data*fsdp = {self.batch_divisor}")
            out[key] = jax.make_array_from_callback(value.shape, self.data_sharding(value.ndim),
                                                    lambda index, v=value: v[index])
        return out

    def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """Process-local numpy batch → global arrays sharded over (data, fsdp). Each host
        passes its own slice of the global batch (the whole batch on one host)."""
        out = {}
        for key, value in local_batch.items():
            value = np.asarray(value)
            global_rows = value.shape[0] * jax.process_count()
            if global_rows % self.batch_divisor:
                raise ConfigError(f"batch field {key!r}: global batch {global_rows} is not "
                                  f"divisible by data*fsdp = {self.batch_divisor}")
            sharding = self.data_sharding(value.ndim)
            self._check_host_rows(sharding, (global_rows,) + value.shape[1:], value.shape[0])
            out[key] = jax.make_array_from_process_local_data(sharding, value)
        return out

    def _check_host_rows(self, sharding, global_shape, local_rows) -> None:
        """Data sources give host i the rows [i*n, (i+1)*n) of the global batch; the mesh must
        put exactly those rows on host i's devices, i.e. split the batch (data x fsdp) at
        least as many ways as there are hosts, in host order."""
        if jax.process_count() == 1:
            return
        rows = [index[0] for index in
                sharding.addressable_devices_indices_map(global_shape).values()]
        start = min(r.start or 0 for r in rows)
        stop = max(global_shape[0] if r.stop is None else r.stop for r in rows)
        expected = (jax.process_index() * local_rows, (jax.process_index() + 1) * local_rows)
        if (start, stop) != expected:
            raise ConfigError(
                f"mesh {self.sizes} splits the batch {self.batch_divisor} way(s) over "
                f"{jax.process_count()} hosts: host {jax.process_index()} holds rows "
                f"[{start}, {stop}) but feeds [{expected[0]}, {expected[1]}); make "
                f"data*fsdp a multiple of the host count")

    def init(self, init_fn: Callable[[], Any], out_shardings: Any) -> Any:
        """Runs init_fn jitted with out_shardings, so no device ever holds the full tree."""
        with self.activation_context():
            return jax.jit(init_fn, out_shardings=out_shardings)()

    def activation_context(self):
        """Mesh and logical rules, active while a model is traced, so the
        nn.with_logical_constraint calls inside it become sharding constraints."""
        return _ActivationContext(self.mesh, tuple(self.rules))

    def partition(self, fn: Callable, in_shardings=None, out_shardings=None,
                  donate_argnums: Sequence[int] = (), static_argnums: Sequence[int] = ()
                  ) -> "PartitionedFunction":
        """jax.jit with shardings and donation (what pjit became), traced and run under the
        activation context."""
        kwargs = {}
        if in_shardings is not None:
            kwargs["in_shardings"] = in_shardings
        if out_shardings is not None:
            kwargs["out_shardings"] = out_shardings
        jitted = jax.jit(fn, donate_argnums=tuple(donate_argnums),
                         static_argnums=tuple(static_argnums), **kwargs)
        return PartitionedFunction(jitted, self.activation_context)


def host_value(x: jax.Array) -> np.ndarray:
    """The whole of a global array on every host (gathered from the other hosts when this
    one does not hold all of it)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sync_hosts(name: str) -> None:
    """A barrier across hosts (nothing on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def check_same_on_hosts(values: Sequence[int], what: str) -> None:
    """Raises on every host when the hosts disagree on `values` (e.g. the prompt indices a
    resumed job found done: a shared filesystem that shows a host a stale file would
    otherwise send the hosts into different batches, and a collective would hang)."""
    if jax.process_count() == 1:
        return
    import zlib

    from jax.experimental import multihost_utils
    digest = np.asarray([zlib.crc32(np.asarray(sorted(values), np.int64).tobytes()),
                         len(values)], np.int64)
    seen = np.asarray(multihost_utils.process_allgather(digest))
    if not (seen == seen[0]).all():
        raise ConfigError(f"the hosts disagree on {what} (host {jax.process_index()} sees "
                          f"{len(values)}; per host: {seen[:, 1].tolist()})",
                          hint="the work directory must be one shared filesystem that every "
                               "host sees up to date (no stale metadata cache)")


class PartitionedFunction:
    """A jitted function whose tracing sees the partitioner's mesh and logical rules."""

    def __init__(self, jitted, context):
        self.jitted = jitted
        self._context = context

    def __call__(self, *args):
        with self._context():
            return self.jitted(*args)

    def lower(self, *args):
        with self._context():
            return self.jitted.lower(*args)


class _ActivationContext:
    def __init__(self, mesh, rules):
        self._mesh_ctx = jax.set_mesh(mesh)
        self._rules_ctx = nn.logical_axis_rules(rules)

    def __enter__(self):
        self._mesh_ctx.__enter__()
        self._rules_ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._rules_ctx.__exit__(*exc)
        self._mesh_ctx.__exit__(*exc)
        return False
