"""Pure helpers of scripts/bench: percentiles and the printed table."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from benchlib import stats  # noqa: E402


def test_percentile_uses_nearest_rank():
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert stats.percentile(values, 50) == 3.0
    assert stats.percentile(values, 99) == 5.0
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(list(range(1, 101)), 99) == 99


def test_percentile_of_nothing_is_nan_and_bad_p_is_refused():
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_rate_and_rounding_report_missing_values_as_none():
    assert stats.rate(500, 2.0) == 250.0
    assert stats.rounded(stats.rate(1, 0)) is None
    assert stats.rounded(None) is None
    assert stats.rounded(1.26, 1) == 1.3


def test_table_aligns_values_and_prints_missing_as_na():
    text = stats.table([("limit_sign_per_s", 7000.0, "note"), ("crl_lookup_ns", None, "")])
    lines = text.splitlines()
    assert lines[0].split() == ["limit_sign_per_s", "7,000.0", "note"]
    assert lines[1].split() == ["crl_lookup_ns", "n/a"]
    assert lines[0].index("7,000.0") + len("7,000.0") == lines[1].index("n/a") + len("n/a")
