"""Evaluation: Wilson CI, both scorers, per-subset accuracy and confusion, the `medmat evaluate` CLI
(into a real MLflow sqlite store), the untrained Baseline, and clear errors on bad input.

The world: coloured squares, one colour per label, in two subsets — small enough to build in a
second, learnable by the tiny CPU VLM in a few dozen steps.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from medmat import models
from medmat.scoring import EvalConfig, evaluate_backend, summarise
from medmat.stats import wilson_ci

COLOURS = {"Cyst": (220, 40, 40), "Stone": (40, 40, 220), "Normal": (40, 200, 40), "COVID-19": (230, 230, 40)}
SUBSETS = {4: ["Cyst", "Stone", "Normal"], 28: ["COVID-19", "Normal"]}
_Y, _X = np.mgrid[:32, :32]
# A shape per label on top of the colour: the tiny VLM instance-normalises its input (colour alone is
# invisible to it by design), the ColourBackend below reads colour only.
PATTERNS = {
    "Cyst": np.where((_Y - 16) ** 2 + (_X - 16) ** 2 < 64, 70, 0),
    "Stone": np.where((_X // 4) % 2 == 0, 50, -50),
    "Normal": np.zeros((32, 32), int),
    "COVID-19": np.where((_Y // 4) % 2 == 0, 50, -50),
}
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def make_world(root, per_label=8, seed=0):
    """Records-table rows (train and test) over coloured-square PNGs written under `root`."""
    rng = np.random.default_rng(seed)
    rows = []
    for sub, labels in SUBSETS.items():
        for split in ("train", "test"):
            for label in labels:
                for k in range(per_label):
                    rid = f"sub{sub:02d}-{split}-{label}-{k}"
                    arr = np.clip(np.array(COLOURS[label]) + PATTERNS[label][..., None]
                                  + rng.integers(-20, 20, (32, 32, 3)), 0, 255)
                    rel = f"img/{rid}.png"
                    (root / "img").mkdir(parents=True, exist_ok=True)
                    Image.fromarray(arr.astype(np.uint8)).save(root / rel)
                    opts = list(labels)
                    rng.shuffle(opts)
                    q = "What does this image show?"
                    rows.append(
                        {
                            "record_id": rid,
                            "subset_no": sub,
                            "split": split,
                            "image": rel,
                            "image_path": str(root / rel),
                            "question": q,
                            "question_choice": "\n".join([q] + [f"{'ABCD'[i]}: {o}" for i, o in enumerate(opts)]
                                                         + [INSTRUCTION]),
                            "options": opts,
                            "answer_letter": "ABCD"[opts.index(label)],
                            "answer_text": label,
                        }
                    )
    df = pd.DataFrame(rows)
    df["subset_no"] = df["subset_no"].astype("Int64")
    return df


def write_records(df, path, data_root):
    table = pa.Table.from_pandas(df, preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"medmat.data_root": str(data_root).encode()})
    pq.write_table(table, path)
    return path


class ColourBackend:
    """A real (not trained) torch backend: scores each option by how close the image's mean colour is
    to the option's colour. `blind` labels are never chosen (a known, countable mistake: red Cyst
    images go to the nearest other colour, green Normal); `generate` answers in several real-looking styles, some unreadable."""

    name = "colour"

    def __init__(self, blind=(), styles=("letter",)):
        self.model = nn.Module()
        self.model.register_buffer("table", torch.tensor([COLOURS[k] for k in COLOURS], dtype=torch.float32))
        self.names = list(COLOURS)
        self.blind = set(blind)
        self.styles = styles
        self.calls = 0

    def _mean(self, row):
        with Image.open(row["image_path"]) as im:
            return torch.tensor(np.asarray(im.convert("RGB"), dtype=np.float32).mean((0, 1)))

    def score_options(self, rows):
        out = []
        for r in rows:
            m = self._mean(r)
            scores = []
            for o in r["options"]:
                d = float(torch.dist(m, self.model.table[self.names.index(o)]))
                scores.append(-1e9 if o in self.blind else -d)
            out.append(scores)
        return out

    def generate(self, rows):
        texts = []
        for r, sc in zip(rows, self.score_options(rows)):
            i = int(np.argmax(sc))
            style = self.styles[self.calls % len(self.styles)]
            self.calls += 1
            texts.append(
                {
                    "letter": "ABCD"[i],
                    "phrase": f"The answer is {'ABCD'[i]}.",
                    "text": r["options"][i].lower(),
                    "garbage": "I am not sure what this image shows.",
                }[style]
            )
        return texts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    df = make_world(root)
    return root, df, write_records(df, root / "records.parquet", root)


def train_tiny(root, df, steps=200):
    """The tiny CPU VLM trained for `steps` steps on the world's train split (one thread: on a shared
    2-core machine a tiny model runs ~30x faster than with oversubscribed intra-op threads). At 100
    steps one base init in four stopped at 80-85% on these trivially learnable shapes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        backend = models.build({"backend": "tiny", "tiny": {"image_size": 16, "channels": [8, 16]}}, root)
        train = df[df.split == "train"]
        backend.prepare_training(train)
        opt = torch.optim.Adam(backend.model.parameters(), lr=1e-2)
        rows = train.to_dict("records")
        backend.model.train()
        for step in range(steps):
            batch = [rows[i] for i in np.random.default_rng(step).choice(len(rows), 16, replace=False)]
            loss = backend.loss(backend.collate(batch))
            opt.zero_grad()
            loss.backward()
            opt.step()
        backend.model.eval()
    finally:
        torch.set_num_threads(threads)
    return backend


