"""medmat.names: subset and target numbers spelled one way, whatever type they arrive as."""

import numpy as np
import pandas as pd
import pytest

from medmat.names import LETTERS, norm_target, subset_key


@pytest.mark.parametrize("value", [4, "4", "04", " 4 ", 4.0, np.int64(4), np.float64(4.0)])
def test_subset_key_pads_every_spelling_of_a_number(value):
    assert subset_key(value) == "04"


def test_subset_key_missing_and_bad_values():
    for missing in (None, float("nan"), pd.NA, np.nan):
        assert subset_key(missing, missing="NA") == "NA"
        with pytest.raises(ValueError, match="no subset number"):
            subset_key(missing)
    for bad in ("4a", 4.5, "CT-Lung-COVID", "-3", ""):
        with pytest.raises(ValueError, match="not a subset number"):
            subset_key(bad)
    assert subset_key(123) == "123"


def test_norm_target_numbers_and_triplets():
    assert norm_target(3) == norm_target("3") == norm_target("03") == "03"
    assert norm_target(" CT-Lung-COVID ") == "CT-Lung-COVID"
    with pytest.raises(ValueError, match="empty target"):
        norm_target("  ")


def test_letters_are_the_alphabet_in_order():
    assert LETTERS[:4] == "ABCD" and len(LETTERS) == 26 and LETTERS == "".join(sorted(set(LETTERS)))
