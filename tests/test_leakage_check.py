"""Leakage across the whole table: the same image (exact bytes, or a re-encoded / resized copy) in two
subsets, or in train and test of one, is caught by `medmat validate` and reported as pairs.

The world: the small public-layout world of validate_world with structured images (soft blobs, so a
perceptual hash has something to see), into which copies of training images of subset 02 are planted
as test images of subset 03 (exact and re-encoded), and a resized copy inside subset 03 across splits.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image
from validate_world import ORI3_TEST, build_world, failing, pipeline, read, _write

from medmat.data.medmat_format import relative_path
from medmat.validate.leakage import exact_partners, near_value_pairs

ORI2_TRAIN = relative_path("dataset", 2, "train")


def _scene(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    arr = np.zeros((size, size))
    for _ in range(6):
        cy, cx, r, w = rng.random(4)
        arr += (w + 0.2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
    return Image.fromarray(np.uint8(255 * arr / arr.max()), "L")


@pytest.fixture(scope="module")
def scene_world(tmp_path_factory):
    root = build_world(tmp_path_factory.mktemp("scenes") / "data")
    for i, path in enumerate(sorted(root.glob("med-mat/**/*.png"))):
        _scene(1000 + i).save(path)
    return root


@pytest.fixture
def world(scene_world, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(scene_world, root)
    return root


def _plant(world):
    """Exact and re-encoded copies of subset 02's training images as subset 03 test images, and a
    resized copy of a subset 03 training image as one of its test images. Returns the record ids."""
    train2, test3, train3 = read(world, 2, "train"), read(world, 3, "test"), read(world, 3, "train")
    shutil.copyfile(world / train2[0]["image"], world / test3[0]["image"])               # exact bytes
    buf = io.BytesIO()
    Image.open(world / train2[1]["image"]).convert("RGB").save(buf, "JPEG", quality=70)   # re-encoded
    (world / "med-mat/d3/test/copy.jpg").write_bytes(buf.getvalue())
    test3[1]["image"] = "med-mat/d3/test/copy.jpg"
    Image.open(world / train3[2]["image"]).resize((90, 90), Image.LANCZOS).save(world / test3[2]["image"])
    _write(world, 3, "test", test3)
    return {"exact": ("ori02-train-1", f"ori03-test-{test3[0]['id']}"),
            "reencoded": ("ori02-train-2", f"ori03-test-{test3[1]['id']}"),
            "resized": (f"ori03-train-{train3[2]['id']}", f"ori03-test-{test3[2]['id']}")}


def _listed(report, check):
    return {f["record_id"]: f for f in failing(report)[check]["failures"]}


def test_structured_world_has_no_duplicates(world):
    code, report = pipeline(world)
    assert code == 0, failing(report)
    assert not failing(report)
    assert report["duplicates"]["exact"] == [] and report["duplicates"]["near"] == []
    assert report["duplicates"]["records_with_perceptual_hash"] == report["records"]


def test_cross_subset_copies_are_caught_and_paired(world):
    ids = _plant(world)
    total = sum(len(read(world, d, s)) for d in (2, 3, 4) for s in ("train", "test"))
    code, report = pipeline(world)
    assert code == 0   # warnings by default: designs drop the matching training records
    assert report["records"] == total     # detection only: no record is lost
    bad = failing(report)
    assert bad["cross_subset_duplicate"]["severity"] == "warning"
    assert bad["cross_subset_duplicate"]["failed"] == 2          # both records of the exact pair
    exact = _listed(report, "cross_subset_duplicate")
    a, b = ids["exact"]
    assert set(exact) == {a, b}
    assert exact[b]["file"] == ORI3_TEST and a in exact[b]["message"] and "subset 02" in exact[b]["message"]
    assert exact[a]["file"] == ORI2_TRAIN and b in exact[a]["message"]
    near = _listed(report, "near_duplicate")
    for kind in ("reencoded", "resized"):
        x, y = ids[kind]
        assert x in near and y in near, (kind, sorted(near))
        assert y in near[x]["message"] and "perceptual hash" in near[x]["message"]
    # The exact pair is exact, not also "near" (other bytes, same look).
    assert ids["exact"][0] not in near
    # Pairs section: both sides with file, record, subset and split.
    pairs = report["duplicates"]
    (pair,) = pairs["exact"]
    assert {pair["a"]["record_id"], pair["b"]["record_id"]} == {a, b}
    assert {pair["a"]["test_set"], pair["b"]["test_set"]} == {"subset 02", "subset 03"}
    assert pair["splits"] == "test/train"
    near_pairs = {frozenset((p["a"]["record_id"], p["b"]["record_id"])): p for p in pairs["near"]}
    assert frozenset(ids["reencoded"]) in near_pairs and frozenset(ids["resized"]) in near_pairs
    resized = near_pairs[frozenset(ids["resized"])]
    assert resized["a"]["test_set"] == resized["b"]["test_set"] == "subset 03"
    assert 0 <= resized["distance"] <= 4


def test_severity_and_distance_are_params(world):
    ids = _plant(world)
    code, report = pipeline(world, params={"severity": {"cross_subset_duplicate": "critical",
                                                        "near_duplicate": "critical"}})
    assert code == 1 and not report["passed"]
    code, report = pipeline(world, params={"phash_distance": 0})
    near = _listed(report, "near_duplicate") if "near_duplicate" in failing(report) else {}
    assert report["params"]["phash_distance"] == 0
    assert all("within 0 of 64 bits" in f["message"] for f in near.values())   # only identical hashes
    assert ids["exact"][0] not in near
    code, report = pipeline(world, params={"phash_distance": -1})   # exact copies only
    assert "near_duplicate" not in failing(report) and report["duplicates"]["near"] == []
    assert failing(report)["cross_subset_duplicate"]["failed"] == 2


# ---- the index itself ------------------------------------------------------------------------------------
def test_banded_index_finds_exactly_the_pairs_brute_force_finds():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 400, dtype=np.int64).astype(np.uint64)
    flips = [np.uint64(1) << np.uint64(b) for b in rng.integers(0, 64, 400)]
    near = base[:200] ^ np.array(flips[:200], dtype=np.uint64)            # distance 1 copies
    near2 = near[:100] ^ (np.array(flips[200:300], dtype=np.uint64) << np.uint64(0))
    hashes = np.unique(np.concatenate([base, near, near2]))
    for d in (0, 1, 2, 4):
        i, j, dist = near_value_pairs(hashes, d)
        x = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        bi, bj = np.nonzero((x <= d) & (x > 0))
        expect = {(a, b) for a, b in zip(bi, bj) if a < b}
        assert set(zip(i.tolist(), j.tolist())) == expect
        assert (dist == x[i, j]).all()


def test_exact_partners_name_another_subset():
    sha = np.array([0, 0, 1, 1, 2, -1, 0])
    group = np.array([2, 3, 2, 2, 4, 4, 3])
    test = np.array([False, True, False, True, False, False, False])
    out = exact_partners(sha, group, test)
    # content 0 in subsets 2 and 3 (and in both splits of 3); content 1 in train and test of subset 2
    assert out["dup_partner"].tolist() == [1, 0, -1, -1, -1, -1, 0]
    assert out["leaks"].tolist() == [False, True, True, True, False, False, True]
