"""Test tiers: every module names one; `make test` runs the fast tier, `make test-all` everything."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = "pytester"
pytestmark = pytest.mark.fast

CONFTEST = Path(__file__).with_name("conftest.py").read_text()


def test_a_module_without_a_tier_is_refused(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_untiered="def test_a():\n    pass\n",
                        test_tiered="import pytest\npytestmark = pytest.mark.fast\ndef test_b():\n    pass\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*test modules without a tier*: test_untiered.py"])


def test_the_fast_tier_leaves_out_slow_tests_of_fast_modules(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mixed="import pytest\npytestmark = pytest.mark.fast\n"
                                   "def test_quick():\n    pass\n"
                                   "@pytest.mark.slow\ndef test_long():\n    pass\n",
                        test_heavy="import pytest\npytestmark = pytest.mark.slow\ndef test_c():\n    pass\n")
    pytester.runpytest("-m", "not slow").assert_outcomes(passed=1, deselected=2)
    pytester.runpytest().assert_outcomes(passed=3)
