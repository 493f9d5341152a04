"""Hypothesis profiles for the property tests in tests/hostile.

`ci` (the default) keeps each property to a bounded number of examples so the suite stays
quick; `make fuzz` selects `fuzz` with HYPOTHESIS_PROFILE=fuzz for a long run (20,000
examples per property, or HYPOTHESIS_MAX_EXAMPLES). Neither
writes an example database into the working tree.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=60, **_COMMON)  # type: ignore[arg-type]
# HYPOTHESIS_MAX_EXAMPLES shortens or lengthens a fuzz run (examples per property).
_LONG = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20000"))
settings.register_profile("fuzz", max_examples=_LONG, **_COMMON)  # type: ignore[arg-type]
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
