"""The negative control's world: Med-MAT-mini `--entangled`, ingested and designed like the main world.

In the entangled world every subset's labels have a look of their own, and the study's targets are
null subsets (medmat.data.synth_world.world_params): each of their images draws its look at random
from the lesion patterns no other subset shows, whatever its label, and they get NULL_SCALE times the
records. No data can teach a target there, and on its label-balanced test any model, trained on
anything, scores chance in expectation; so the study's Trained - Baseline+ gap must be equivalent to
zero (medmat.stats.equivalence), and a gap would come from the procedure (answer letters, the
question's wording, a leak), not from the data. Its questions are independent draws (every image its
own look), so one world's interval carries the test. The control's units are then run by
`python -m medmat.pipeline study --world control`.

The world's 21k images live in `work/control-world`, beside the stage's outputs, not among them: they
are a pure function of the `synth:` params and this code (byte-identical for the same seed), and the
table keeps every image's sha256. Declared as a DVC output they cost a walk of 21k files on every
`dvc repro`, more than half of a no-op's time. So the table and designs are the outputs, and the
control stage regenerates the images where they are missing (a fresh clone after `dvc pull`, a queued
experiment's workspace) and checks them against the table before any unit reads them
(medmat.data.synth_world.regenerate_missing).

    python -m medmat.control [--out work/control] [--world work/control-world]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medmat.config import load_section
from medmat.experiment import ExperimentConfig
from medmat.io import atomic_write_json


WORLD = "work/control-world"


def control_data(out: str = "work/control", params: str = "params.yaml", world: str = WORLD) -> int:
    """The negative control's world: Med-MAT-mini --entangled, ingested and designed like the main world."""
    import shutil

    experiment = load_section(ExperimentConfig, "experiment", params)
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)  # synth refuses a non-empty folder; this stage owns `out` entirely
    root.mkdir(parents=True)
    if not experiment.control:
        # The control stage's inputs exist but are empty: it runs no unit and writes a note as metrics.
        import pyarrow.parquet as pq

        from medmat.data.records import SCHEMA

        atomic_write_json(root / "DISABLED.json", {"reason": "experiment.control is false"})
        atomic_write_json(root / "designs" / "designs.json", {"targets": {}, "note": "experiment.control is false"})
        pq.write_table(SCHEMA.empty_table(), root / "records.parquet")
        return 0
    build_world(root, params, Path(world), entangled=True)
    return 0


def build_world(out: Path, params: str, world: Path, entangled: bool) -> None:
    """Med-MAT-mini of `params`' `synth:` (entangled or not) into `world`, ingested and designed into
    `out` (records.parquet, designs/) as the main world's stages do; also medmat.other_worlds's."""
    import shutil

    from medmat.data.ingest import IngestParams, ingest_to_parquet
    from medmat.data.synth_world import generate, world_params
    from medmat.designs import design_targets

    if world.exists():
        shutil.rmtree(world)  # synth refuses a non-empty folder; this module owns `world` entirely
    generate(world, world_params(params, entangled=entangled), progress=False)
    ingest_to_parquet(world, out / "records.parquet", load_section(IngestParams, "ingest", params))
    design_targets(out / "records.parquet", out / "designs", params)


def main(argv: list[str] | None = None) -> int:
    """`python -m medmat.control [--out work/control] [--params params.yaml]` (the control-data stage)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m medmat.control", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="work/control", help="folder: records.parquet, designs/")
    parser.add_argument("--world", default=WORLD, help="folder for the world's images (not a DVC output)")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    from medmat.config import ConfigError

    try:
        return control_data(args.out, args.params, args.world)
    except (ConfigError, FileExistsError, ValueError) as exc:
        logging.getLogger("medmat.control").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
