"""Hypothesis profiles for the fuzz tests (tests/test_fuzz_*.py).

`suite` (the default) keeps every property small, so all fuzz tests together stay well under a
minute on a loaded machine; `long` (TESSERA_FUZZ=long, used by scripts/fuzz) runs many more
examples per property and keeps Hypothesis's example database so failures are replayed.
Property bodies never depend on the profile: only the number of examples changes.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile("suite", max_examples=40, deadline=None, database=None,
                          suppress_health_check=_SLOW, print_blob=True)
settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=_SLOW,
                          print_blob=True)
PROFILE = os.environ.get("TESSERA_FUZZ", "suite")
settings.load_profile(PROFILE)


def scaled(n: int) -> settings:
    """`n` examples in the suite (a property that costs a daemon round trip each), 25x that in a long run."""
    return settings(max_examples=n * 25 if PROFILE == "long" else n)
