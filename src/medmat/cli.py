"""The `medmat` command: one sub-command per pipeline stage.

Each stage module exposes `configure(parser)` and `run(args) -> int`. Modules are imported only when
their sub-command runs, so `medmat catalog` does not pay for torch or MLflow start-up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# sub-command -> (module, one-line help). Order is the pipeline's data order.
COMMANDS: dict[str, tuple[str, str]] = {
    "catalog": ("medmat.catalog.cli", "show and check the MAT catalogue (datasets, subsets, triplets)"),
    "synth": ("medmat.data.synth_world", "generate Med-MAT-mini in the public Med-MAT layout"),
    "build-qa": ("medmat.data.qa", "build Med-MAT-style QA records from raw image-label pairs"),
    "ingest": ("medmat.data.ingest", "read a Med-MAT tree into one records table"),
    "validate": ("medmat.validate.suite", "check the records table with Great Expectations"),
    "designs": ("medmat.designs", "write the CG experiment arms of each target as mixture manifests"),
    "train": ("medmat.train_cli", "train a model on a mixture (tiny CPU VLM or a local HF checkpoint)"),
    "evaluate": ("medmat.evaluate", "score a model on a target's test set (accuracy, CI, confusion)"),
    "search": ("medmat.search", "Optuna search for the training mixture that serves a target best"),
    "register": ("medmat.registry", "add evaluated runs to the MLflow registry; move `champion`"),
    "report": ("medmat.report", "write the markdown report and plots"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmat", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or only == name:
            importlib.import_module(module_name).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the chosen sub-command (help on the bare command needs none).
    chosen = next((a for a in argv if a in COMMANDS), None)
    args = build_parser(only=chosen or "").parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
