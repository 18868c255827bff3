"""Checks what a run would see before it runs: devices, processes and the mesh its gin builds.

    python -m xwin_jax.check --gin_file=gin/experiments/tiny_sft.gin
    python -m xwin_jax.check --gin_file=gin/models/llama2_70b.gin --gin_file=gin/mesh/fsdp.gin \
        --gin.MESH_SHAPE="{'data': 1, 'fsdp': -1, 'tensor': 4}" --multihost

Prints the JAX version and backend, the process count and index, the local and global devices
(kind, platform, memory where the backend reports it) and the mesh of the partitioner the gin
files bind (`PARTITIONER = @partitioning.Partitioner()`, or any reference to it): the bound
mesh shape, its sizes resolved against these devices, and the logical-axis rules. Runs no job
and allocates no weights. Takes launch's flags (--gin_file, --gin_bindings, --gin.NAME=VALUE,
--gin_search_paths, --multihost ...); REQUIRED macros (WORKDIR, ...) may stay unset. Exit
status: 0, or 2 for a gin error, 1 when the mesh cannot be built on these devices.
"""

from __future__ import annotations

import sys

from absl import app, flags

from xwin_jax import launch, redaction

FLAGS = flags.FLAGS
MAX_DEVICE_LINES = 16


def _gib(n) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


def device_line(device) -> str:
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends (CPU) do not report memory
        pass
    memory = "memory n/a"
    if stats and "bytes_limit" in stats:
        memory = (f"memory {_gib(stats['bytes_limit'])} limit, "
                  f"{_gib(stats.get('bytes_in_use', 0))} in use")
    return (f"  [{device.id}] {device.platform} {device.device_kind!r} process "
            f"{device.process_index}, {memory}")


def describe_devices() -> list[str]:
    import jax
    lines = [f"jax {jax.__version__}, backend {jax.default_backend()}",
             f"processes: {jax.process_count()} (this is process {jax.process_index()})"]
    local, everywhere = jax.local_devices(), jax.devices()
    lines.append(f"local devices: {len(local)}")
    lines += [device_line(d) for d in local[:MAX_DEVICE_LINES]]
    if len(local) > MAX_DEVICE_LINES:
        lines.append(f"  ... and {len(local) - MAX_DEVICE_LINES} more")
    kinds = sorted({d.device_kind for d in everywhere})
    lines.append(f"global devices: {len(everywhere)} ({', '.join(kinds)}) over "
                 f"{len({d.process_index for d in everywhere})} process(es)")
    return lines


def bound_partitioner():
    """The gin reference that builds the job's Partitioner, and where it was found: the
    PARTITIONER macro, else any reference to partitioning.Partitioner; (None, None) when the
    configuration binds none."""
    import gin

    from xwin_jax import partitioning

    try:
        value = gin.query_parameter("PARTITIONER/macro.value")
        if isinstance(value, gin.config.ConfigurableReference):
            return value, "PARTITIONER"
    except ValueError:
        pass
    # gin has no public listing of every binding; iterate_references over its config does it.
    for reference in gin.config.iterate_references(gin.config._CONFIG):
        if partitioning.Partitioner in (reference.configurable.wrapped,
                                        reference.configurable.wrapper):
            return reference, "reference"
    return None, None


def describe_mesh() -> tuple[list[str], int]:
    reference, where = bound_partitioner()
    if reference is None:
        return (["mesh: this configuration binds no partitioning.Partitioner; the job builds "
                 "its own default (train jobs: Partitioner() = fsdp over all devices; "
                 "pipeline.run: one device)"], 0)
    import jax

    how = "the PARTITIONER macro" if where == "PARTITIONER" else "bound directly"
    lines = [f"partitioner: {reference} ({how})"]
    try:
        partitioner = reference.scoped_configurable_fn()
    except ValueError as err:
        return lines + [f"mesh error: {err}"], 1
    lines.append(f"  mesh_shape as bound: {dict(partitioner.mesh_shape)}")
    sizes = partitioner.sizes
    lines.append("mesh: " + " ".join(f"{k}={v}" for k, v in sizes.items())
                 + f" ({partitioner.mesh.size} devices; axis names {partitioner.mesh.axis_names})")
    lines.append(f"  device ids by mesh position: {partitioner.mesh.device_ids.tolist()}"
                 if partitioner.mesh.size <= 64 else
                 f"  device ids: {partitioner.mesh.size} devices, first "
                 f"{partitioner.mesh.device_ids.ravel()[:8].tolist()} ...")
    available = len(partitioner.devices if partitioner.devices is not None else jax.devices())
    if partitioner.mesh.size < available:
        lines.append(f"  note: the mesh uses {partitioner.mesh.size} of the {available} devices "
                     f"(a fully specified smaller mesh runs on the first ones)")
    lines.append(f"  global batch must be a multiple of data x fsdp = "
                 f"{partitioner.batch_divisor}")
    lines.append("logical-axis rules (logical → mesh axes; a mesh axis of size 1 is unused):")
    for name, axes in partitioner.rules:
        lines.append(f"  {name:<14} → {axes}")
    return lines, 0


def check(files: list[str], bindings: list[str], search_paths: list[str]) -> int:
    """Prints the report; returns the exit status."""
    try:
        launch.parse_gin(files, bindings, search_paths)
        unset = None
    except launch.RequiredMacroError as err:  # fine here: a check runs no job
        unset = err.name
    except launch.GinConfigError as err:
        print(launch.describe_error(err), file=sys.stderr)
        return 2
    for line in describe_devices():
        print(line)
    print(f"gin: {', '.join(files)}" + (f" (+{len(bindings)} binding(s))" if bindings else ""))
    if unset:
        print(f"  note: REQUIRED macro {unset} (and maybe others) unset; a job needs it, the "
              f"check does not")
    lines, status = describe_mesh()
    for line in lines:
        print(line)
    sys.stdout.flush()
    return status


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.gin_file:
        raise app.UsageError("--gin_file is required (e.g. --gin_file=gin/mesh/fsdp.gin)")
    launch.init_multihost()
    return check(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)


def run_main():
    redaction.redact_process_output()
    argv = launch.rewrite_gin_args(sys.argv)
    if not any(arg.startswith(("--verbosity", "-v")) for arg in argv[1:]):
        argv.append("--verbosity=-1")
    app.run(main, argv=argv)


if __name__ == "__main__":
    run_main()
