"""``python -m moe_plugin info``: the explanation on good input, usage errors (not tracebacks) on bad."""

from __future__ import annotations

import os

import pytest
import torch

from moe_plugin.__main__ import main


def test_info_explains_the_choice(capsys, monkeypatch):
    monkeypatch.delenv("MOE_PLUGIN_EXPERTS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "chosen: prepare_finalize=local experts=torch" in out
    assert "triton             CPU without TRITON_INTERPRET=1" in out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["info", "--experts", "0"], "MoEConfig.num_experts must be a positive int, got 0"),
        (["info", "--device", "foo"], "--device 'foo'"),
        pytest.param(["info", "--device", "cuda"], "no CUDA device is available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")),
    ],
)
def test_bad_arguments_are_usage_errors(capsys, argv, needle):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_an_unusable_forced_backend_is_reported_with_the_unforced_choice(capsys, monkeypatch):
    monkeypatch.setenv("MOE_PLUGIN_EXPERTS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["info", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "error: forced experts backend 'triton' cannot run" in out
    assert "without MOE_PLUGIN_EXPERTS: prepare_finalize=local experts=torch" in out
    assert os.environ["MOE_PLUGIN_EXPERTS"] == "triton"  # the forcing variable is restored
