"""Every case of the golden manifest, run through the project's own code.

Missing golden folder: the whole module is skipped with the reason.  Present folder: every case runs,
and a case without a runner fails (a new case must never pass silently).
"""
import pytest

import golden

MANIFEST = golden.load_manifest()
CASES = sorted(MANIFEST["cases"]) if MANIFEST else []

pytestmark = pytest.mark.golden
if MANIFEST is None:
    pytestmark = [pytest.mark.golden, pytest.mark.skip(
        reason=f"no golden set at {golden.golden_dir()} (set TORA_GOLDEN_DIR)")]


@pytest.mark.parametrize("name", CASES or ["<no golden set>"])
def test_golden_case(name):
    case = golden.GoldenCase(name, MANIFEST["cases"][name], MANIFEST)
    run = golden.find_runner(name)
    assert run is not None, f"no runner registered for golden case {name!r}"
    outputs = run(case)
    failures = golden.check_outputs(case, outputs)
    assert not failures, f"golden case {name} failed:\n" + "\n".join(failures)
