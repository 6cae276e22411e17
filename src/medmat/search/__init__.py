"""Optuna search for the training mixture that serves a target best.

One study per (world, target), kept in a storage under `mlruns/` (SQLite by default, so `optuna-dashboard
sqlite:///mlruns/optuna.db` opens it). The search space is *which* candidate subsets enter and in
*what proportions*, every mixture at exactly the same total budget; the objective is accuracy on the
target's dev split (disjoint from the test split the report uses). The designs' Related mixtures and
All Related are enqueued as the first trials, so the search starts from what the MAT structure suggests.

- `space`: the mixture space (proportions at exactly the budget) and the trial attribute keys;
- `storage`: storage, locks, killed-trial recovery, the worker loop shared by N processes;
- `objective`: the `search:` config, the target problem from the designs, the real objective;
- `results`: best_mixture.json, history.csv, trial counts for the benchmark;
- `cli`: `medmat search` (readable study names, MLflow parent run, worker processes).
"""

from medmat.search.space import (  # noqa: F401
    DESIGN, MIXTURE, MLFLOW_RUN, OWNER, PRUNE_REASON, RETRY_OF, SOURCE, WARM, MixtureSpace, SearchError, mixture_of)
from medmat.search.storage import (  # noqa: F401
    FINISHED, Evaluate, counts, enqueue_warm_start, lock_path, make_sampler, open_storage, open_study, owner_alive,
    owner_id, recover_stale, run_worker, study_lock)
from medmat.search.objective import (  # noqa: F401
    DEFAULT_STORAGE, SearchConfig, TargetProblem, build_problem, objective_fingerprint, resolve, train_objective)
from medmat.search.results import history_rows, trials_to_beat, trials_to_reach, write_outputs  # noqa: F401
from medmat.search.cli import choose_study_name, configure, default_study_name, run  # noqa: F401
