"""The MAT catalogue: counts, look-ups, vocabulary, relations and the public tables' faults."""

from __future__ import annotations

import pytest

from medmat.catalog import CatalogError, Triplet, UnknownVocabulary, load_catalog, parse_target
from medmat.cli import main

CT_LUNG_COVID = Triplet("CT", "Lung", "COVID")


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


def test_counts_and_classification_subsets(cat):
    assert len(cat.datasets) == 109
    assert len(cat.subsets) == 53
    assert cat.classification_subsets() == list(range(1, 38))
    assert load_catalog() is cat  # cached


def test_triplet_notation():
    assert str(CT_LUNG_COVID) == "CT-Lung-COVID"
    assert str(Triplet("X-ray", "Lung", "COVID")) == "X-ray-Lung-COVID"


def test_dataset_and_subset_lookups(cat):
    d = cat.dataset(2)
    assert (d.name, d.subset_no) == ("CT Kindney Dataset", 2)
    assert str(cat.triplet_of_dataset(2)) == "CT-Kidney-Kidney Diseases"
    assert cat.dataset("02") == d
    s = cat.subset(3)
    assert s.dataset_nos == (3, 4, 6)
    assert s.triplet == CT_LUNG_COVID and s.kind == "classification" and s.qa_released
    assert cat.triplet_of_subset(28) == Triplet("X-ray", "Lung", "COVID")
    assert not cat.subset(38).qa_released
    with pytest.raises(CatalogError, match="unknown dataset number 110"):
        cat.dataset(110)
    with pytest.raises(CatalogError, match="unknown subset number 54"):
        cat.subset(54)
    with pytest.raises(CatalogError, match="no subset"):
        cat.triplet_of_dataset(64)


def test_raw_values_kept_beside_canonical(cat):
    d49 = cat.dataset(49)
    assert (d49.raw_modality, d49.modality) == ("X-Ray", "X-ray")
    d16 = cat.dataset(16)
    assert (d16.raw_area, d16.area) == ("Teeth", "Mouth")
    d97 = cat.dataset(97)
    assert (d97.raw_modality, d97.modality) == ("Ultrasound", "US")
    assert cat.datasets.loc[49, "raw_modality"] == "X-Ray"
    # Dataset 44 keeps the paper's double listing in the raw column of subset 18.
    assert 44 in cat.subset(18).paper_dataset_nos and 44 not in cat.subset(18).dataset_nos
    assert 44 in cat.subset(22).dataset_nos


def test_synonyms_and_unknown_vocabulary(cat):
    assert cat.canonical_modality("X-Ray") == "X-ray"
    assert cat.canonical_modality("Ultrasound") == "US"
    assert cat.canonical_modality("US") == "US"
    assert cat.canonical_area("Teeth") == "Mouth"
    assert cat.canonical_area("Mouth") == "Mouth"
    with pytest.raises(UnknownVocabulary, match="'Sonar'") as err:
        cat.canonical_modality("Sonar")
    assert err.value.value == "Sonar" and err.value.element == "modality"
    with pytest.raises(UnknownVocabulary, match="area 'Foot'"):
        cat.canonical_area("Foot")


def test_related_and_unrelated_for_ct_lung_covid(cat):
    # By hand from the subsets table: CT = 2,3,4,5,6; Lung = 3,4,28,30; COVID = 3,28.
    # Subset 3 is the target itself; everything else of 1..37 shares nothing.
    assert cat.related_subsets(CT_LUNG_COVID) == [2, 4, 5, 6, 28, 30]
    assert cat.unrelated_subsets(CT_LUNG_COVID) == sorted(set(range(1, 38)) - {2, 3, 4, 5, 6, 28, 30})
    assert cat.shared_elements(CT_LUNG_COVID, 28) == {"area", "task"}
    assert cat.shared_elements(CT_LUNG_COVID, 4) == {"modality", "area"}
    assert cat.shared_elements(CT_LUNG_COVID, 31) == set()  # X-ray-Chest: Chest is not Lung
    assert cat.shared_elements(CT_LUNG_COVID, 3) == {"modality", "area", "task"}
    # Related/unrelated consider classification subsets only (47 is X-ray-Lung detection).
    assert 47 not in cat.related_subsets(CT_LUNG_COVID)


