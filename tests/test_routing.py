import pytest
import torch

import naive
from moe_plugin import fused_topk, grouped_topk


@pytest.mark.parametrize("m,e,k", [(0, 8, 2), (1, 8, 1), (5, 16, 4), (33, 64, 8), (4, 1, 1)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_fused_topk_matches_naive(m, e, k, renormalize, scoring):
    torch.manual_seed(m * 100 + e + k)
    logits = torch.randn(m, e, dtype=torch.bfloat16)
    x = torch.randn(m, 16)
    w, ids = fused_topk(x, logits, k, renormalize, scoring)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    assert w.shape == ids.shape == (m, k)
    ref_w, ref_ids = naive.topk_softmax(logits.float(), k, renormalize, scoring)
    if m:
        torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)
        assert torch.equal(ids.long(), ref_ids)


@pytest.mark.parametrize(
    "e,k,groups,topk_group,scoring,use_bias,scale",
    [
        (256, 8, 8, 4, "sigmoid", True, 2.5),  # DeepSeek-V3
        (64, 6, 8, 3, "softmax", False, 1.0),  # DeepSeek-V2-lite style
        (16, 2, 4, 2, "sigmoid", True, 1.0),
        (16, 4, 0, 0, "softmax", False, 1.0),  # no grouping
    ],
)
def test_grouped_topk_deepseek_semantics(e, k, groups, topk_group, scoring, use_bias, scale):
    torch.manual_seed(e + k)
    m = 9
    logits = torch.randn(m, e)
    bias = torch.randn(e) * 0.5 if use_bias else None
    w, ids = grouped_topk(
        torch.randn(m, 8), logits, k, True, groups, topk_group, scoring, scale, bias
    )
    ref_w, ref_ids = naive.grouped_topk(logits, k, True, groups or 1, topk_group or (groups or 1), scoring, scale, bias)
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_grouped_topk_bias_only_selects():
    # A large bias on expert 3 forces its selection, but its weight stays its unbiased score.
    logits = torch.zeros(1, 8)
    bias = torch.zeros(8)
    bias[3] = 10.0
    w, ids = grouped_topk(torch.zeros(1, 4), logits, 1, False, 2, 1, "sigmoid", 1.0, bias)
    assert ids.item() == 3
    assert w.item() == pytest.approx(0.5)


def test_router_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gating_output"):
        fused_topk(x, torch.randn(3, 8), 2, True)
    with pytest.raises(ValueError, match="topk"):
        fused_topk(x, torch.randn(4, 8), 9, True)
    with pytest.raises(ValueError, match="scoring_func"):
        fused_topk(x, torch.randn(4, 8), 2, True, scoring_func="tanh")
    with pytest.raises(ValueError, match="num_expert_group"):
        grouped_topk(x, torch.randn(4, 8), 2, True, num_expert_group=3, topk_group=1)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        grouped_topk(x, torch.randn(4, 8), 2, True, 2, 1, e_score_correction_bias=torch.zeros(7))
    with pytest.raises(TypeError, match="gating_output"):
        fused_topk(x, torch.zeros(4, 8, dtype=torch.int32), 2, True)
