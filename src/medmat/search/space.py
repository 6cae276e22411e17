"""The search space: which candidate subsets enter a mixture, in what proportions, at EXACTLY the budget.

A trial chooses `use_<subset>` (enters or not) and, for those that enter, `n_<subset>` (a request on a
grid of `step` samples). The requests are only proportions: the mixture a trial trains on shares the
budget over the chosen subsets in proportion to them (`medmat.mixture.allocate`: largest remainder,
a subset that holds fewer records passes its shortfall to the others). So every trial trains on the
same number of samples, and a mixture can never win by having more data. A choice whose subsets
together hold fewer records than the budget cannot be compared at equal size: the worker prunes it.

The user-attribute keys a trial carries (visible in optuna-dashboard) are defined here, since the
storage, the objective and the outputs all read them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from medmat.mixture import allocate
from medmat.names import subset_key

# trial user_attrs keys
OWNER = "owner"              # host:pid:start-time of the process running the trial
MIXTURE = "mixture"          # the mixture the trial trained on (exactly the budget) as {subset: samples}
SOURCE = "source"            # "warm:<arm>", "sampler", "retry:<trial number>"
WARM = "warm_start"          # arm path of a warm-start trial (idempotency key for enqueueing)
RETRY_OF = "retry_of"        # number of the killed trial this one replaces
DESIGN = "design_mixture"    # a warm-start trial's design counts (its proportions are what it trains on)
MLFLOW_RUN = "mlflow_run_id"
PRUNE_REASON = "prune_reason"


class SearchError(ValueError):
    """A search that cannot run as configured; the message names the file or setting."""


def key(subset: Any) -> str:
    """Subset number as a mixture component name ("4" -> "04"); SearchError if it is not one."""
    try:
        return subset_key(subset)
    except ValueError as exc:
        raise SearchError(f"candidate {subset!r}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class MixtureSpace:
    """Conditional space: `n_<s>` exists only when `use_<s>` is True."""

    limits: Mapping[str, int]   # subset -> most samples it can give (cap, and what the records hold)
    budget: int                 # every mixture trains on exactly this many samples
    step: int = 50

    def __post_init__(self) -> None:
        if not self.limits:
            raise SearchError("the search space has no candidate subsets (none with training records?)")
        if self.budget < 1:
            raise SearchError(f"total budget must be >= 1, got {self.budget}")
        if sum(self.limits.values()) < self.budget:
            raise SearchError(f"the candidate subsets hold {sum(self.limits.values())} training records in all, "
                              f"fewer than the budget {self.budget}: lower search.total_budget")

    def bounds(self, subset: str) -> tuple[int, int, int]:
        hi = int(self.limits[subset])
        step = min(self.step, hi)
        low = step
        high = low + ((hi - low) // step) * step
        return low, high, step

    def suggest(self, trial) -> dict[str, int]:
        chosen = {}
        for s in sorted(self.limits):
            if trial.suggest_categorical(f"use_{s}", [False, True]):
                low, high, step = self.bounds(s)
                chosen[s] = trial.suggest_int(f"n_{s}", low, high, step=step)
        return self.apply_budget(chosen)

    def apply_budget(self, requests: Mapping[str, int]) -> dict[str, int]:
        """The requests' proportions scaled to exactly `budget` samples (fewer only when the chosen
        subsets hold fewer records: see `at_budget`)."""
        alloc = allocate({key(s): int(n) for s, n in requests.items() if int(n) > 0},
                         {s: int(n) for s, n in self.limits.items()}, self.budget)
        return {s: n for s, n in sorted(alloc.items()) if n > 0}

    def at_budget(self, mixture: Mapping[str, int]) -> bool:
        return sum(int(n) for n in mixture.values()) == self.budget

    def params_for(self, mixture: Mapping[str, int]) -> dict[str, Any]:
        """Trial params that reproduce `mixture`'s proportions (as closely as the grid allows), for
        enqueue_trial; the exact proportions travel in the DESIGN attribute."""
        mixture = {key(s): int(n) for s, n in mixture.items() if int(n) > 0}
        unknown = sorted(set(mixture) - set(self.limits))
        if unknown:
            raise SearchError(f"warm-start mixture uses subsets {unknown} outside the candidates")
        params: dict[str, Any] = {}
        for s in sorted(self.limits):
            params[f"use_{s}"] = s in mixture
            if s in mixture:
                low, high, step = self.bounds(s)
                n = low + round((min(max(mixture[s], low), high) - low) / step) * step
                params[f"n_{s}"] = int(min(n, high))
        return params


def mixture_of(trial) -> dict[str, int]:
    """The mixture a trial trained on (user attr), else its params' requests (not budget-scaled)."""
    if MIXTURE in trial.user_attrs:
        return {str(k): int(v) for k, v in trial.user_attrs[MIXTURE].items()}
    return {k[2:]: int(v) for k, v in trial.params.items() if k.startswith("n_") and trial.params.get("use_" + k[2:])}
