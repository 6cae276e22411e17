"""Pictures of an evaluation: one confusion-matrix PNG per subset (true × predicted option text).

Written beside metrics.json by medmat.scoring.write_outputs(plots=True); matplotlib is imported only
here, so scoring a model never pays for it.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

from medmat.io import atomic_write_bytes


def plot_confusion(conf: dict[str, Any], title: str, path: Path) -> None:
    """Confusion matrix PNG with labelled axes and counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = conf["labels"], conf["columns"]
    size = max(3.5, 0.9 * len(cols) + 2.0)
    fig, ax = plt.subplots(figsize=(size, max(3.0, 0.8 * len(rows) + 1.8)))
    try:
        mat = conf["matrix"]
        ax.imshow(mat, cmap="Blues", aspect="auto")
        top = max((max(r) for r in mat), default=0) or 1
        for i, r in enumerate(mat):
            for j, v in enumerate(r):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(path, buf.getvalue())
    finally:
        plt.close(fig)


def write_confusion_pngs(result, out_dir: Path) -> list[Path]:
    """confusion_<subset>.png for each subset of a medmat.scoring.EvalResult; the paths written."""
    written = []
    for sub, conf in result.confusion.items():
        s = result.per_subset[sub]
        title = (
            f"subset {sub}{_triplet_suffix(sub)}\naccuracy {s['accuracy']:.3f} "
            f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}], n={s['n']} ({result.scorer})"
        )
        path = Path(out_dir) / f"confusion_{sub}.png"
        plot_confusion(conf, title, path)
        written.append(path)
    return written


def _triplet_suffix(sub: str) -> str:
    try:
        from medmat.catalog import load_catalog

        return f" ({load_catalog().triplet_of_subset(int(sub))})"
    except Exception:  # catalogue missing or subset unknown ("NA"): the number alone still identifies it
        return ""