def test_parse_target(cat):
    assert parse_target("3") == (CT_LUNG_COVID, 3)
    assert parse_target("03") == (CT_LUNG_COVID, 3)
    assert parse_target("CT-Lung-COVID") == (CT_LUNG_COVID, 3)
    assert parse_target("X-Ray-Lung-COVID") == (Triplet("X-ray", "Lung", "COVID"), 28)
    assert parse_target("CT-Kidney-Kidney Diseases") == (Triplet("CT", "Kidney", "Kidney Diseases"), 2)
    # A triplet shared by two subsets (16 and 34) names no single subset.
    assert parse_target("FP-Fundus-Level") == (Triplet("FP", "Fundus", "Level"), None)
    with pytest.raises(CatalogError, match="cannot read target 'CT-Lung-Flu'"):
        parse_target("CT-Lung-Flu")
    with pytest.raises(CatalogError):
        parse_target("99")


def _faults(cat, kind):
    return [f for f in cat.check() if f.kind == kind]


def test_check_reports_known_faults(cat):
    spelled = {f.message.split("spell ")[1].split(";")[0] for f in _faults(cat, "spelling_variant")}
    assert spelled == {"modality 'X-Ray'", "modality 'Ultrasound'", "area 'Teeth'"}
    teeth = next(f for f in _faults(cat, "spelling_variant") if "Teeth" in f.message)
    assert teeth.datasets == (16, 17)

    (multi,) = _faults(cat, "multiple_subsets")
    assert multi.datasets == (44,) and multi.subsets == (18, 22)
    assert {f.datasets[0] for f in _faults(cat, "no_subset_in_paper")} == {43, 64, 83}
    (mismatch,) = _faults(cat, "triplet_mismatch")
    assert mismatch.datasets == (97,) and mismatch.subsets == (43,) and "'Breast'" in mismatch.message
    (name,) = _faults(cat, "name_conflict")
    assert 46 in name.datasets
    (link,) = _faults(cat, "link_conflict")
    assert set(link.datasets) == {50, 63}
    assert any(57 in f.datasets and "no number" in f.message for f in _faults(cat, "noted"))


def test_catalog_cli_check(capsys):
    assert main(["catalog", "--check"]) == 0
    out = capsys.readouterr().out
    assert "109 datasets, 53 subsets" in out
    assert "dataset 44" in out and "X-Ray" in out and "Teeth" in out
    assert main(["catalog", "--check", "--strict"]) == 1


def test_catalog_cli_views(capsys):
    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    assert "CT-Lung-COVID" in out and len(out.strip().splitlines()) == 54
    assert main(["catalog", "--related", "CT-Lung-COVID"]) == 0
    out = capsys.readouterr().out
    assert "28  X-ray-Lung-COVID" in out and "shares area, task" in out
    assert main(["catalog", "--related", "3"]) == 0  # the paper's taxonomy, as the designs and the search read it
    out = capsys.readouterr().out
    assert "related subsets (13)" in out and "playing COVID / State" in out
    assert "07  Der-Skin-Melanoma" in out and "shares task" in out      # Cancer counts as State
    assert main(["catalog", "--related", "3", "--task-taxonomy", "fine"]) == 0
    out = capsys.readouterr().out
    assert "related subsets (6)" in out and "Der-Skin-Melanoma" not in out
    assert main(["catalog", "--dataset", "44"]) == 0
    assert "MRI-Brain-Cancer" in capsys.readouterr().out
    assert main(["catalog", "--subset", "3"]) == 0
    assert "CT-Lung-COVID" in capsys.readouterr().out
    assert main(["catalog", "--dataset", "500"]) == 2
    assert "unknown dataset number 500" in capsys.readouterr().out


def test_published_task_faults_are_reported_not_fixed(cat, capsys):
    faults = {f.kind: f for f in cat.check() if f.kind in ("task_conflict", "task_text_copied")}
    assert faults["task_conflict"].datasets == (54,) and faults["task_conflict"].subsets == (28,)
    assert "Tuberculosis" in faults["task_conflict"].message and "COVID" in faults["task_conflict"].message
    assert faults["task_text_copied"].datasets == (94, 103)
    # Reported, never fixed: the tables still say what the release says.
    assert cat.dataset(54).subset_no == 28 and cat.dataset(54).task == "COVID"
    assert cat.dataset(103).raw_task == cat.dataset(94).raw_task == "Surgical Instrument Segmentation"
    # Generic shared task texts ("Multi Classification") are not flagged as copies.
    assert sum(f.kind == "task_text_copied" for f in cat.check()) == 1
    assert main(["catalog", "--check"]) == 0
    out = capsys.readouterr().out
    assert "dataset 54 (Shenzhen Chest X-Ray Set)" in out and "dataset 103" in out
