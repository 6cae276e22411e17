"""The `hf` backend on tiny random LLaVA and Qwen2-VL checkpoints: the user's own path, end to end.

Each checkpoint is built from a config (tokenizer trained with `tokenizers`), saved to a temporary
directory and then used exactly like a downloaded one: load by path -> LoRA-train -> evaluate ->
save -> reload -> same predictions.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medmat.config import ConfigError
from medmat.data.records import read_records
from medmat.scoring import evaluate_backend
from medmat.models import build, load
from medmat.models.hf import DEFAULT_TARGET_MODULES, HFBackend, ModelPathError, build_hf, load_hf
from medmat.models.tiny_hf import BUILDERS
from medmat.train import TrainConfig, train_model

FAMILIES = ["llava", "qwen2vl"]
INSTR = "Answer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A records table of 12 image questions whose answer is readable from the image (bright vs dark)."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        sick = i % 2 == 1
        base = 200 if sick else 40
        arr = np.clip(base + rng.normal(0, 20, (48, 64, 3)), 0, 255).astype("uint8")
        path = root / f"img{i}.png"
        Image.fromarray(arr).save(path)
        options = ["Normal", "COVID-19"] if i % 4 < 2 else ["COVID-19", "Normal"]
        answer = "COVID-19" if sick else "Normal"
        letter = "AB"[options.index(answer)]
        qc = "What does this CT image show?\n" + "\n".join(f"{c}: {o}" for c, o in zip("AB", options)) + f"\n{INSTR}"
        rows.append(dict(record_id=f"ori01-train-{i}", subset_no=3, image_path=str(path), image=f"img{i}.png",
                         question_choice=qc, options=options, answer_letter=letter, answer_text=answer))
    return root, pd.DataFrame(rows)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "ckpt")


def _train(model_cfg: dict, df: pd.DataFrame, root, out_dir, steps: int = 10, lr: float = 5e-3) -> HFBackend:
    """LoRA/full training through the platform's trainer (accelerate loop, checkpoints, final save)."""
    cfg = TrainConfig(max_steps=steps, lr=lr, batch_size=4, warmup_steps=0, eval_every=0, eval_batch_size=6,
                      checkpoint_every=5, progress=False, num_threads=2)
    result = train_model(cfg, model_cfg, df, dev_df=df.iloc[:6], out_dir=out_dir, data_root=root)
    assert result.steps == steps and np.isfinite(result.final_train_loss)
    assert result.dev_history and result.dev_history[-1][0] == steps
    return result.backend


def _mean_loss(backend: HFBackend, rows: list[dict]) -> float:
    with torch.no_grad():
        backend.model.eval()
        return float(backend.loss(backend.collate(rows)))


