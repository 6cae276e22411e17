"""The study's units as Ray tasks: one task = train + evaluate one (target, arm, seed) via run_unit.

    results = run_units_ray(specs)                               # a local Ray on this machine
    results = run_units_ray(specs, address="ray://head:10001",   # a cluster (KubeRay, SLURM, ...)
                            num_gpus_per_unit=1)

`dvc repro` stays the entry point: the study stage (medmat.pipeline) hands its units to Ray through
`dispatch` and waits; DVC sees one stage that wrote its outputs. Ray adds scheduling over many
machines and GPUs (each task asks for `num_cpus`/`num_gpus`/custom resources and runs where they are
free); the unit itself is unchanged, so results equal the in-process executor's for the same seeds.

- Idempotent: a unit whose folder already holds its finished fingerprint (`medmat.unit.finished`) is
  answered by the driver without a task; a task that finds one (another driver finished it) returns
  it without training.
- Resumable: a task killed mid-training (node lost, preempted) leaves its checkpoints in the run
  folder; Ray retries it (`max_retries`) and run_unit resumes from the last checkpoint.
- Paths: relative to the driver's working directory, which every node must see at the same path
  (medmat.ray_cluster).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from medmat.ray_cluster import ray_session, submit

if TYPE_CHECKING:
    from medmat.runspec import RunSpec

log = logging.getLogger("medmat.ray_executor")


def _unit_task(spec: RunSpec) -> dict[str, Any]:
    import ray

    from medmat.unit import run_unit

    out = dict(run_unit(spec))
    ctx = ray.get_runtime_context()
    # Where it ran: not part of metrics.json, only of the returned record (the tests read it).
    out["ray_node_id"] = ctx.get_node_id()
    out["ray_worker_pid"] = os.getpid()
    return out


def run_units_ray(specs: list[RunSpec], address: str | None = None, num_cpus_per_unit: float = 1,
                  num_gpus_per_unit: float = 0, resources: dict[str, float] | None = None,
                  max_retries: int = 1, init_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """run_unit over `specs` as Ray tasks; results in spec order (metrics.json contents).

    address: None/"" = a Ray already initialised in this process, else a new local one (sized to this
    machine); "auto" = the cluster this machine belongs to; "ray://host:10001" = a remote cluster
    through Ray Client. A Ray started here is shut down at the end; one found running is left alone.
    """
    import ray

    from medmat.unit import finished

    results: list[dict[str, Any] | None] = [finished(s) for s in specs]
    todo = [i for i, r in enumerate(results) if r is None]
    log.info("%d units to run on Ray (%d already finished)", len(todo), len(specs) - len(todo))
    if not todo:
        return results  # type: ignore[return-value]
    with ray_session(address, init_kwargs):
        t0 = time.time()
        refs = dict(zip(submit(_unit_task, [(specs[i],) for i in todo], "medmat-unit", num_cpus_per_unit,
                               num_gpus_per_unit, resources, max_retries), todo))
        pending = list(refs)
        while pending:  # collect as they finish, so the log shows progress on long studies
            done, pending = ray.wait(pending, num_returns=1)
            i = refs[done[0]]
            results[i] = ray.get(done[0])
            log.info("%s seed %d done on node %s (%d/%d, %.0f s)", specs[i].cell, specs[i].seed,
                     str(results[i].get("ray_node_id", "?"))[:8], len(todo) - len(pending), len(todo),
                     time.time() - t0)
    return results  # type: ignore[return-value]


def dispatch(specs: list[RunSpec], experiment: Any) -> list[dict[str, Any]]:
    """The study's executor, chosen by params: `experiment.executor` local (a process pool of
    `experiment.workers`) or ray (`experiment.ray_address`, empty = a local Ray; each unit asks for
    `ray_cpus_per_unit` CPUs and `ray_gpus_per_unit` GPUs)."""
    if experiment.executor == "ray":
        # A local Ray gets `workers` units' worth of CPUs: the same parallelism as the process pool.
        local = {} if experiment.ray_address else {"num_cpus": experiment.workers * experiment.ray_cpus_per_unit}
        return run_units_ray(specs, address=experiment.ray_address or None,
                             num_cpus_per_unit=experiment.ray_cpus_per_unit,
                             num_gpus_per_unit=experiment.ray_gpus_per_unit, init_kwargs=local)
    from medmat.unit import run_units

    return run_units(specs, experiment.workers)
