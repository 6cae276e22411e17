"""Ray, as every part of the platform uses it: one session per call (a local Ray of our own, or a
cluster by address) and tasks that run a function in the driver's working directory.

Paths in run specs and search arguments are relative to the driver's working directory. A task
changes into that directory first, so every node must see it at the same path (a shared file
system: NFS on SLURM, a ReadWriteMany volume on Kubernetes).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any


def in_workdir(fn: Callable[..., Any], workdir: str, threads: int, *args: Any) -> Any:
    """Body of every Ray task here (a Ray worker process, possibly on another machine): fn(*args) in
    the driver's working directory."""
    import torch

    os.chdir(workdir)
    # One intra-op thread per CPU the task was given: two tasks on two cores must not oversubscribe.
    torch.set_num_threads(max(1, threads))
    return fn(*args)


@contextlib.contextmanager
def ray_session(address: str | None, init_kwargs: dict[str, Any] | None = None) -> Iterator[None]:
    """A Ray for the duration: the one already initialised in this process, else a new local one
    (address None/""), the cluster of this machine ("auto") or a remote one ("ray://host:10001").
    A Ray started here is shut down at the end; one found running is left alone."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"log_to_driver": False, **(init_kwargs or {})}
        if not address:  # a Ray of our own on this machine: loopback only, no dashboard
            kwargs = {"include_dashboard": False, "_node_ip_address": "127.0.0.1", **kwargs}
        # "local": always a new Ray of our own, never whichever other Ray happens to run on this machine
        ray.init(address=address or "local", **kwargs)
    try:
        yield
    finally:
        if started_here:
            ray.shutdown()


def submit(fn: Callable[..., Any], calls: list[tuple], name: str, num_cpus: float = 1, num_gpus: float = 0,
           resources: dict[str, float] | None = None, max_retries: int = 1) -> list[Any]:
    """Inside a ray_session: start `fn(*call)` for each call as a Ray task asking for these
    resources (and one torch thread per CPU); returns their object refs in call order. A task whose
    worker process dies is retried up to `max_retries` times."""
    import ray

    task = ray.remote(in_workdir).options(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or {},
                                          max_retries=max_retries, name=name)
    threads = max(1, int(num_cpus))
    return [task.remote(fn, os.getcwd(), threads, *call) for call in calls]


@contextlib.contextmanager
def ray_tasks(fn: Callable[..., Any], calls: list[tuple], experiment: Any, name: str,
              max_retries: int = 1) -> Iterator[Callable[[], list[Any]]]:
    """`submit` with a unit's resources (`experiment.ray_cpus_per_unit`, `ray_gpus_per_unit`) on
    `experiment.ray_address` (a local Ray gets exactly what these tasks ask for); yields wait(), which
    returns their results in call order."""
    import ray

    local = {} if experiment.ray_address else {"num_cpus": len(calls) * experiment.ray_cpus_per_unit}
    with ray_session(experiment.ray_address or None, local):
        refs = submit(fn, calls, name, experiment.ray_cpus_per_unit, experiment.ray_gpus_per_unit,
                      max_retries=max_retries)
        yield lambda: ray.get(refs)
