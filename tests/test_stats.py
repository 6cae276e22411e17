"""medmat.stats: intervals, the paired two-stage bootstrap, equivalence and degeneracy checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from medmat.scoring import tie_break
from medmat.stats import (
    accuracy_interval,
    clip_pct,
    degenerate,
    degenerate_cell,
    equivalence,
    guessed_share,
    mean_gap_bootstrap,
    paired_bootstrap_gap,
    t_interval,
    wilson_ci,
)


def outcomes(rate_by_seed: dict[int, float], n: int = 200, seed: int = 0) -> dict[int, dict[str, bool]]:
    rng = np.random.default_rng(seed)
    return {s: {f"q{i}": bool(rng.random() < r) for i in range(n)} for s, r in rate_by_seed.items()}


def test_t_interval_matches_scipy_and_edge_cases():
    mean, lo, hi = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert (hi - lo) / 2 == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert math.isnan(t_interval([0.4])[1]) and math.isnan(t_interval([])[0])


def test_wilson_and_clip():
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == 1.0
    assert clip_pct(-12.0, 114.0) == (0.0, 100.0)


def test_paired_gap_detects_a_real_gap_and_not_a_null_one():
    a = outcomes({0: 0.8, 1: 0.8, 2: 0.8}, seed=1)
    b = outcomes({0: 0.4, 1: 0.4, 2: 0.4}, seed=2)
    g = paired_bootstrap_gap(a, b, n_boot=500)
    assert g["significant"] and g["lo"] > 20 and g["lo"] < g["gap"] < g["hi"]
    assert g["n_seeds"] == 3 and g["n_questions"] == 200
    null = paired_bootstrap_gap(outcomes({0: 0.5, 1: 0.5, 2: 0.5}, seed=3), outcomes({0: 0.5, 1: 0.5, 2: 0.5}, seed=4),
                                n_boot=500)
    assert null["lo"] < 0 < null["hi"] and not null["significant"]


def test_a_collapsing_seed_widens_the_interval():
    """Seeds 100/98/44: resampling seeds must carry that variance (a question-only bootstrap would not)."""
    b = outcomes({0: 0.33, 1: 0.33, 2: 0.33}, seed=5)
    steady = paired_bootstrap_gap(outcomes({0: 0.8, 1: 0.8, 2: 0.8}, seed=6), b, n_boot=1000)
    collapsing = paired_bootstrap_gap(outcomes({0: 1.0, 1: 0.98, 2: 0.44}, seed=6), b, n_boot=1000)
    assert collapsing["hi"] - collapsing["lo"] > 3 * (steady["hi"] - steady["lo"])


def test_bootstrap_is_deterministic_for_a_seed():
    a, b = outcomes({0: 0.7, 1: 0.6}, seed=7), outcomes({0: 0.5, 1: 0.5}, seed=8)
    assert paired_bootstrap_gap(a, b, seed=3) == paired_bootstrap_gap(a, b, seed=3)


def test_mean_gap_over_rows_and_accuracy_interval_in_range():
    b = outcomes({0: 0.34, 1: 0.34, 2: 0.34}, seed=9)
    rows = [(outcomes({0: 0.9, 1: 0.85, 2: 0.9}, seed=10), b), (outcomes({0: 0.6, 1: 0.6, 2: 0.65}, seed=11), b)]
    m = mean_gap_bootstrap(rows, groups=["03", "03"], n_boot=500)
    singles = [paired_bootstrap_gap(a, bb)["gap"] for a, bb in rows]
    assert m["gap"] == pytest.approx(sum(singles) / 2) and m["rows"] == 2 and m["lo"] > 0
    acc = accuracy_interval(outcomes({0: 0.99, 1: 1.0, 2: 1.0}, seed=12), n_boot=300)
    assert 0.0 <= acc["lo"] <= acc["acc"] <= acc["hi"] <= 100.0


def test_clusters_of_one_question_each_are_the_question_bootstrap():
    """The cluster option resamples whole clusters; a cluster per question is the plain bootstrap."""
    rows = [(outcomes({0: 0.8, 1: 0.7, 2: 0.9}, seed=13), outcomes({0: 0.4, 1: 0.4, 2: 0.5}, seed=14))]
    plain = mean_gap_bootstrap(rows, ["03"], n_boot=400, seed=1)
    singletons = [{q: q for q in rows[0][0][0]}]
    assert mean_gap_bootstrap(rows, ["03"], n_boot=400, seed=1, clusters=singletons) == {
        **plain, "method": plain["method"].replace("questions", "question clusters")}
    one_cluster = mean_gap_bootstrap(rows, ["03"], n_boot=400, seed=1, clusters=[{}])  # every id unknown
    assert one_cluster["gap"] == plain["gap"]
    assert one_cluster["hi"] - one_cluster["lo"] < plain["hi"] - plain["lo"] + 1e-9  # seeds only remain


def test_equivalence_needs_the_whole_interval_inside_the_band():
    assert equivalence(-3.0, 4.0)
    assert not equivalence(-45.0, 53.0)  # covers 0, but shows nothing
    assert not equivalence(1.0, 6.0) and not equivalence(math.nan, 1.0)
    assert equivalence(-7.0, 7.0, margin=8.0)


def test_degenerate_flags_position_answers_and_exact_chance():
    one_letter = [{"predicted_letter": "A", "correct": i % 3 == 0} for i in range(90)]
    assert degenerate(one_letter, 3) == "one letter (answers by position) in 1 of 1 seeds (seed 0: A for 100% of 90 questions)"
    at_chance = {s: [{"predicted_letter": "ABC"[i % 3], "correct": i % 3 == 0} for i in range(90)] for s in range(3)}
    assert "1/3" in degenerate(at_chance, 3)
    varied = {s: [{"predicted_letter": "ABC"[(i + s) % 3], "correct": (i + s) % 4 == 0} for i in range(90)]
              for s in range(3)}
    assert degenerate(varied, 3) is None
    # one label whatever the image (the letters vary: the options are shuffled), in any one seed
    one_label = {s: [{"predicted_letter": "ABC"[i % 3], "predicted_text": "Normal" if s < 2 or i % 4 else "COVID-19",
                      "correct": i % 3 == 0} for i in range(90)] for s in range(3)}
    assert degenerate(one_label, 3) == ("one answer whatever the image in 2 of 3 seeds (seed 0: 'Normal' for 100%, "
                                        "seed 1: 'Normal' for 100% of 90 questions)")
    mostly = {s: [dict(p, predicted_text="Normal" if i % 5 else "COVID-19", correct=(i + s) % 4 == 0)
                  for i, p in enumerate(ps)] for s, ps in one_label.items()}
    assert degenerate(mostly, 3) is None  # 80% one label: it still looks at the image
    assert "1/4" in degenerate_cell([{"accuracy": 0.25}] * 3)
    assert degenerate_cell([{"accuracy": 0.25}, {"accuracy": 0.3}]) is None


def test_guessed_share_counts_answers_whose_best_score_is_tied():
    tied, clear = json.dumps([-1.0986, -1.0986, -1.0986]), json.dumps([-0.2, -1.9, -1.9])  # a tie below the best: decided
    preds = {0: [{"raw_output": tied}] * 3 + [{"raw_output": clear}], 1: [{"raw_output": clear}] * 4}
    assert guessed_share(preds) == 3 / 8
    assert guessed_share([{"raw_output": "The answer is B."}, {"raw_output": ""}]) is None  # the generate scorer


def test_tie_break_is_seeded_not_positional():
    tied = [0.0, 0.0, 0.0]
    picks = {tie_break(tied, f"r{i}", seed=0) for i in range(60)}
    assert picks == {0, 1, 2}  # not always the first option
    assert [tie_break(tied, f"r{i}", 0) for i in range(20)] == [tie_break(tied, f"r{i}", 0) for i in range(20)]
    assert [tie_break(tied, f"r{i}", 0) for i in range(20)] != [tie_break(tied, f"r{i}", 1) for i in range(20)]
    assert tie_break([0.1, 0.5, 0.2], "r", 0) == 1  # no tie: the best score
