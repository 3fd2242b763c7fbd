"""Engine integration tests. vLLM / transformers are not in the main test venv: tests that need them skip
there (pytest.importorskip) and run in the engines venv made by scripts/test_engines.sh."""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "engines: runs a real serving engine (vLLM) in a subprocess; slow")


@pytest.fixture(scope="session")
def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
