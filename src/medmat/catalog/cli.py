"""`medmat catalog`: show and check the MAT catalogue.

    medmat catalog                      subsets table with triplets
    medmat catalog --check [--strict]   counts and the public tables' known faults (--strict: exit 1 if any)
    medmat catalog --dataset 44         one dataset;  --subset 3: one subset
    medmat catalog --related CT-Lung-COVID   (or --related 3) subsets sharing elements, and which
                                        (tasks as --task-taxonomy reads them: paper, as the designs, or fine)
"""

from __future__ import annotations

import argparse
import sys

from medmat.catalog import CatalogError, load_catalog, parse_target
from medmat.catalog.tasks import TAXONOMIES


def configure(parser: argparse.ArgumentParser) -> None:
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="count datasets/subsets and list the known faults")
    g.add_argument("--dataset", metavar="N", help="show dataset N")
    g.add_argument("--subset", metavar="N", help="show subset N")
    g.add_argument("--related", metavar="TARGET",
                   help="subsets sharing elements with TARGET (subset number or triplet, e.g. CT-Lung-COVID)")
    parser.add_argument("--strict", action="store_true", help="with --check: exit 1 when faults exist")
    parser.add_argument("--task-taxonomy", choices=TAXONOMIES, default="paper",
                        help="with --related: how tasks are compared; paper (the designs' and search's default: "
                             "COVID and Cancer also count as State) or fine (the catalogue's task names)")


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except BrokenPipeError:  # `medmat catalog | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


def _run(args: argparse.Namespace) -> int:
    cat = load_catalog()
    try:
        if args.check:
            faults = cat.check()
            n_cls = len(cat.classification_subsets())
            print(f"{len(cat.datasets)} datasets, {len(cat.subsets)} subsets "
                  f"({n_cls} classification with QA released, {len(cat.subsets) - n_cls} detection/segmentation)")
            print(f"{len(faults)} known faults in the public tables (kept as published; canonical columns beside):")
            for f in faults:
                print(f"  - {f}")
            return 1 if (args.strict and faults) else 0
        if args.dataset is not None:
            d = cat.dataset(args.dataset)
            for key, value in d._asdict().items():
                print(f"{key:18} {value}")
            print(f"{'triplet':18} {d.triplet if d.triplet else '(none: in no subset)'}")
            return 0
        if args.subset is not None:
            s = cat.subset(args.subset)
            for key, value in s._asdict().items():
                print(f"{key:18} {value}")
            print(f"{'triplet':18} {s.triplet}")
            return 0
        if args.related is not None:
            from medmat.designs import rules  # the very rules `medmat designs` and `medmat search` use

            triplet, no = parse_target(args.related, cat)
            target = rules.target_view(cat, triplet, no, args.task_taxonomy)
            print(f"target {triplet}" + (f" (subset {no:02d})" if no else "")
                  + f", playing {' / '.join(target.roles)} ({args.task_taxonomy} task taxonomy)")
            related = rules.related_pool(cat, target, args.task_taxonomy)
            print(f"related subsets ({len(related)}):")
            for r in related:
                shared = sorted(rules.shares_any(cat, target, r, args.task_taxonomy), key=rules.ELEMENTS.index)
                print(f"  {r:02d}  {str(cat.triplet_of_subset(r)):40} shares {', '.join(shared)}")
            unrelated = rules.unrelated_pool(cat, target, args.task_taxonomy)
            print(f"unrelated subsets ({len(unrelated)}): {', '.join(f'{u:02d}' for u in unrelated)}")
            return 0
    except CatalogError as exc:
        print(f"error: {exc}")
        return 2
    print(f"{'no':>3}  {'triplet':40} {'kind':24} {'qa':3} datasets")
    for no in cat.subsets.index:
        s = cat.subset(no)
        print(f"{no:3d}  {str(s.triplet):40} {s.kind:24} {'yes' if s.qa_released else 'no':3} "
              f"{','.join(map(str, s.dataset_nos))}")
    return 0
