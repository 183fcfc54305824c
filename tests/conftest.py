"""Shared test setup: the repository root on sys.path, a headless matplotlib, small data, and
figures whose folder is left to its default written below the test's tmp folder, not the
repository's plots/."""
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
    assert main(["--n-steps", "20000", "--out-dir", str(out), "--no-plot", "--seed", "3"]) == 0
    return str(out)


@pytest.fixture(scope="session", autouse=True)
def plots_below_session_tmp(tmp_path_factory):
    """Module- and session-scoped fixtures run before a test's own plots_below_tmp: their figures
    go to a session tmp folder, never the repository's plots/."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLOTS_ROOT", str(tmp_path_factory.mktemp("plots")))
        yield


@pytest.fixture(autouse=True)
def plots_below_tmp(tmp_path, monkeypatch):
    """The default --plots-dir (plots/<name>) of every command a test runs, in-process or in a
    subprocess that inherits the environment, lands in this test's tmp folder."""
    monkeypatch.setenv("PLOTS_ROOT", str(tmp_path / "plots"))
    return tmp_path / "plots"
