"""The experiment arms of the Med-MAT paper for each target, written as mixture manifests.

- `rules`: which Related combinations are valid for a target (the paper's design rules, Table 3 and
  Appendix A.4, with the coarse or fine Task taxonomy) and which Table 3 rows they reproduce;
- `leakage`: training records showing a target's dev/test image (exact or near duplicate);
- `arms`: the manifests of one target (Related / Baseline+ per combination at equal size, scale-up,
  limited target data, in-distribution, the dev split) and the files they are written to;
- `cli`: `medmat designs` (and `--list`).
"""

from medmat.designs.rules import DIRECTIONS, Combination, paper_rows  # noqa: F401
from medmat.designs.arms import (  # noqa: F401
    ALL_ARMS, COMBINATION_ARMS, SCALEUP_ARMS, DesignError, DesignsConfig, Target, build_target, combinations,
    load_arm, load_index, resolve_target, select, target_label, target_splits, warm_start_mixtures, write_json,
    write_target)
from medmat.designs.cli import configure, design_targets, load_config, parse_targets, run  # noqa: F401
