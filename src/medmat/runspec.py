"""One run spec, built once from params.yaml, carried through train -> evaluate -> track -> register.

A *unit* of the study is one (world, target, arm, seed): train the arm's mixture (unless it is the
untrained Baseline), evaluate on the target's test split (and its dev split, which model selection
reads), and log both to MLflow. Everything a unit needs is in its `RunSpec`; nothing downstream
re-reads params.yaml or parses command lines.

    study = load_study_params("params.yaml")        # every section typed; unknown keys are errors
    spec = RunSpec(target="03", arm="fixed_area-04-28/related", seed=0, ..., params=study)
    medmat.unit.run_unit(spec)                      # -> metrics.json in spec.run_dir

`experiment.train_overrides` is validated like `train:` itself: a misspelled override stops the run
with a message naming it, instead of vanishing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from medmat.config import ConfigError, from_dict, load_params
from medmat.experiment import ExperimentConfig
from medmat.data.images import sha256_file_cached
from medmat.models import start_weights_sha256

# Arms that train on the target's own records (never registry candidates, never "CG").
TARGET_DATA_ARMS = ("in_distribution", "limited", "scaleup/all_data")


@dataclasses.dataclass
class StudyParams:
    """The typed sections a unit reads, built once (train overrides applied and validated)."""

    experiment: ExperimentConfig
    train: Any  # medmat.train.TrainConfig
    model: Any  # medmat.models.ModelConfig
    evaluate: Any  # medmat.evaluate.EvalConfig
    tracking: Any  # medmat.tracking.TrackingConfig
    base_seed: int = 0


def load_study_params(path: str | os.PathLike = "params.yaml") -> StudyParams:
    """Every section a unit needs, typed; unknown keys (overrides included) raise ConfigError."""
    from medmat.scoring import EvalConfig
    from medmat.models import ModelConfig
    from medmat.tracking import TrackingConfig
    from medmat.train import TrainConfig

    params = load_params(path)

    def section(cls, name: str, values: Any = None):
        return from_dict(cls, params.get(name) if values is None else values, where=f"{path}: section '{name}'")

    experiment = section(ExperimentConfig, "experiment")
    train_values = dict(params.get("train") or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(experiment.train_overrides) - known)
    if unknown:
        raise ConfigError(f"{path}: experiment.train_overrides: unknown key(s) {unknown}; "
                          f"known train: keys: {sorted(known)}")
    train_values.update(experiment.train_overrides)
    return StudyParams(
        experiment=experiment,
        train=from_dict(TrainConfig, train_values, where=f"{path}: section 'train' (+ experiment.train_overrides)"),
        model=section(ModelConfig, "model"),
        evaluate=section(EvalConfig, "evaluate"),
        tracking=section(TrackingConfig, "tracking"),
        base_seed=int((params.get("base") or {}).get("seed", 0)),
    )


@dataclasses.dataclass
class RunSpec:
    """Everything one unit needs. Paths are relative to the working directory (the repository)."""

    target: str  # "03"
    triplet: str  # "CT-Lung-COVID"
    subset_no: int
    arm: str  # arm path: baseline | <combination>/related | <combination>/baseline_plus | scaleup/<arm> ...
    seed: int
    records: str  # records table
    run_dir: str
    params: StudyParams
    manifest: str | None = None  # training mixture; None = the untrained Baseline
    dev_manifest: str | None = None  # the target's dev split (model selection reads it, never test)
    combination: str | None = None
    world: str = "mini"  # data world: mini | mini-entangled | medmat (real release)
    data_version: str = "untracked"
    candidate: bool = False  # may become the registry's champion (Related combinations, search best)
    parent_run_id: str | None = None  # MLflow run of the cell (target x arm) this seed is nested under

    @property
    def trained_on_target(self) -> bool:
        return any(self.arm == a or self.arm.startswith(a + "/") for a in TARGET_DATA_ARMS)

    @property
    def cell(self) -> str:
        """The (target, arm) this seed belongs to: its MLflow parent run and DVC metrics file."""
        return f"{self.target}/{self.arm}"

    def tags(self) -> dict[str, str]:
        """MLflow tags, from the spec (so they are right for every world)."""
        return {
            "medmat.target": self.triplet, "medmat.target_no": self.target, "medmat.arm": self.arm,
            "medmat.combination": self.combination or "", "medmat.world": self.world,
            "medmat.data_version": self.data_version, "medmat.backend": self.params.model.backend,
            "medmat.seed": str(self.seed), "medmat.candidate": str(self.candidate).lower(),
        }

    def run_name(self) -> str:
        return f"{self.target} {self.triplet} · {self.arm} · seed {self.seed}"

    def fingerprint(self) -> str:
        """What decides a unit's result: a finished unit with the same fingerprint is not rerun."""
        manifest_hash = sha256_file_cached(self.manifest) if self.manifest else "untrained"
        dev_hash = sha256_file_cached(self.dev_manifest) if self.dev_manifest else ""
        payload = {
            "arm": self.arm, "seed": self.seed, "target": self.target, "world": self.world,
            "manifest": manifest_hash, "dev": dev_hash, "records": sha256_file_cached(self.records),
            "train": dataclasses.asdict(self.params.train) if self.manifest else None,
            "model": dataclasses.asdict(self.params.model), "evaluate": dataclasses.asdict(self.params.evaluate),
            "start_weights": start_weights_sha256(self.params.model),
            "code": code_version(),
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The code that decides a unit's numbers: a change here makes every unit run again (DVC reruns the
# stage on any code change it depends on; units whose results cannot change are still skipped).
RESULT_CODE = ("models", "train.py", "schedule.py", "checkpoints.py", "scoring.py", "mixture.py", "unit.py",
               "data/images.py", "data/records.py")


def code_version() -> str:
    """sha256 over the source files in RESULT_CODE, once per process."""
    if not hasattr(code_version, "value"):
        root = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for rel in RESULT_CODE:
            for f in sorted((root / rel).rglob("*.py")) if (root / rel).is_dir() else [root / rel]:
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
        code_version.value = h.hexdigest()[:16]
    return code_version.value


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