def test_round_trip_load_lora_train_evaluate_save_reload(checkpoint, world, tmp_path):
    family, path = checkpoint
    root, df = world
    model_cfg = {"backend": "hf", "hf": {"path": str(path), "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}
    rows = df.to_dict("records")
    untrained = build(model_cfg, data_root=root)  # LoRA B starts at zero: this is the base model's view
    assert isinstance(untrained, HFBackend)
    trainable, total = untrained.trainable_parameters()
    assert 0 < trainable < total
    before = evaluate_backend(untrained, df, scorer="likelihood", batch_size=6)
    loss_before = _mean_loss(untrained, rows)

    run = tmp_path / "run"
    backend = _train(model_cfg, df, root, run)
    assert _mean_loss(backend, rows) < loss_before  # it learned something about its training data
    assert (run / "checkpoints").is_dir() and (run / "model" / "medmat_backend.json").is_file()

    after = evaluate_backend(backend, df, scorer="likelihood", batch_size=6)
    assert after.n == 12 and 0.0 <= after.accuracy <= 1.0
    scores = backend.score_options(rows[:4])
    assert [len(s) for s in scores] == [2, 2, 2, 2]
    assert scores != backend.score_options(rows[4:8])  # images differ -> scores differ
    assert [p["raw_output"] for p in after.predictions] != [p["raw_output"] for p in before.predictions]
    gen = evaluate_backend(backend, df, scorer="generate", batch_size=6)
    texts = [p["raw_output"] for p in gen.predictions]

    out = tmp_path / "model"
    backend.save(out)
    info = json.loads((out / "medmat_backend.json").read_text())
    assert info["backend"] == "hf" and info["mode"] == "lora" and info["base_path"] == str(path.resolve())
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not list(out.rglob("model.safetensors"))  # the base weights are referenced, not copied

    for saved in (out, run / "model"):  # our save, and the trainer's final model
        reloaded = load(saved, data_root=root)
        again = evaluate_backend(reloaded, df, scorer="likelihood", batch_size=6)
        assert [p["predicted_letter"] for p in again.predictions] == [p["predicted_letter"] for p in after.predictions]
        np.testing.assert_allclose(reloaded.score_options(rows[:4]), scores, atol=1e-4)
    regen = evaluate_backend(reloaded, df, scorer="generate", batch_size=6)
    assert [p["raw_output"] for p in regen.predictions] == texts


def test_labels_fall_only_on_the_answer(checkpoint, world):
    family, path = checkpoint
    root, df = world
    backend = build_hf({"path": str(path)}, data_root=root)
    rows = df.to_dict("records")[:3]
    batch = backend.collate(rows)
    tok = backend.tokenizer
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled == tok(row["answer_letter"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # the labelled tokens are the last real tokens of the sequence (right padding after them)
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i][n - len(labelled):n].tolist() == labelled
    # the fallback for tokenizers that split letters (one teacher-forced pass per option) agrees with
    # the one-forward scorer where both apply
    fast = backend.score_options(rows)
    backend._letter_ids = None
    np.testing.assert_allclose(backend.score_options(rows), fast, atol=1e-4)
    if family == "qwen2vl":
        assert {"mm_token_type_ids", "image_grid_thw", "pixel_values"} <= set(batch)
        image_id = backend.model.config.image_token_id
        assert ((batch["input_ids"] == image_id) == (batch["mm_token_type_ids"] == 1)).all()


def test_lora_adapts_only_the_language_model(checkpoint):
    family, path = checkpoint
    backend = build_hf({"path": str(path), "freeze_projector": True})
    lora_names = [n for n, _ in backend.model.named_parameters() if "lora_" in n]
    assert lora_names and all("language_model" in n for n in lora_names)
    assert not any(("vision" in n or "visual" in n) for n, p in backend.model.named_parameters() if p.requires_grad)
    # default: projector trained alongside (saved in the adapter as modules_to_save)
    backend = build_hf({"path": str(path)})
    projector = "multi_modal_projector" if family == "llava" else "merger"
    assert any(projector in n and p.requires_grad for n, p in backend.model.named_parameters())


def test_full_finetune_round_trip_freezes_the_vision_tower(world, tmp_path):
    root, df = world
    path = BUILDERS["llava"](tmp_path / "llava")
    hf = {"path": str(path), "full_finetune": True, "freeze_vision": True, "gradient_checkpointing": True}
    fresh = build_hf(hf, data_root=root)
    grads = {n: p.requires_grad for n, p in fresh.model.named_parameters()}
    assert not any(v for n, v in grads.items() if "vision_tower" in n)
    assert all(v for n, v in grads.items() if "language_model" in n or "multi_modal_projector" in n)
    rows = df.to_dict("records")
    backend = _train({"backend": "hf", "hf": hf}, df, root, tmp_path / "run", steps=3, lr=1e-3)
    # the frozen tower is bit-identical after training; the language model moved
    trained = dict(backend.model.named_parameters())
    for n, p in fresh.model.named_parameters():
        same = torch.equal(p, trained[n])
        assert same if "vision_tower" in n else True
    assert not all(torch.equal(p, trained[n]) for n, p in fresh.model.named_parameters() if "language_model" in n)
    scores = backend.score_options(rows[:4])
    info = json.loads((tmp_path / "run" / "model" / "medmat_backend.json").read_text())
    assert info["mode"] == "full" and (tmp_path / "run" / "model" / "model" / "config.json").is_file()
    reloaded = load_hf(tmp_path / "run" / "model", data_root=root)
    np.testing.assert_allclose(reloaded.score_options(rows[:4]), scores, atol=1e-4)


def test_logged_pyfunc_model_answers_a_question(world, tmp_path):
    """MLflow model of an hf run = adapter + base reference; pyfunc.load_model answers like the backend."""
    import mlflow

    from medmat.served_model import log_model
    from medmat.tracking import TrackingConfig, setup

    root, df = world
    path = BUILDERS["llava"](tmp_path / "llava", seed=3)
    backend = build_hf({"path": str(path), "lora": {"r": 4}}, data_root=root)
    backend.save(tmp_path / "model")
    rows = df.to_dict("records")[:4]
    expected = ["AB"[int(np.argmax(s))] for s in backend.score_options(rows)]

    setup(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "art"),
                         experiment="hf-pyfunc"))
    with mlflow.start_run():
        uri = log_model(tmp_path / "model")
    model = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"image": [r["image_path"] for r in rows], "question_choice": [r["question_choice"] for r in rows]})
    assert list(model.predict(frame)) == expected


