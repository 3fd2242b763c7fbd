"""scripts/plot_deepgemm.py reads bench_deepgemm.py's JSON: stage rows and failed points are left out."""

from __future__ import annotations

import importlib.util
import json
import os

PATH = os.path.join(os.path.dirname(__file__), "..", "scripts", "plot_deepgemm.py")


def load_script():
    spec = importlib.util.spec_from_file_location("plot_deepgemm", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_series_leave_out_stages_and_failed_points(tmp_path):
    plot = load_script()
    report = dict(
        device="GPU X", torch="2.11", cuda="13.0", deep_gemm="2.6.1",
        results=[
            dict(shape="s", M=1024, backend="deep_gemm", us=10.0),
            dict(shape="s", M=64, backend="deep_gemm", us=2.5),
            dict(shape="s", M=64, backend="stage:gather", us=1.0),
            dict(shape="s", M=64, backend="triton_fp8", us=None, error="boom"),
            dict(shape="t", M=64, backend="triton_bf16", us=3.0),
        ],
    )
    path = tmp_path / "r.json"
    path.write_text(json.dumps(report))
    series, title = plot.load([str(path)])
    assert sorted(series) == ["s", "t"]
    assert dict(series["s"]) == {"deep_gemm": [(64, 2.5), (1024, 10.0)]}
    assert dict(series["t"]) == {"triton_bf16": [(64, 3.0)]}
    assert title == "GPU X, torch 2.11, CUDA 13.0, DeepGEMM 2.6.1"


def test_a_point_in_two_files_is_drawn_once(tmp_path):
    plot = load_script()
    paths = []
    for i, us in enumerate((5.0, 6.0)):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(dict(results=[dict(shape="s", M=64, backend="deep_gemm", us=us)])))
        paths.append(str(path))
    series, _ = plot.load(paths)
    assert series["s"]["deep_gemm"] == [(64, 6.0)]


def test_plot_written_or_a_clear_refusal(tmp_path):
    plot = load_script()
    path = tmp_path / "r.json"
    path.write_text(json.dumps(dict(results=[dict(shape="s", M=64, backend="deep_gemm", us=2.0)])))
    out = tmp_path / "p.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert plot.main([str(path), "--out", str(out)]) == 2
        return
    assert plot.main([str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
