"""Shared fixtures for the op tests.

``backend`` runs a test twice on CPU: through the torch fallback (``TRITON_INTERPRET`` unset) and through
the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1``; ``ops._jit.kernel`` reads the variable
at launch time). In interpreter mode the fixture counts interpreted launches and fails the test if none
happened, so a test cannot silently fall back to torch.
"""

from __future__ import annotations

import importlib.util

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None


class LaunchCounter:
    def __init__(self) -> None:
        self.launches = 0


class Backend:
    """What ``backend`` yields: the implementation's name; set ``expect_launch = False`` in a case that
    legitimately launches nothing (an empty input)."""

    def __init__(self, name: str, counter: LaunchCounter | None = None) -> None:
        self.name = name
        self.counter = counter
        self.expect_launch = True

    @property
    def interpreted(self) -> bool:
        return self.name == "interpreter"

    def __repr__(self) -> str:
        return self.name


@pytest.fixture
def interpreter(monkeypatch):
    """Triton interpreter on; yields a counter of interpreted kernel launches."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    counter = LaunchCounter()
    original = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        counter.launches += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    return counter


@pytest.fixture(params=["torch", "interpreter"])
def backend(request, monkeypatch):
    """Parametrizes a test over the two CPU implementations; yields a ``Backend``."""
    if request.param == "torch":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        yield Backend("torch")
        return
    be = Backend("interpreter", request.getfixturevalue("interpreter"))
    yield be
    if be.expect_launch:
        assert be.counter.launches > 0, "the test ran no Triton kernel under the interpreter"
