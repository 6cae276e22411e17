"""The negative control's world: Med-MAT-mini `--entangled`, ingested and designed like the main world.

In the entangled world every subset's labels have a look of their own, so nothing a model learns from
the Related subsets can transfer to the target: the Related arm must fall to chance, and the study's
Trained - Baseline+ gap must be equivalent to zero (medmat.stats.equivalence). The control's units are
then run by `python -m medmat.pipeline study --world control`.
"""

from __future__ import annotations

from pathlib import Path

from medmat.io import atomic_write_json
from medmat.runspec import load_study_params


def control_data(out: str = "work/control", params: str = "params.yaml") -> int:
    """The negative control's world: Med-MAT-mini --entangled, ingested and designed like the main world."""
    import shutil

    study = load_study_params(params)
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)  # synth refuses a non-empty folder; this stage owns `out` entirely
    root.mkdir(parents=True)
    if not study.experiment.control:
        atomic_write_json(root / "DISABLED.json", {"reason": "experiment.control is false"})
        return 0
    import dataclasses

    from medmat.config import load_section
    from medmat.data.ingest import IngestParams, ingest_to_parquet
    from medmat.data.synth import SynthParams, generate
    from medmat.designs import design_targets

    synth = dataclasses.replace(load_section(SynthParams, "synth", params), entangled=True)
    generate(root / "data", synth, progress=False)
    ingest_to_parquet(root / "data", root / "records.parquet", load_section(IngestParams, "ingest", params))
    design_targets(root / "records.parquet", root / "designs", params)
    return 0
