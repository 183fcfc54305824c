"""Shared test setup: the repository root on sys.path, a headless matplotlib, small data."""
import os
import sys

import matplotlib
import pytest

matplotlib.use("Agg")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """A 20,000-step circles dataset written once per test session."""
    from markov_circles_timeseries import main
    out = tmp_path_factory.mktemp("data")
    assert main(["--n-steps", "20000", "--out-dir", str(out), "--no-plots", "--seed", "3"]) == 0
    return str(out)
