"""What a trial's value means: the target problem (candidates, budget, dev split, warm start) and the
real objective (resolve the mixture at exactly the budget, train, score the target's dev split).

The problem is read from `medmat designs` output (`<designs>/<target>/index.json`, `dev.json`), so
the search sees the same dev split, the same warm-start mixtures and the same leakage exclusions as
the study's arms:

- candidates: subsets sharing at least one element with the target under the designs' task taxonomy
  (or `search.candidates`), never the target itself; their pool = train records minus any record whose
  image is a target dev/test image (exact or near copy, `medmat.designs.leakage`, at the designs'
  `phash_distance`);
- budget: `search.total_budget`, or (0) the largest selected total of the target's Related
  combinations, so the search's best mixture is compared with the Related arms at equal size;
- warm start: the Related arm of every combination and All Related (`designs.warm_start_mixtures`),
  each evaluated at its proportions scaled to the budget.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medmat.names import subset_key
from medmat.search.space import MLFLOW_RUN, MixtureSpace, SearchError, key
from medmat.tracking import OPTUNA_STORAGE

log = logging.getLogger("medmat.search")

DEFAULT_STORAGE = OPTUNA_STORAGE


@dataclasses.dataclass
class SearchConfig:
    """`search:` section of params.yaml."""

    storage: str = DEFAULT_STORAGE
    n_trials: int = 10               # finished trials per study (a resumed search runs only the rest)
    workers: int = 1                 # processes sharing the study
    seed: int = 0                    # sampler seed (worker k uses seed + k: identical seeds would collide)
    sampler: str = "tpe"             # tpe | random (random is the benchmark's baseline)
    warm_start: bool = True          # enqueue the designs' Related mixtures and All Related first
    candidates: Any = "related"      # "related" (share >= 1 element, target excluded) or a list of subsets
    total_budget: int = 0            # exact training samples per trial; 0 = the Related combinations' total
    max_per_subset: int = 3000       # paper's cap per subset
    step: int = 50                   # grid of the per-subset requests (proportions)
    pruner_startup_trials: int = 3   # MedianPruner: no pruning before this many finished trials
    pruner_warmup_steps: int = 0     # ... nor before this training step within a trial
    train: dict = dataclasses.field(default_factory=dict)  # overrides of the `train:` section for trials
    study_prefix: str = "medmat"     # study "<prefix>-<world>-<target>-<triplet>"

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ValueError("n_trials must be >= 1")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.sampler not in ("tpe", "random"):
            raise ValueError(f"sampler must be 'tpe' or 'random', got {self.sampler!r}")
        if self.step < 1 or self.max_per_subset < 1 or self.total_budget < 0:
            raise ValueError("step and max_per_subset must be >= 1, total_budget >= 0")
        if not (self.candidates == "related" or isinstance(self.candidates, (list, tuple))):
            raise ValueError("candidates must be 'related' or a list of subset numbers")


@dataclasses.dataclass
class TargetProblem:
    """Everything the real objective needs, resolved from params, records and designs."""

    target: str                 # target label used in paths and names ("03", or the triplet)
    triplet: str
    world: str                  # records table's world: mini | mini-entangled | medmat
    pool: Any                   # candidate training records (DataFrame): no dev record, no leaking image
    dev_df: Any                 # target dev split
    space: MixtureSpace
    warm: dict[str, dict[str, int]]
    data_root: str | None = None
    leakage_dropped: int = 0    # candidate records left out because they show a target dev/test image


def build_problem(records_path: Path, designs: Path, target_text: str, cfg: SearchConfig,
                  dev_path: Path | None = None) -> TargetProblem:
    from medmat.catalog import load_catalog, parse_target
    from medmat.data.records import data_root_of, read_records, world_of
    from medmat.designs import DesignError, load_index, warm_start_mixtures
    from medmat.designs.leakage import leaking_records

    cat = load_catalog()
    triplet, target_no = parse_target(target_text, cat)
    target = subset_key(target_no) if target_no is not None else str(triplet)
    try:
        records = read_records(records_path)
        data_root, world = str(data_root_of(records_path)), world_of(records_path)
    except (OSError, ValueError) as exc:
        raise SearchError(f"{records_path}: cannot read the records table ({exc})") from exc
    try:
        index = load_index(designs, target)
        warm = warm_start_mixtures(designs, target)
    except (DesignError, OSError, ValueError, KeyError) as exc:
        raise SearchError(f"{designs}: cannot read the designs of target {target} ({exc})") from exc
    tdir = Path(designs) / target
    dev_file = Path(dev_path) if dev_path is not None else (tdir / index["dev"] if index.get("dev") else None)
    if dev_file is None or not dev_file.is_file():
        raise SearchError(f"{designs}: no dev split for target {target} (expected {tdir / 'dev.json'})")
    data = json.loads(dev_file.read_text(encoding="utf-8"))
    dev_ids = [str(i) for i in (data.get("record_ids") if isinstance(data, dict) else data) or []]
    if not dev_ids:
        raise SearchError(f"{dev_file}: the dev split of target {target} names no record_ids")

    ids = records["record_id"].astype(str)
    absent = sorted(set(dev_ids) - set(ids))
    if absent:
        raise SearchError(f"{dev_file}: {len(absent)} dev record id(s) not in {records_path}, e.g. {absent[:3]}")
    dev_df = records[ids.isin(set(dev_ids))].reset_index(drop=True)
    subset = records["subset_no"].map(lambda v: subset_key(v, missing=""))
    test_ids = ids[(subset == target) & (records["split"] == "test")].tolist()
    leaks = leaking_records(records, dev_ids + test_ids, int((index.get("leakage") or {}).get("phash_distance", 4)))

    if cfg.candidates == "related":
        # Related under the task taxonomy the designs were built with (index.json), so the search
        # space holds every member of the warm-start arms: with the catalogue's fine tasks, 07's
        # DP-Mouth-Cancer (Cancer, as the paper reads Melanoma) was no candidate, its Related arm was
        # tried without it, and 03's All Related without the seven subsets it shares only "State" with.
        from medmat.designs import rules

        taxonomy = index.get("task_taxonomy", "paper")
        cands = [key(s) for s in rules.related_pool(cat, rules.target_view(cat, triplet, target_no, taxonomy), taxonomy)]
    else:
        cands = [key(s) for s in cfg.candidates]
    cands = sorted(set(cands) - {target})
    in_cands = (records["split"] == "train") & subset.isin(cands) & ~ids.isin(set(dev_ids))
    pool = records[in_cands & ~ids.isin(set(leaks))].reset_index(drop=True)
    avail = subset[in_cands & ~ids.isin(set(leaks))].value_counts().to_dict()
    limits = {s: min(int(avail[s]), cfg.max_per_subset) for s in cands if avail.get(s, 0) > 0}
    if not limits:
        raise SearchError(f"target {target} ({triplet}): none of the candidate subsets {cands} has training records")

    for arm, mixture in warm.items():
        if missing := sorted(set(mixture) - set(limits)):
            log.warning("target %s: warm-start arm %s is tried without %s (not among the candidates with "
                        "training records)", target, arm, ", ".join(missing))
    warm = {a: {s: n for s, n in m.items() if s in limits} for a, m in warm.items()}
    warm = {a: m for a, m in warm.items() if m}
    combos = [int(c.get("selected_total", 0)) for c in index.get("combinations", [])]
    budget = cfg.total_budget or max(combos, default=0) or max((sum(m.values()) for m in warm.values()), default=0)
    if not budget:
        raise SearchError(f"target {target}: no Related combination to take the budget from; set search.total_budget")
    space = MixtureSpace(limits=limits, budget=int(budget), step=cfg.step)
    return TargetProblem(target=target, triplet=str(triplet), world=world, pool=pool, dev_df=dev_df, space=space,
                         warm=warm, data_root=data_root, leakage_dropped=int(in_cands.sum() - len(pool)))


def objective_fingerprint(problem: TargetProblem, cfg: SearchConfig, params: Mapping[str, Any]) -> str:
    """Hash of everything a trial's value depends on: training and model params, the evaluation scorer,
    the search space (budget included), the dev split and the candidates' records. Trials of one study
    must share it — values measured under other settings are not comparable (the sampler would learn
    from noise)."""
    from medmat.mixture import ids_sha256

    payload = {
        "train": {**(params.get("train") or {}), **cfg.train},
        "model": params.get("model") or {},
        "scorer": (params.get("evaluate") or {}).get("scorer", "likelihood"),
        "space": {"limits": dict(sorted(problem.space.limits.items())), "budget": problem.space.budget,
                  "step": problem.space.step},
        "dev": ids_sha256(problem.dev_df["record_id"].astype(str)),
        "candidates": ids_sha256(problem.pool["record_id"].astype(str)),
        "mixture_seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def resolve(problem: TargetProblem, mixture: Mapping[str, int], seed: int):
    """(training records, manifest) of `mixture` at exactly the budget; SearchError if it falls short."""
    from medmat.mixture import resolve_mixture

    train_df, manifest = resolve_mixture(problem.pool, {"components": dict(mixture)}, seed=seed,
                                         cap_per_subset=None, exact_total=problem.space.budget)
    if not manifest["matched"]:
        raise SearchError(f"mixture {dict(mixture)}: {manifest['total']} records, not the budget {problem.space.budget}")
    return train_df, manifest


def train_objective(problem: TargetProblem, cfg: SearchConfig, params_path: Path, parent_run_id: str | None,
                    mixture_seed: int = 0):
    """The real objective: resolve the mixture, train with medmat.train, score the dev split."""
    import optuna

    from medmat import tracking
    from medmat.config import from_dict, load_params
    from medmat.models import ModelConfig
    from medmat.scoring import evaluate_backend
    from medmat.train import TrainConfig, train_model

    params = load_params(params_path)
    train_cfg = from_dict(TrainConfig, {**(params.get("train") or {}), **cfg.train}, where=f"{params_path}: train")
    model_cfg = from_dict(ModelConfig, params.get("model"), where=f"{params_path}: model")
    track_cfg = from_dict(tracking.TrackingConfig, params.get("tracking"), where=f"{params_path}: tracking")
    eval_scorer = (params.get("evaluate") or {}).get("scorer", "likelihood")

    def evaluate(mixture: dict[str, int], trial) -> float:
        train_df, manifest = resolve(problem, mixture, mixture_seed)
        tags = tracking.run_tags(target=problem.triplet, arm="search", backend=model_cfg.backend, seed=train_cfg.seed,
                                 extra={"trial": trial.number, "study": trial.study.study_name, "world": problem.world})

        def on_eval(step: int, dev_acc: float) -> None:
            tracking.log_metrics({"dev_accuracy": dev_acc}, step=step)
            trial.report(dev_acc, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (dev accuracy {dev_acc:.3f})")

        with tracking.tracked_run(track_cfg, run_name=f"trial {trial.number}", tags=tags,
                                  # the mixture as one JSON param (readable in the UI's run table)
                                  params={"trial": trial.number, "mixture": json.dumps(mixture, sort_keys=True),
                                          "mixture_total": sum(mixture.values())},
                                  parent_run_id=parent_run_id) as run:
            trial.set_user_attr(MLFLOW_RUN, run.info.run_id)
            tracking.log_mixture(manifest, tags.get("medmat.data_version", "untracked"))
            # out_dir=None: a trial keeps no checkpoints or model (a killed trial is re-run whole);
            # tracking=None: the trial's own nested run above is where its metrics go.
            result = train_model(train_cfg, model_cfg, train_df, problem.dev_df, out_dir=None,
                                 on_eval=on_eval, tracking=None, data_root=problem.data_root)
            acc = result.final_dev_accuracy
            if acc is None or eval_scorer != "likelihood":
                acc = evaluate_backend(result.backend, problem.dev_df, scorer=eval_scorer,
                                       seed=train_cfg.seed).accuracy
            tracking.log_metrics({"dev_accuracy_final": acc, "train_wall_s": result.wall_s})
        return acc

    return evaluate
