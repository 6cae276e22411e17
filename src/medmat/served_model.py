"""The served model: a trained backend logged to MLflow as a `pyfunc` that answers image questions.

    uri = log_model(RUN_DIR / "model")            # inside an active run (medmat.tracking.tracked_run)
    model = mlflow.pyfunc.load_model(uri)
    model.predict(pd.DataFrame({"image": [path_or_base64_png], "question_choice": [prompt]}))
    # -> ["B"]; params={"scorer": "generate"} for greedy text + the letter parser

The artifact is the backend's saved directory (for `hf`: the base checkpoint reference + adapter),
because `mlflow.transformers` cannot round-trip a VLM on this stack. `question_choice` is a Med-MAT
`Question-choice` prompt (question, options "A: ...", the instruction line), read by the one parser of
medmat.data.medmat_format: the prompt the model was trained on, which the `hf` backend feeds verbatim.
Only runs the registry can use log a model (the pipeline passes `log_model=spec.candidate`).
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow.pyfunc


def _image_to_path(value: Any, scratch: Path, i: int) -> str:
    """A path on disk for `value`: an existing file path, or base64 / raw PNG/JPEG bytes written out."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        text = str(value)
        if len(text) < 4096 and Path(text).is_file():
            return str(Path(text).resolve())
        try:
            raw = base64.b64decode(text, validate=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"row {i}: image is neither an existing file nor base64 image bytes") from exc
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            out = scratch / f"image_{i}.png"
            img.save(out, format="PNG")
    except Exception as exc:  # PIL raises several types for bad bytes
        raise ValueError(f"row {i}: image bytes are not a readable image ({exc})") from exc
    return str(out)


def rows_from_frame(df, scratch: Path) -> list[dict[str, Any]]:
    """Records-table-like rows from a pyfunc input frame (columns image, question_choice)."""
    from medmat.data.medmat_format import parse_question_choice

    missing = {"image", "question_choice"} - set(df.columns)
    if missing:
        raise ValueError(f"input frame lacks column(s) {sorted(missing)}; needs image and question_choice")
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        try:
            question, options = parse_question_choice(rec["question_choice"])
        except ValueError as exc:
            raise ValueError(f"row {i}: question_choice is not a Med-MAT Question-choice prompt: {exc}") from None
        path = _image_to_path(rec["image"], scratch, i)
        rows.append({
            "record_id": str(rec.get("record_id", f"input-{i}")), "image": path, "image_path": path,
            "question": question, "question_choice": rec["question_choice"], "options": options,
            "answer_letter": "", "answer_text": "", "subset_no": rec.get("subset_no"),
        })
    return rows


class _MedmatPyfuncMethods:
    """pyfunc wrapper: the artifact `model` is a directory that `medmat.models.load` reads.

    predict(DataFrame[image, question_choice]) -> list of answer letters. `params={"scorer": "generate"}`
    uses greedy generation + the letter parser instead of option likelihood (the default).
    """

    def load_context(self, context) -> None:
        from medmat import models

        self.backend = models.load(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from medmat.scoring import predict_letters

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        scorer = (params or {}).get("scorer", "likelihood")
        with tempfile.TemporaryDirectory(prefix="medmat-pyfunc-") as tmp:
            rows = rows_from_frame(model_input, Path(tmp))
            letters, _raw = predict_letters(self.backend, rows, scorer=scorer)
        return [letter or "" for letter in letters]


def _subclass_quietly(name: str, bases: tuple, doc: str | None):
    """type(name, bases) with MLflow's class-creation warning ("add type hints to predict") dropped.

    PythonModel.__init_subclass__ forces that warning through a `once` filter of its own, so an
    ordinary warnings filter cannot silence it; the explicit signature in log_model does the job
    type hints would do (and type hints would switch on MLflow's own input coercion).
    """
    shown = warnings.showwarning
    warnings.showwarning = lambda *a, **k: None
    try:
        return type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    finally:
        warnings.showwarning = shown


# Pickled by reference (medmat.served_model.MedmatPyfunc): loading needs medmat installed, as serving does.
MedmatPyfunc = _subclass_quietly(
    "MedmatPyfunc", (_MedmatPyfuncMethods, mlflow.pyfunc.PythonModel), _MedmatPyfuncMethods.__doc__
)


def _example_png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def example_frame():
    """A one-row input frame: an 8x8 grey PNG as base64 and a two-option Med-MAT prompt."""
    import pandas as pd

    from medmat.data.medmat_format import format_question_choice

    return pd.DataFrame({"image": [_example_png()],
                         "question_choice": [format_question_choice("What disease is shown in this image?",
                                                                    ["Normal", "Cancer"])]})


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question_choice")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("scorer", "string", "likelihood")]),
    )


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow skips its slow dependency inference (it imports the model to trace imports).
    # `medmat` itself is not on an index: serve from an environment where it is installed.
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "pandas", "pillow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_model(model_dir: str | os.PathLike, artifact_path: str = "model", registered_model_name: str | None = None,
              input_example: bool = False) -> str:
    """Log the saved model directory as a pyfunc model in the active run; return its model URI.

    For `hf` the directory holds the base checkpoint reference + adapter (what the backend saves), so
    the logged artifact stays small and loading reads the base checkpoint from its local path.

    The signature (columns, the `scorer` param) is always logged and needs no inference. An input
    example (`input_example=True`) is shown in the UI but MLflow validates it by loading the logged
    model and predicting on it: ~5 s for the first tiny model of a process (imports), a second load of
    a multi-GB checkpoint for `hf`. Off by default; tests predict through the loaded model instead.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found (expected a backend's save())")
    example = example_frame() if input_example else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=MedmatPyfunc(),
            artifacts={"model": str(model_dir)},
            signature=_signature(),
            input_example=example,
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
        )
    return info.model_uri