def test_missing_path_is_a_clear_error_without_any_download(tmp_path, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):  # a spy: loading must stop before transformers is asked anything
        raise AssertionError("from_pretrained was called for a missing path")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_hub)
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(ModelPathError, match="no-such-checkpoint"):
        build({"backend": "hf", "hf": {"path": str(missing)}})
    with pytest.raises(ModelPathError, match="empty"):
        build_hf({})
    (tmp_path / "not-a-ckpt").mkdir()
    with pytest.raises(ModelPathError, match="config.json"):
        build_hf({"path": str(tmp_path / "not-a-ckpt")})
    # a Hub-style name is not a local directory either: same error, nothing fetched
    with pytest.raises(ModelPathError, match="llava-hf/llava-1.5-7b-hf"):
        build_hf({"path": "llava-hf/llava-1.5-7b-hf"})


def test_unreadable_image_is_an_error_naming_the_record(checkpoint, world, tmp_path):
    from medmat.data.images import ImageError

    family, path = checkpoint
    root, df = world
    backend = build_hf({"path": str(path)}, data_root=root)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    row = {**df.to_dict("records")[0], "record_id": "ori01-train-broken", "image_path": str(tmp_path / "broken.png")}
    with pytest.raises(ImageError, match="ori01-train-broken"):
        backend.collate([row])
    # a relative path is resolved inside the data root and may not escape it
    row = {**row, "image_path": "", "image": "../outside.png"}
    with pytest.raises(ImageError, match="ori01-train-broken.*data root"):
        backend.score_options([row])


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="lroa"):
        build_hf({"path": "x", "lroa": {}})
    with pytest.raises(ConfigError, match="rank|alpah"):
        build_hf({"path": "x", "lora": {"alpah": 3}})
    with pytest.raises(ConfigError, match="dtype"):
        build_hf({"path": "x", "dtype": "fp8"})
    assert "language_model" in DEFAULT_TARGET_MODULES


def test_gpu_benchmark_script_refuses_the_real_shape_without_cuda(monkeypatch, capsys):
    """bench/gpu_lora_qwen2vl.py refuses the real shape without CUDA (its CPU --smoke run is tested in
    tests/test_precision.py)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "gpu_bench", Path(__file__).resolve().parents[1] / "bench" / "gpu_lora_qwen2vl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_accelerate_launch_lora(tmp_path):
    """`medmat train` with model.backend: hf under `accelerate launch` with 2 processes (CPU, gloo): the
    multi-GPU recipe of docs/real-checkpoints.md, LoRA + gradient checkpointing + DDP, then evaluate."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from medmat.data.ingest import ingest_to_parquet
    from medmat.data.synth_world import SynthParams, generate
    from medmat.mixture import resolve_mixture, save_manifest

    generate(tmp_path / "data", SynthParams(train_per_subset=12, test_per_subset=6), progress=False)
    ingest_to_parquet(tmp_path / "data", tmp_path / "records.parquet")
    records = read_records(tmp_path / "records.parquet")
    _, man = resolve_mixture(records, {"components": {"03": 12, "28": 12}, "seed": 0})
    save_manifest(tmp_path / "manifest.json", man)
    ckpt = BUILDERS["qwen2vl"](tmp_path / "ckpt")
    params = {"model": {"backend": "hf", "hf": {"path": str(ckpt), "lora": {"r": 4, "alpha": 8},
                                                "gradient_checkpointing": True}},
              "train": {"max_steps": 4, "batch_size": 8, "lr": 5e-3, "warmup_steps": 0, "eval_every": 0,
                        "checkpoint_every": 2, "num_threads": 1, "progress": False},
              "evaluate": {"batch_size": 8}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    bin_dir = Path(sys.executable).parent
    cmd = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "medmat.cli", "train",
           "--params", "params.yaml", "--records", "records.parquet", "--manifest", "manifest.json",
           "--out", "run", "--no-tracking"]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 4 and np.isfinite(metrics["final_train_loss"])
    info = json.loads((tmp_path / "run" / "model" / "medmat_backend.json").read_text())
    assert info["backend"] == "hf" and info["mode"] == "lora"
    done = subprocess.run([str(bin_dir / "medmat"), "evaluate", "--params", "params.yaml", "--model", "run/model",
                           "--records", "records.parquet", "--target", "3", "--out", "eval", "--no-track"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n"] > 0
