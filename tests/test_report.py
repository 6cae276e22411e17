"""The report from run folders built by hand in the pipeline's layout: Table 3 beside the paper, paired
bootstrap gaps, the headline's claim, the control's equivalence test, degenerate cells, plot data."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest

from medmat.report import ReportConfig, build_report, run

N_Q = 210  # test questions of the target, answer letters balanced over A/B/C


def write_arm(runs, target, arm, accs, seed=0, letter=None, same_as=None):
    """seed<k>/{metrics.json, predictions.jsonl}; question i is correct with probability accs[k]
    (or copies `same_as`'s outcomes with a few flips, for a control arm that learns nothing)."""
    rng = np.random.default_rng(seed)
    for k, acc in enumerate(accs):
        d = runs / target / arm / f"seed{k}"
        d.mkdir(parents=True, exist_ok=True)
        preds = []
        for i in range(N_Q):
            answer = "ABC"[i % 3]
            if same_as is not None:
                ok = same_as[k][i] if rng.random() > 0.02 else not same_as[k][i]
            else:
                ok = rng.random() < acc
            pred = letter or (answer if ok else rng.choice([x for x in "ABC" if x != answer]))
            preds.append({"record_id": f"r{i}", "subset_no": target, "answer_letter": answer,
                          "predicted_letter": pred, "answer_text": answer, "predicted_text": pred,
                          "raw_output": "", "correct": pred == answer})
        (d / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
        (d / "metrics.json").write_text(json.dumps({"accuracy": sum(p["correct"] for p in preds) / N_Q, "n": N_Q,
                                                    "seed": k, "target": target, "arm": arm}))
    return {k: [p for p in _outcomes(runs / target / arm / f"seed{k}")] for k in range(len(accs))}


def _outcomes(d):
    return [json.loads(x)["correct"] for x in (d / "predictions.jsonl").read_text().splitlines()]


def combo(cid, direction, related, row=None, paper=None):
    return {"id": cid, "direction": direction, "related": related, "members": {r: f"subset {r}" for r in related},
            "paper_row": row, "paper": paper, "arms": {"related": f"{cid}/related.json",
                                                       "baseline_plus": f"{cid}/baseline_plus.json"},
            "selected_total": 600, "matched": True, "shortfall": 0}


def write_index(designs, target, combos, arms=None):
    d = designs / target
    d.mkdir(parents=True, exist_ok=True)
    (d / "index.json").write_text(json.dumps({"target": target, "triplet": "CT-Lung-COVID", "subset_no": int(target),
                                              "combinations": combos, "dropped": [{"id": "fixed_modality",
                                              "reason": "no other subset has task COVID with modality CT"}],
                                              "arms": arms or {}}))


PAPER15 = {"row": 15, "baseline": 47.0, "baseline_plus": 46.0, "trained": 72.0, "cg_helps": "yes"}


@pytest.fixture
def study(tmp_path):
    runs, designs, cruns, cdesigns = (tmp_path / p for p in ("runs", "designs", "control_runs", "cdesigns"))
    combos = [combo("fixed_area-04-28", "fixed_area", ["04", "28"], 15, PAPER15),
              combo("fixed_task-28-05", "fixed_task", ["28", "05"])]
    write_index(designs, "03", combos, arms={"all_related": "scaleup/all_related.json",
                                             "all_unrelated": "scaleup/all_unrelated.json",
                                             "in_distribution": "in_distribution.json",
                                             "limited": {"related_k0": "x", "related_k100": "y", "unrelated_k100": "z"}})
    write_arm(runs, "03", "baseline", [1 / 3] * 3, seed=1, letter="A")  # answers by position: degenerate
    write_arm(runs, "03", "fixed_area-04-28/baseline_plus", [0.34, 0.33, 0.35], seed=2)
    write_arm(runs, "03", "fixed_area-04-28/related", [0.90, 0.88, 0.92], seed=3)
    write_arm(runs, "03", "fixed_task-28-05/baseline_plus", [0.34, 0.33, 0.35], seed=2)
    write_arm(runs, "03", "fixed_task-28-05/related", [0.35, 0.33, 0.34], seed=4)
    for arm, acc, s in (("scaleup/all_related", 0.8, 5), ("scaleup/all_unrelated", 0.4, 6), ("in_distribution", 0.99, 7),
                        ("limited/related_k0", 0.9, 8), ("limited/related_k100", 0.97, 9),
                        ("limited/unrelated_k100", 0.99, 10)):
        write_arm(runs, "03", arm, [acc, acc], seed=s)
    # control: Trained learns nothing beyond Baseline+ (its outcomes copy Baseline+'s, 2% flipped)
    write_index(cdesigns, "03", combos[:1])
    bp = write_arm(cruns, "03", "fixed_area-04-28/baseline_plus", [0.34, 0.33, 0.35], seed=11)
    write_arm(cruns, "03", "fixed_area-04-28/related", [0, 0, 0], seed=12, same_as=bp)
    s = tmp_path / "search" / "03"
    s.mkdir(parents=True)
    s.joinpath("history.csv").write_text("trial,value,state,source,total,mixture\n0,0.6,COMPLETE,warm:related,600,{}\n"
                                         "1,0.55,COMPLETE,sampler,600,{}\n2,,PRUNED,sampler,600,{}\n")
    s.joinpath("best_mixture.json").write_text(json.dumps({"components": {"04": 300}, "dev_accuracy": 0.6, "n_trials": 3}))
    return tmp_path


def build(tmp, **kw):
    cfg = ReportConfig(n_boot=400, **kw)
    return build_report(str(tmp / "runs"), str(tmp / "control_runs"), str(tmp / "designs"), str(tmp / "cdesigns"),
                        str(tmp / "search"), str(tmp / "reports"), cfg, str(tmp / "summary.json"))


def test_table3_paper_beside_ours_with_paired_gaps(study):
    summary = build(study)
    text = (study / "reports" / "report.md").read_text()
    assert "| 15 | 47 / 46 / 72 |" in text                       # the paper's row and numbers beside ours
    rows = {r["combination"]: r for r in csv.DictReader((study / "reports/plots/table3.csv").open())
            if r["world"] == "main"}
    strong, null = rows["fixed_area-04-28"], rows["fixed_task-28-05"]
    assert float(strong["ours_gap"]) > 40 and float(strong["gap_lo"]) > 0 and strong["significant"] == "True"
    assert float(null["gap_lo"]) < 0 < float(null["gap_hi"]) and null["significant"] == "False"
    assert strong["paper_gap"] == "26.0" and null["paper_trained"] == ""
    for r in rows.values():                                       # accuracies stay inside [0, 100]
        assert all(0 <= float(r[k]) <= 100 for k in ("baseline", "baseline_plus", "trained"))
    # 1 of 2 rows significant: the claim needs MOST rows, a positive mean alone does not carry it
    assert summary["main_rows"] == 2 and summary["main_significant"] == 1 and summary["main_mean_gap_pts"] > 20
    assert summary["main_claim_supported"] is False and "**NOT supported**" in text
    assert "Designs that could not be built" in text and "modality CT" in text


def test_control_passes_only_by_equivalence(study):
    summary = build(study)
    lo, hi = summary["control_gap_ci95_pts"]
    assert -5 < lo <= hi < 5 and summary["control_equivalent"] is True
    # a narrower band the same interval does not fit: the control no longer passes (and the report says so)
    strict = build(study, control_band=0.5)
    assert strict["control_equivalent"] is False
    assert "does NOT pass" in (study / "reports" / "report.md").read_text()


def test_the_control_replicated_over_worlds_is_reported_beside_the_one_world(study):
    from medmat.control_worlds import pooled

    path = study / "control_worlds.json"
    cfg = ReportConfig(n_boot=400, control_band=0.5)  # a band the one world's interval does not fit

    def report(file):
        summary = build_report(str(study / "runs"), str(study / "control_runs"), str(study / "designs"),
                               str(study / "cdesigns"), str(study / "search"), str(study / "reports"), cfg,
                               control_worlds_path=str(file))
        return summary, (study / "reports" / "report.md").read_text()

    summary, text = report(path)  # the stage has not run: the one world only, and how to replicate it
    assert summary["control_worlds"] == 0 and summary["control_equivalent"] is False
    assert "entangled worlds**" not in text and "-S experiment.control_worlds=60" in text
    path.write_text(json.dumps({"worlds": 0, "note": "off"}))
    assert report(path)[0]["control_worlds"] == 0

    gaps = [0.1, -0.1, 0.05, 0.0, -0.05, 0.15]
    replicated = {"worlds": 6, "seeds_per_world": 1, "band": 0.5, **pooled(gaps, 0.5),
                  "vs_baseline": pooled([g + 1 for g in gaps], 0.5)}
    path.write_text(json.dumps(replicated))
    summary, text = report(path)
    assert replicated["equivalent"] is True and replicated["vs_baseline"]["equivalent"] is False
    assert summary["control_worlds"] == 6 and summary["control_worlds_equivalent"] is True
    assert summary["control_worlds_ci95_pts"] == [replicated["lo"], replicated["hi"]]
    assert summary["control_equivalent"] is False  # the one world's own verdict is kept, not replaced
    line = next(x for x in text.splitlines() if "Negative control over 6 entangled worlds" in x)
    assert f"[{replicated['lo']:+.1f}, {replicated['hi']:+.1f}]" in line and "**passed**" in line
    assert "Over 6 entangled worlds it passes" in text

    path.write_text(json.dumps({**replicated, **pooled([3.0, -2.0, 4.0], 0.5)}))  # wide: not passed
    summary, text = report(path)
    assert summary["control_worlds_equivalent"] is False and "**NOT passed**" in text
    assert "Over 6 entangled worlds it does not pass either" in text


def test_degenerate_cells_are_flagged_and_caveats_follow_the_numbers(study):
    summary = build(study)
    text = (study / "reports" / "report.md").read_text()
    assert "⚠" in text and "A for 100%" in text
    # the Baseline both rows and Figure 4 share is one cell, counted once and in its own world
    assert summary["degenerate_cells"] == 1 and summary["control_degenerate_cells"] == 0
    # a cell shared by rows (a target's Baseline) is named once, with its row count, under its world
    assert "- main world: 03 Baseline (of 2 rows): one letter (answers by position) in 3 of 3 seeds" in text
    # Baseline+ sits at chance here: no caveat may claim it rises above chance
    assert "Baseline+ is above chance" not in text
    assert "Only 3 training seeds" in text


def test_baseline_plus_above_chance_gets_its_caveat(study):
    write_arm(study / "runs", "03", "fixed_area-04-28/baseline_plus", [0.6, 0.62, 0.58], seed=20)
    build(study)
    assert "Baseline+ is above chance" in (study / "reports" / "report.md").read_text()


def test_labels_seen_column_and_the_caveats_it_carries(study):
    """Rows whose Related arm never trained on some target labels are counted, with Trained's accuracy
    in both kinds of rows as the table prints it; a degenerate Baseline+ that never saw the labels says so."""
    path = study / "designs" / "03" / "index.json"
    index = json.loads(path.read_text())
    seen = {"fixed_area-04-28": (["A", "B", "C"], ["A"]), "fixed_task-28-05": (["A"], [])}
    for c in index["combinations"]:
        c["target_labels"] = ["A", "B", "C"]
        c["labels_seen"] = dict(zip(("related", "baseline_plus"), seen[c["id"]]))
    path.write_text(json.dumps(index))
    write_arm(study / "runs", "03", "fixed_task-28-05/related", [0.35, 0.60, 0.40], seed=21)  # an unstable row
    for combination in seen:  # Baseline+ answers by position: degenerate
        write_arm(study / "runs", "03", f"{combination}/baseline_plus", [1 / 3] * 3, seed=22, letter="B")
    build(study)
    text = (study / "reports" / "report.md").read_text()
    assert "| 3/3 / 1/3 |" in text and "| 1/3 / 0/3 |" in text
    rows = {r["combination"]: r for r in csv.DictReader((study / "reports/plots/table3.csv").open())
            if r["world"] == "main"}
    partial, full = float(rows["fixed_task-28-05"]["trained"]), float(rows["fixed_area-04-28"]["trained"])
    assert partial < full and rows["fixed_task-28-05"]["labels_seen_related"] == "1"
    assert float(rows["fixed_task-28-05"]["trained_sd"]) > 5 > float(rows["fixed_area-04-28"]["trained_sd"])
    assert (f"In 1 of 2 rows the Related arm's training answers name only some of the target's labels" in text
            and f"Trained averages {partial:.1f}% in those rows and {full:.1f}% in the other 1" in text)
    assert f"| {partial:.1f} [" in text and "| 1/3 / 0/3 |" in text  # the caveat's numbers are the table's
    assert "Baseline+ is degenerate in 2 of 2 rows" in text and "name at most 1 of the target's labels" in text


def test_guessed_column_counts_answers_the_tie_break_decided(study):
    """% of Trained / Baseline+ answers whose best score was tied (read from raw_output), per row."""
    tied, clear = json.dumps([-1.0986] * 3), json.dumps([-0.1, -2.5, -3.0])
    for arm, every in (("fixed_area-04-28/baseline_plus", 2), ("fixed_area-04-28/related", 10)):
        for seed_dir in (study / "runs" / "03" / arm).glob("seed*"):
            preds = [json.loads(x) for x in (seed_dir / "predictions.jsonl").read_text().splitlines()]
            for i, p in enumerate(preds):
                p["raw_output"] = tied if i % every == 0 else clear
            (seed_dir / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    build(study)
    lines = (study / "reports" / "report.md").read_text().splitlines()
    header = next(line for line in lines if "guessed % (T / B+)" in line).split("|")
    column = header.index(" guessed % (T / B+) ")
    guessed = {line.split("|")[3].strip(): line.split("|")[column].strip() for line in lines
               if line.startswith("| 03 ") and line.count("|") == len(header) - 1}
    assert guessed == {"04 subset 04, 28 subset 28": "10 / 50",  # 21 and 105 of 210 answers, every seed
                       "28 subset 28, 05 subset 05": "-"}  # no option scores (as with the generate scorer's text)


def test_a_baseline_plus_that_guesses_as_the_baseline_is_named(study):
    """Knowing none of the target's names, Baseline+ guesses with the Baseline's own seeded draws: the
    report says why the two score the same, and says it only where they do."""
    path = study / "designs" / "03" / "index.json"
    index = json.loads(path.read_text())
    for c in index["combinations"]:
        c["target_labels"], c["labels_seen"] = ["A", "B", "C"], {"related": ["A"], "baseline_plus": []}
    path.write_text(json.dumps(index))
    write_arm(study / "runs", "03", "baseline", [0.3, 0.35, 0.32], seed=30)
    build(study)
    assert "scores exactly as the untrained Baseline" not in (study / "reports" / "report.md").read_text()
    for combination in ("fixed_area-04-28", "fixed_task-28-05"):
        write_arm(study / "runs", "03", f"{combination}/baseline_plus", [0.3, 0.35, 0.32], seed=30)
    build(study)
    text = (study / "reports" / "report.md").read_text()
    line = next(x for x in text.splitlines() if "scores exactly as the untrained Baseline" in x)
    acc = float(next(r for r in csv.DictReader((study / "reports/plots/table3.csv").open())
                     if r["world"] == "main")["baseline_plus"])
    shown = float(line.split("Baseline in 03 (", 1)[1].split("%", 1)[0])
    assert abs(shown - acc) <= 0.05 + 1e-9  # the table's Baseline+ (csv at 2 decimals), not another number


def test_an_unstable_row_names_the_label_its_seeds_part_on(study):
    """The seed-sd caveat says on which true label the seeds differ most, with each seed's count of
    right answers there, as the predictions have them."""
    write_arm(study / "runs", "03", "fixed_task-28-05/related", [0.35, 0.90, 0.40], seed=21)
    build(study)
    text = (study / "reports" / "report.md").read_text()
    right = {}
    for k in range(3):
        for line in (study / "runs/03/fixed_task-28-05/related" / f"seed{k}" / "predictions.jsonl").read_text().splitlines():
            p = json.loads(line)
            right.setdefault(p["answer_text"], [0, 0, 0])[k] += p["correct"]
    label = max(sorted(right), key=lambda lab: max(right[lab]) - min(right[lab]))
    counts = ", ".join(map(str, right[label]))
    assert f"03 fixed_task-28-05 (" in text and f': seeds right on {counts} of {N_Q // 3} "{label}"' in text


def test_figures_and_plot_data(study):
    summary = build(study)
    assert set(summary["figures"]) == {"table3.png", "scaleup.png", "limited.png", "search_history.png"}
    scale = list(csv.DictReader((study / "reports/plots/scaleup.csv").open()))
    assert {r["arm"] for r in scale} >= {"All Related", "In-distribution (upper bound)"}
    assert next(r for r in scale if r["arm"] == "All Related")["paper"] == "73"
    limited = list(csv.DictReader((study / "reports/plots/limited.csv").open()))
    assert all(0 <= float(r["lo"]) <= float(r["accuracy"]) <= float(r["hi"]) <= 100 for r in limited)
    assert [r["k"] for r in limited if r["companion"] == "related"] == ["0", "100"]
    assert len(list(csv.DictReader((study / "reports/plots/search.csv").open()))) == 2  # pruned trial left out


def test_cli(study, tmp_path, capsys):
    args = argparse.Namespace(runs=str(study / "runs"), control_runs=str(study / "control_runs"),
                              best_runs=str(study / "best_runs"),
                              designs=str(study / "designs"), control_designs=str(study / "cdesigns"),
                              search=str(study / "search"), out=str(tmp_path / "out"),
                              summary=str(tmp_path / "s.json"), params=str(tmp_path / "none.yaml"),
                              control_worlds=str(tmp_path / "none.json"))
    assert run(args) == 0
    assert (tmp_path / "out" / "report.md").exists() and json.loads((tmp_path / "s.json").read_text())["main_rows"] == 2
    args.designs = str(tmp_path / "missing")
    assert run(args) == 2


def test_label_clusters_widen_the_interval_when_whole_labels_move():
    """One seed answers a whole label right and another wrong: resampling labels as clusters gives a
    wider interval than resampling questions, around the same point."""
    from medmat import stats
    from medmat.report.analysis import label_clusters
    from medmat.report.runs import Arm

    def arm(right_labels):
        preds = {s: [{"record_id": f"{lab}-{i}", "answer_text": lab, "correct": lab in right_labels[s]}
                     for lab in ("A", "B", "C") for i in range(30)] for s in (0, 1, 2)}
        return Arm("x", {s: {p["record_id"]: p["correct"] for p in ps} for s, ps in preds.items()}, preds, {})

    trained = arm({0: {"A", "B"}, 1: {"A", "C"}, 2: {"A"}})
    other = arm({0: set(), 1: set(), 2: set()})
    rows = [{"gap": {"gap": 0.0}, "target": "03", "_pair": (trained, other)}]
    by_question = stats.mean_gap_bootstrap([(trained.outcomes, other.outcomes)], ["03"], n_boot=500, seed=0)
    by_label = label_clusters(rows, n_boot=500, seed=0)
    assert by_label["lo"] < by_question["lo"] and by_label["hi"] >= by_question["hi"]
    assert by_label["lo"] <= by_question["gap"] <= by_label["hi"]


def test_search_best_retrained_beside_its_trial_and_its_degenerate_cell_counted(study):
    """The search table shows the best trial's dev accuracy beside the retrained seeds' mean; a trial the
    retraining does not reproduce is a named caveat (winner's curse); a retrained cell that answers one
    letter is a degenerate cell like any other (flagged, listed, counted)."""
    best_runs = study / "best_runs"

    def report(dev_by_seed, letter=None):
        write_arm(best_runs, "03", "search_best", [0.5] * len(dev_by_seed), seed=21, letter=letter)
        for k, dev in enumerate(dev_by_seed):  # the seeds' dev accuracy, as `medmat evaluate` writes it
            f = best_runs / "03/search_best" / f"seed{k}/metrics.json"
            f.write_text(json.dumps({**json.loads(f.read_text()), "dev_accuracy": dev}))
        summary = build_report(str(study / "runs"), str(study / "control_runs"), str(study / "designs"),
                               str(study / "cdesigns"), str(study / "search"), str(study / "reports"),
                               ReportConfig(n_boot=400), best_runs_dir=str(best_runs))
        return summary, (study / "reports" / "report.md").read_text()

    # the trial's 60.0 (best_mixture.json) reproduced within 5 points: no caveat
    summary, text = report([0.58, 0.6, 0.57])
    assert "| 03 | 3 | 60.0 | 58.3 | 04: 300 |" in text and "winner's curse" not in text
    degenerate = summary["degenerate_cells"]
    # retrained at 40.0 on average, one letter for every question: caveat, ⚠, listed and counted
    summary, text = report([0.4, 0.4, 0.4], letter="A")
    assert "| 03 | 3 | 60.0 | 40.0 | 04: 300 |" in text
    assert "not reproduced when its mixture is retrained in 03 (60.0 against 40.0 over 3 seeds)" in text
    line = next(x for x in text.splitlines() if x.startswith("- Degenerate cells"))
    assert "03 search_best: one letter" in line
    assert summary["degenerate_cells"] == degenerate + 1


@pytest.mark.parametrize("named, labels, options", [(0, 2, 2), (1, 2, 2), (1, 3, 3), (0, 4, 4), (1, 4, 4), (2, 4, 4),
                                                    (1, 7, 4), (3, 7, 4), (5, 7, 4), (6, 7, 4), (7, 7, 4), (2, 9, 4)])
def test_name_ceiling_is_the_expected_accuracy_of_reading_every_named_label(named, labels, options):
    """Against every question there is: each label asked for, with every set of distractors
    medmat.data.qa can draw; a named answer is right, an unnamed one a uniform guess among the
    unnamed options (the named ones ruled out)."""
    from itertools import combinations

    from medmat.report.analysis import name_ceiling

    names = set(range(named))
    per_label = []
    for answer in range(labels):
        sets = list(combinations([x for x in range(labels) if x != answer], min(options, labels) - 1))
        per_label.append(sum(1.0 if answer in names else 1 / (1 + len(set(d) - names)) for d in sets) / len(sets))
    assert name_ceiling(named, labels, options) == pytest.approx(100 * sum(per_label) / labels)
    assert name_ceiling(0, labels, options) == pytest.approx(100 / min(options, labels))  # nothing named: chance


def test_rows_where_the_names_give_related_an_edge_are_judged_apart(study):
    """The name ceiling comes from the designs (labels seen), and the second headline counts only the
    rows where Related's ceiling is above Baseline+'s: a row where both name the same labels is left out."""
    path = study / "designs" / "03" / "index.json"
    index = json.loads(path.read_text())
    seen = {"fixed_area-04-28": (["A", "B", "C"], ["A"]), "fixed_task-28-05": (["A"], ["A"])}
    for c in index["combinations"]:
        c["target_labels"] = ["A", "B", "C"]
        c["labels_seen"] = dict(zip(("related", "baseline_plus"), seen[c["id"]]))
    path.write_text(json.dumps(index))
    summary = build(study)
    text = (study / "reports" / "report.md").read_text()
    assert "| 3/3 / 1/3 | 100.0 / 66.7 |" in text and "| 1/3 / 1/3 | 66.7 / 66.7 |" in text
    assert summary["main_rows"] == 2 and summary["headroom_rows"] == 1
    assert summary["headroom_significant"] == 1 and summary["headroom_claim_supported"]
    line = next(x for x in text.splitlines() if x.startswith("- **Main world, rows where the names"))
    assert "over 1 rows" in line and f"= {summary['headroom_mean_gap_pts']:+.1f} points" in line
    rows = {r["combination"]: r for r in csv.DictReader((study / "reports/plots/table3.csv").open())
            if r["world"] == "main"}
    assert float(rows["fixed_task-28-05"]["name_ceiling_related"]) == pytest.approx(200 / 3, abs=0.01)
    assert "above its name ceiling" not in text  # Trained at 90% with every label named: within it
    assert "ceiling.png" in summary["figures"] and (study / "reports" / "ceiling.png").stat().st_size > 0
    assert "![Trained and Baseline+ against their name ceilings](ceiling.png)" in text


def test_a_trained_arm_above_its_name_ceiling_is_named(study):
    """Related names none of the labels (ceiling 33.3, chance), yet Trained scores 90%: a leak or shared
    looks, and the report says which row and by how much."""
    path = study / "designs" / "03" / "index.json"
    index = json.loads(path.read_text())
    for c in index["combinations"]:
        c["target_labels"], c["labels_seen"] = ["A", "B", "C"], {"related": [], "baseline_plus": []}
    path.write_text(json.dumps(index))
    build(study)
    text = (study / "reports" / "report.md").read_text()
    caveat = next(x for x in text.splitlines() if "above its name ceiling" in x)
    assert "03 fixed_area-04-28 (" in caveat and "against 33.3)" in caveat
    assert "fixed_task-28-05" not in caveat  # its Trained sits at chance, inside the ceiling


def test_without_labels_seen_there_is_no_ceiling_and_no_second_headline(study):
    summary = build(study)  # the fixture's designs predate labels_seen
    text = (study / "reports" / "report.md").read_text()
    assert "rows where the names" not in text and summary["headroom_rows"] == 0
    assert "ceiling.png" not in summary["figures"] and "ceiling.png" not in text
    row = next(x for x in text.splitlines() if x.startswith("| 03 CT-Lung-COVID | Fixed area"))
    header = next(x for x in text.splitlines() if x.startswith("| target | direction"))
    cells = dict(zip((h.strip() for h in header.split("|")), (c.strip() for c in row.split("|"))))
    assert cells["labels seen (T / B+)"] == cells["name ceiling % (T / B+)"] == "-"
