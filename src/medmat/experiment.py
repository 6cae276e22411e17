"""params.yaml `experiment:` section: what the study runs (`designs:` says with which data).

A light module on purpose: the control world's stage and the designs read it without importing
the training stack.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class ExperimentConfig:
    """params.yaml `experiment:` section: what runs (`designs:` says with which data)."""

    targets: list = dataclasses.field(default_factory=lambda: ["03", "28", "06"])
    # Which Table-3 combinations of each target run: "paper" (the paper's rows for these targets),
    # "all" (every valid combination) or a list of combination ids (`medmat designs --list`).
    combinations: Any = "paper"
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    # Scale-up (Figure 4), in-distribution and limited-data arms run for these targets only, with
    # their own seeds (fewer keeps `make demo` in budget).
    scaleup_targets: list = dataclasses.field(default_factory=lambda: ["03", "28"])
    scaleup_seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    limited_targets: list = dataclasses.field(default_factory=lambda: ["03"])
    control: bool = True  # the same Table-3 arms on the --entangled world, its targets null (negative control)
    # The negative control replicated over this many entangled worlds, one training seed each (stage
    # control-worlds, medmat.control_worlds): other draws of the training looks. 0 = off (one world only).
    control_worlds: int = 0
    # `train:` keys overridden for every unit; validated as `train:` keys (a typo is an error).
    train_overrides: dict = dataclasses.field(default_factory=dict)
    workers: int = 2  # units trained in parallel processes (1 torch thread each)
    executor: str = "local"  # local: a process pool on this machine; ray: Ray tasks (medmat.ray_executor)
    # executor ray: "" = a local Ray on this machine, "auto" = the cluster this node belongs to,
    # "ray://head:10001" = a remote cluster (docs/scale-out.md). Each unit asks Ray for these resources.
    ray_address: str = ""
    ray_cpus_per_unit: float = 1
    ray_gpus_per_unit: float = 0

    def __post_init__(self):
        if not (self.combinations in ("paper", "all") or isinstance(self.combinations, list)):
            raise ValueError(f"combinations must be 'paper', 'all' or a list of ids, got {self.combinations!r}")
        if self.executor not in ("local", "ray"):
            raise ValueError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if float(self.ray_cpus_per_unit) <= 0 or float(self.ray_gpus_per_unit) < 0:
            raise ValueError("ray_cpus_per_unit must be > 0 and ray_gpus_per_unit >= 0")
        if int(self.control_worlds) == 1 or int(self.control_worlds) < 0:
            raise ValueError(f"control_worlds must be 0 (off) or at least 2 (the spread between worlds is the "
                             f"point), got {self.control_worlds}")
        if int(self.workers) < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
