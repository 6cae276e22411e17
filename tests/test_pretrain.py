"""The pretrain stage: a generic-shape corpus with no medical word, a deterministic vision tower that
every training run starts from, and unit/checkpoint identities that follow the tower's bytes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from medmat.config import ConfigError
from medmat.data.synth import SUBSET_LABELS
from medmat.models.tiny_text import tokenize
from medmat.pretrain import PretrainConfig, corpus, pretrain

SMALL_TINY = {"image_size": 16, "channels": [8, 16], "embed_dim": 16, "hidden": 32}


def test_the_corpus_names_no_label_of_the_catalogue_and_is_the_same_for_a_seed(tmp_path):
    cfg = PretrainConfig(records=300, dev_records=30)
    rows = corpus(cfg, tmp_path / "a")
    label_words = {w for labels in SUBSET_LABELS.values() for lab in labels for w in tokenize(lab)}
    corpus_words = {w for r in rows for text in (r["question"], *r["options"]) for w in tokenize(text)}
    assert corpus_words and not corpus_words & label_words, corpus_words & label_words
    assert {r["question_kind"] for r in rows} == {"what", "where", "size"}
    assert all(r["options"][ord(r["answer_letter"]) - ord("A")] in r["options"] for r in rows)
    assert any(r["options"][ord(r["answer_letter"]) - ord("A")] == "nothing" for r in rows)  # empty images
    again = corpus(cfg, tmp_path / "b")
    assert [{**r, "image_path": Path(r["image_path"]).name} for r in rows] == \
           [{**r, "image_path": Path(r["image_path"]).name} for r in again]
    assert all(Path(a["image_path"]).read_bytes() == Path(b["image_path"]).read_bytes() for a, b in zip(rows, again))
    other = corpus(dataclasses.replace(cfg, seed=1), tmp_path / "c")
    assert [r["options"] for r in other] != [r["options"] for r in rows]


def _params(root: Path) -> Path:
    params = {
        "model": {"backend": "tiny", "tiny": {**SMALL_TINY, "vision_init": "work/pretrain/vision.safetensors"}},
        "pretrain": {"records": 240, "dev_records": 40, "steps": 12, "min_dev_accuracy": 0},
        "train": {"batch_size": 16, "lr": 0.01, "warmup_steps": 2, "progress": False},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_root": str(root / "mlruns/art")},
    }
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_stage_writes_a_vision_tower_that_training_starts_from(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from medmat.models import build
    from medmat.train import TrainConfig, fingerprint

    monkeypatch.chdir(tmp_path)
    metrics = pretrain(str(_params(tmp_path)))
    tower_path = tmp_path / "work/pretrain/vision.safetensors"
    tower = load_file(str(tower_path))
    assert tower and all(k.startswith(("cnn.", "img_proj.")) for k in tower)
    assert metrics["steps"] == 12 and set(metrics["dev_accuracy_by_question"]) == {"what", "where", "size"}
    assert json.loads((tmp_path / "work/pretrain/metrics.json").read_text()) == metrics
    first = tower_path.read_bytes()
    pretrain(str(_params(tmp_path)))
    assert tower_path.read_bytes() == first  # the same params give the same bytes (dvc.lock reproduces)

    # a fresh training model starts from the tower; the text side and the head are built as before
    model_cfg = {"backend": "tiny", "tiny": {**SMALL_TINY, "vision_init": "work/pretrain/vision.safetensors"}}
    rows = [{"record_id": "r", "question": "What is shown?", "options": ["ring", "square"], "answer_letter": "A"}]
    backend = build(model_cfg)
    backend.prepare_training(rows, decode_images=False)
    state = backend.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in tower.items())
    assert not backend.model.joint[-1].weight.any()  # the untrained model still has no preference
    scratch = build({"backend": "tiny", "tiny": SMALL_TINY})
    scratch.prepare_training(rows, decode_images=False)
    assert not torch.equal(scratch.model.state_dict()["cnn.0.weight"], tower["cnn.0.weight"])

    # a checkpoint's identity follows the tower's bytes, not only its path
    train = TrainConfig(max_steps=1)
    before = fingerprint(train, _model(model_cfg), ["r"])
    tower_path.write_bytes(first[:-4] + b"\0\0\0\0")
    assert fingerprint(train, _model(model_cfg), ["r"]) != before

    # a saved model loads without the tower file (it holds its own weights)
    backend.save(tmp_path / "saved")
    tower_path.unlink()
    from medmat.models.tiny import load
    assert torch.equal(load(tmp_path / "saved").model.state_dict()["cnn.0.weight"], state["cnn.0.weight"])


def _model(values: dict):
    from medmat.models import model_config

    return model_config(values)


def test_a_missing_or_mismatched_tower_is_a_named_error(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from medmat.models import build

    monkeypatch.chdir(tmp_path)
    rows = [{"record_id": "r", "question": "q", "options": ["a", "b"], "answer_letter": "A"}]
    backend = build({"backend": "tiny", "tiny": {**SMALL_TINY, "vision_init": "towers/absent.safetensors"}})
    with pytest.raises(ConfigError, match=r"towers/absent.safetensors does not exist .*dvc repro pretrain"):
        backend.prepare_training(rows, decode_images=False)
    Path("towers").mkdir()
    save_file({"cnn.0.weight": torch.zeros(4, 3, 3, 3)}, "towers/other.safetensors")
    backend = build({"backend": "tiny", "tiny": {**SMALL_TINY, "vision_init": "towers/other.safetensors"}})
    with pytest.raises(ConfigError, match="towers/other.safetensors is for other model.tiny channels"):
        backend.prepare_training(rows, decode_images=False)


def test_an_hf_model_or_a_tiny_model_from_scratch_pretrains_nothing(tmp_path, monkeypatch):
    """configs/gpu.yaml sets `model: {backend: hf, tiny: {}}`: `dvc repro` must not stop at pretrain, and
    nothing is trained; the stage's out exists (empty) so the study's dependency on it holds."""
    from safetensors.torch import load_file

    monkeypatch.chdir(tmp_path)
    for model in ({"backend": "hf", "tiny": {}, "hf": {"path": "checkpoints/x"}},
                  {"backend": "tiny", "tiny": {"vision_init": None}}):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump({"model": model}))
        out = pretrain(str(path))
        assert "skipped" in out and load_file("work/pretrain/vision.safetensors") == {}
        assert json.loads(Path("work/pretrain/metrics.json").read_text()) == out


def test_a_unit_is_another_unit_when_the_tower_changes(tmp_path, monkeypatch):
    """The study skips a finished unit by fingerprint: a new tower under the same path must rerun it."""
    from medmat.runspec import RunSpec, load_study_params

    monkeypatch.chdir(tmp_path)
    (tmp_path / "records.parquet").write_bytes(b"table")
    (tmp_path / "related.json").write_text("{}")
    tower = tmp_path / "work/pretrain/vision.safetensors"
    tower.parent.mkdir(parents=True)
    tower.write_bytes(b"tower one")
    study = load_study_params(_params(tmp_path))
    spec = RunSpec(target="03", triplet="CT-Lung-COVID", subset_no=3, arm="x/related", seed=0,
                   records="records.parquet", run_dir="runs/03/x/related/seed0", params=study, manifest="related.json")
    before = spec.fingerprint()
    tower.write_bytes(b"tower two")
    assert spec.fingerprint() != before


def test_a_tower_below_the_floor_stops_the_stage_and_is_not_written(tmp_path, monkeypatch, capsys):
    """A pretraining that did not converge (pretrain.seed 1 of the default corpus: dev 0.45) would start
    every arm from a failed tower: the stage says so, names the figures, and writes no tower."""
    from medmat.pretrain import main

    monkeypatch.chdir(tmp_path)
    path = _params(tmp_path)
    params = yaml.safe_load(path.read_text())
    params["pretrain"]["min_dev_accuracy"] = 1.0  # 12 steps reach far less
    path.write_text(yaml.safe_dump(params))
    assert main(["--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "below pretrain.min_dev_accuracy 1.0" in err and "no tower was written" in err
    assert "where " in err and "pretrain.seed 0" in err
    assert "pretrain.text_init_std: 0.3 converged" in err  # the remedy, named while it is unset
    assert not (tmp_path / "work/pretrain/vision.safetensors").exists()
    params["pretrain"]["text_init_std"] = 0.3
    path.write_text(yaml.safe_dump(params))
    assert main(["--params", str(path)]) == 2
    assert "Try another pretrain.seed (pretrain.text_init_std is already 0.3)" in capsys.readouterr().err
    metrics = json.loads((tmp_path / "work/pretrain/metrics.json").read_text())
    assert metrics["dev_accuracy"] < 1.0 and set(metrics["dev_accuracy_by_question"]) == {"what", "where", "size"}


def test_pretrain_text_init_std_sets_the_pretraining_text_side_only(tmp_path, monkeypatch):
    """`pretrain.text_init_std` (check_tower's remedy for a pretraining that stays on a plateau) starts the
    stage's text side at that scale; the tower it writes differs, and the study's model.tiny is untouched."""
    import mlflow

    from medmat.models import build

    monkeypatch.chdir(tmp_path)
    path = _params(tmp_path)
    pretrain(str(path))
    tower = tmp_path / "work/pretrain/vision.safetensors"
    default_tower = tower.read_bytes()
    params = yaml.safe_load(path.read_text())
    params["pretrain"]["text_init_std"] = 0.3
    path.write_text(yaml.safe_dump(params))
    pretrain(str(path))
    assert tower.read_bytes() != default_tower

    mlflow.set_tracking_uri(params["tracking"]["tracking_uri"])
    runs = mlflow.search_runs(experiment_names=["medmat-cg-pretrain"], order_by=["attributes.start_time ASC"])
    assert list(runs["params.model.tiny.text_init_std"].fillna("model.tiny's")) == ["model.tiny's", "0.3"]
    study_model = build(params["model"])
    assert study_model.cfg.text_init_std == 0.02

    params["pretrain"]["text_init_std"] = 0
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match="text_init_std must be > 0"):
        pretrain(str(path))