@pytest.fixture(scope="module")
def trained_tiny(world, tmp_path_factory):
    """A trained tiny model, saved as RUN_DIR/model."""
    root, df, _ = world
    backend = train_tiny(root, df)
    run_dir = tmp_path_factory.mktemp("run")
    backend.save(run_dir / "model")
    return backend, run_dir


# ------------------------------------------------------------------------------------ statistics


def test_wilson_ci_known_values():
    # Reference values: Wilson (1927) score interval, z = 1.96 (e.g. statsmodels proportion_confint).
    lo, hi = wilson_ci(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = wilson_ci(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_ci(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_ci(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)


def test_wilson_ci_properties():
    assert wilson_ci(0, 0) == (0.0, 1.0)
    for n in (5, 50, 500):
        for k in (0, n // 3, n):
            lo, hi = wilson_ci(k, n)
            assert 0 <= lo <= k / n <= hi <= 1
    # more samples, narrower interval at the same proportion
    assert np.diff(wilson_ci(30, 100)) > np.diff(wilson_ci(300, 1000))
    with pytest.raises(ValueError):
        wilson_ci(11, 10)


def test_eval_config_rejects_unknown_scorer():
    with pytest.raises(ValueError, match="scorer"):
        EvalConfig(scorer="beam")


# -------------------------------------------------------------------------------------- scorers


def test_likelihood_scorer_counts_per_subset_and_confusion(world):
    _, df, _ = world
    test = df[df.split == "test"]
    result = evaluate_backend(ColourBackend(blind={"Cyst"}), test, scorer="likelihood", batch_size=5)
    # Cyst is never picked: the 8 Cyst images of subset 04 go to Normal (red is nearer green than blue).
    assert result.n == len(test) == 40
    s04, s28 = result.per_subset["04"], result.per_subset["28"]
    assert s04["n"] == 24 and s04["correct"] == 16 and s04["accuracy"] == pytest.approx(16 / 24)
    assert s28["accuracy"] == 1.0 and s28["n"] == 16
    assert result.accuracy == pytest.approx(32 / 40)
    assert result.ci95 == pytest.approx(wilson_ci(32, 40))
    assert result.unparseable == 0
    conf = result.confusion["04"]
    assert conf["labels"] == ["Cyst", "Normal", "Stone"]
    m = dict(zip(conf["labels"], conf["matrix"]))
    assert m["Cyst"] == [0, 8, 0] and m["Normal"] == [0, 8, 0] and m["Stone"] == [0, 0, 8]
    assert {p["record_id"] for p in result.predictions} == set(test.record_id)
    wrong = [p for p in result.predictions if not p["correct"]]
    assert all(p["answer_text"] == "Cyst" and p["predicted_text"] == "Normal" for p in wrong)
    # raw output of the likelihood scorer: the option scores
    assert len(json.loads(result.predictions[0]["raw_output"])) == len(test.iloc[0]["options"])


def test_generate_scorer_parses_styles_and_counts_unparseable(world):
    _, df, _ = world
    test = df[df.split == "test"]
    backend = ColourBackend(styles=("letter", "phrase", "text", "garbage"))
    result = evaluate_backend(backend, test, scorer="generate", batch_size=7)
    # every 4th answer is unreadable: counted wrong and counted as unparseable, per subset too
    assert result.unparseable == 10
    assert result.accuracy == pytest.approx(30 / 40)
    assert sum(s["unparseable"] for s in result.per_subset.values()) == 10
    bad = [p for p in result.predictions if p["predicted_letter"] is None]
    assert len(bad) == 10 and not any(p["correct"] for p in bad)
    assert all("not sure" in p["raw_output"] for p in bad)
    conf = result.confusion["04"]
    assert conf["columns"][-1] == "(unparseable)"
    assert sum(row[-1] for row in conf["matrix"]) == result.per_subset["04"]["unparseable"]


def test_summarise_round_trips_saved_predictions(world):
    _, df, _ = world
    result = evaluate_backend(ColourBackend(blind={"Stone"}), df[df.split == "test"])
    again = summarise(result.predictions, scorer=result.scorer)
    assert again.summary() == result.summary()


def test_empty_selection_and_bad_answer_letter_are_clear_errors(world):
    _, df, _ = world
    with pytest.raises(ValueError, match="no records"):
        evaluate_backend(ColourBackend(), df.iloc[:0])
    bad = df.iloc[:3].copy()
    bad.loc[bad.index[1], "answer_letter"] = "F"
    with pytest.raises(ValueError, match=bad.iloc[1]["record_id"]):
        evaluate_backend(ColourBackend(), bad)


def test_tiny_backend_learns_and_both_scorers_agree(world, trained_tiny):
    _, df, _ = world
    backend, _ = trained_tiny
    test = df[df.split == "test"]
    lik = evaluate_backend(backend, test, scorer="likelihood")
    gen = evaluate_backend(backend, test, scorer="generate")
    # chance is 1/3 (subset 04) and 1/2 (subset 28); the label shapes are trivially learnable
    assert lik.accuracy >= 0.9, lik.per_subset
    assert [p["predicted_letter"] for p in lik.predictions] == [p["predicted_letter"] for p in gen.predictions]
    assert gen.unparseable == 0


# ------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real MLflow sqlite store for this module (creating one costs ~7 s of migrations)."""
    from medmat import tracking

    root = tmp_path_factory.mktemp("mlruns")
    cfg = tracking.TrackingConfig(tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_root=str(root / "artifacts"),
                                  experiment="test-evaluate")
    tracking.setup(cfg)
    return cfg


def _params(tmp_path, cfg, extra=""):
    p = tmp_path / "params.yaml"
    p.write_text(
        "base:\n  seed: 0\n"
        "model:\n  backend: tiny\n  tiny: {image_size: 16, channels: [8, 16]}\n"
        "evaluate:\n  scorer: likelihood\n  batch_size: 16\n"
        f"tracking:\n  tracking_uri: {cfg.tracking_uri}\n  artifact_root: {cfg.artifact_root}\n"
        f"  experiment: {cfg.experiment}\n" + extra
    )
    return p


def test_cli_evaluates_into_the_training_run(world, trained_tiny, store, tmp_path, monkeypatch):
    import mlflow

    from medmat import tracking
    from medmat.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, df, records = world
    _, run_dir = trained_tiny
    with tracking.tracked_run(store, run_name="train", tags=tracking.run_tags(arm="related", seed=0)) as run:
        tracking.log_metrics({"train_loss": 0.1})
    tracking.write_run_id(run_dir, run.info.run_id)

    params = _params(tmp_path, store)
    rc = main(["evaluate", "--model", str(run_dir / "model"), "--records", str(records), "--target", "4",
               "--out", str(run_dir), "--params", str(params)])
    assert rc == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["n"] == 24 and set(metrics["per_subset"]) == {"04"}
    assert metrics["ci95"][0] <= metrics["accuracy"] <= metrics["ci95"][1]
    preds = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 24 and {"record_id", "subset_no", "answer_letter", "predicted_letter", "raw_output",
                                 "correct"} <= set(preds[0])
    png = (run_dir / "confusion_04.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # logged into the training's own run (found through RUN_DIR/mlflow_run_id), which ends FINISHED
    got = mlflow.MlflowClient(store.tracking_uri).get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.metrics["train_loss"] == pytest.approx(0.1)
    assert got.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert got.data.metrics["test_s04_accuracy"] == pytest.approx(metrics["per_subset"]["04"]["accuracy"])
    assert got.data.metrics["test_s04_n"] == 24
    arts = {a.path for a in mlflow.MlflowClient(store.tracking_uri).list_artifacts(run.info.run_id, "evaluation/test")}
    assert {"evaluation/test/metrics.json", "evaluation/test/predictions.jsonl",
            "evaluation/test/confusion_04.png"} <= arts


def test_cli_untrained_baseline_is_its_own_tracked_run(world, store, tmp_path, monkeypatch):
    import mlflow

    from medmat.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, _, records = world
    params = _params(tmp_path, store)
    out = tmp_path / "baseline"
    rc = main(["evaluate", "--model", "untrained", "--backend-params", str(params), "--params", str(params),
               "--records", str(records), "--target", "28", "--out", str(out), "--seed", "3",
               "--scorer", "generate"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scorer"] == "generate" and metrics["seed"] == 3 and metrics["n"] == 16
    run_id = (out / "mlflow_run_id").read_text().strip()
    run = mlflow.MlflowClient(store.tracking_uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["medmat.arm"] == "baseline"
    assert run.data.tags["medmat.seed"] == "3"
    assert run.data.tags["medmat.backend"] == "tiny"
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["accuracy"])
    # the untrained model is saved and logged like a trained one (the registry treats every arm alike)
    assert (out / "model" / models.BACKEND_FILE).is_file()
    assert [o.model_id for o in run.outputs.model_outputs]
    # Same seed, same untrained model, same predictions (the Baseline is reproducible).
    out2 = tmp_path / "baseline2"
    assert main(["evaluate", "--model", "untrained", "--backend-params", str(params), "--params", str(params),
                 "--records", str(records), "--target", "28", "--out", str(out2), "--seed", "3",
                 "--scorer", "generate", "--no-track"]) == 0
    assert (out / "predictions.jsonl").read_text() == (out2 / "predictions.jsonl").read_text()
    assert not (out2 / "mlflow_run_id").exists()


def test_cli_manifest_selection(world, trained_tiny, store, tmp_path, monkeypatch):
    from medmat.cli import main
    from medmat.mixture import ids_sha256

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, df, records = world
    _, run_dir = trained_tiny
    ids = df[(df.split == "test")].record_id.tolist()[::3]
    manifest = tmp_path / "dev.json"
    manifest.write_text(json.dumps({"components": {"04": len(ids)}, "seed": 0, "record_ids": ids,
                                    "sha256": ids_sha256(ids)}))
    out = tmp_path / "dev"
    assert main(["evaluate", "--model", str(run_dir / "model"), "--records", str(records), "--manifest",
                 str(manifest), "--out", str(out), "--params", str(_params(tmp_path, store)), "--no-track"]) == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["record_id"] for p in preds] == ids


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--target", "99"], "no records of subset 99"),
        (["--target", "4", "--split", "validation"], "split 'validation'"),
    ],
)
def test_cli_bad_selection_is_a_clear_error(world, trained_tiny, tmp_path, caplog, argv_tail, message):
    from medmat.cli import main

    _, _, records = world
    _, run_dir = trained_tiny
    rc = main(["evaluate", "--model", str(run_dir / "model"), "--records", str(records), "--out",
               str(tmp_path / "o"), "--params", str(tmp_path / "absent.yaml"), "--no-track", *argv_tail])
    assert rc == 2
    assert message in caplog.text and str(records) in caplog.text
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_cli_missing_model_dir_is_a_clear_error(world, tmp_path, caplog):
    from medmat.cli import main

    _, _, records = world
    rc = main(["evaluate", "--model", str(tmp_path / "nope"), "--records", str(records), "--target", "4",
               "--out", str(tmp_path / "o"), "--no-track", "--params", str(tmp_path / "absent.yaml")])
    assert rc == 2 and "model directory not found" in caplog.text


def test_unreadable_image_names_the_record(world, trained_tiny, tmp_path):
    _, df, _ = world
    backend, _ = trained_tiny
    bad = df[df.split == "test"].head(4).copy()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad.loc[bad.index[2], "image_path"] = str(broken)
    with pytest.raises(ValueError, match=bad.iloc[2]["record_id"]):
        evaluate_backend(backend, bad)
    assert not math.isnan(evaluate_backend(backend, df[df.split == "test"].head(4)).accuracy)
