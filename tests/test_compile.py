"""torch.compile of a model that calls moe_plugin: no graph breaks, same numbers, dynamic batch sizes."""

import pytest
import torch

from moe_plugin import FusedMoE, MoEConfig, fused_experts, fused_topk
from moe_plugin.functional import call_count
from test_fused_experts import make_case


class TinyMoE(torch.nn.Module):
    def __init__(self, w1, w2, gate):
        super().__init__()
        self.w1, self.w2, self.gate = w1, w2, gate

    def forward(self, x):
        logits = x @ self.gate.t()
        w, ids = fused_topk(x, logits, 2, True)
        return fused_experts(x, self.w1, self.w2, w, ids) + x


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_dynamic(backend):
    torch._dynamo.reset()
    _, w1, w2, _, _ = make_case(1, 8, 2, 32, 16)
    model = TinyMoE(w1, w2, torch.randn(8, 32))
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)
    before = call_count()
    for m in (3, 17, 64):  # several batch sizes through one dynamic graph
        x = torch.randn(m, 32)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert call_count() - before == 6  # the op body really ran (3 compiled + 3 eager calls)


def test_compile_inplace_op():
    torch._dynamo.reset()
    x, w1, w2, w, ids = make_case(5, 4, 2, 16, 8)

    def f(x, w, ids):
        y = x.clone()
        fused_experts(y, w1, w2, w, ids, inplace=True)
        return y

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w, ids), fused_experts(x, w1, w2, w, ids))


def test_compile_layer_without_graph_breaks():
    torch._dynamo.reset()
    layer = FusedMoE(MoEConfig(8, 2, 32, 16, dtype=torch.float32), with_gate=True)
    with torch.no_grad():
        layer.w13_weight.normal_()
        layer.w2_weight.normal_()
    with torch.no_grad():  # inference, as engines run it
        explanation = torch._dynamo.explain(layer)(torch.randn(7, 32))
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
        compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
        for m in (1, 9):
            x = torch.randn(m, 32)
            torch.testing.assert_close(compiled(x), layer(x))
