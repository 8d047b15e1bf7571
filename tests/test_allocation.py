"""Ratio ↔ rank arithmetic and the budget each allocation must keep."""
import math

import pytest
import torch

from exporter.model.candidates import Matrix
from exporter.plan import allocate
from exporter.plan.profile import Profile
from exporter.plan.ranks import break_even_rank, plan_params, rank_for_keep, saves_params
from exporter.plan.v2 import exact_mean_ratios


def llama_like(layers=4, hidden=256, inter=640, kv=64):
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [Matrix(f"model.layers.{i}.{k}", k, i, o, n) for i in range(layers) for k, (o, n) in shapes.items()]


def profile_for(matrices, seed=0, decay_per_layer=0.3):
    g = torch.Generator().manual_seed(seed)
    spectra = {}
    for m in matrices:
        k = min(m.out_features, m.in_features)
        # later layers: larger scale and flatter spectra (as in real models)
        base = torch.rand(k, generator=g, dtype=torch.float64) * 50 + 5
        spectra[m.name] = (base * (1 + decay_per_layer * m.layer)).sort(descending=True).values
    return Profile(spectra=spectra)


def test_rank_formula_and_break_even():
    m = Matrix("a", "q_proj", 0, 4096, 4096)
    assert rank_for_keep(m, 0.8) == math.floor(0.8 * 4096 * 4096 / 8192) == 1638
    gqa = Matrix("k", "k_proj", 0, 1024, 4096)
    assert break_even_rank(gqa) == pytest.approx(819.2)
    assert saves_params(gqa, 819) and not saves_params(gqa, 820)


def test_uniform_keeps_budget_and_drops_matrices_that_would_not_save():
    ms = llama_like()
    for ratio in (0.0, 0.2, 0.4, 0.6, 0.8):
        plan = allocate("uniform", ms, None, ratio)
        dense = sum(m.dense_params for m in ms)
        assert plan_params(ms, plan) <= (1 - ratio) * dense
        for name, r in plan.items():
            assert saves_params(next(m for m in ms if m.name == name), r)
    # ratio 0 with a square matrix: floor(mn/(m+n)) = n/2 pairs cost exactly mn, so it stays dense
    sq = [Matrix("sq", "q_proj", 0, 64, 64)]
    assert allocate("uniform", sq, None, 0.0) == {}


def test_min_rank_that_cannot_be_afforded_is_an_error():
    ms = [Matrix("t", "q_proj", 0, 4, 4)]
    with pytest.raises(ValueError, match="min-rank"):
        allocate("uniform", ms, None, 0.9, min_rank=1)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_v2_allocation_keeps_each_group_budget(ratio):
    ms = llama_like()
    plan = allocate("v2", ms, profile_for(ms), ratio)
    for kind in {m.kind for m in ms}:
        group = [m for m in ms if m.kind == kind]
        assert plan_params(group, plan) <= (1 - ratio) * sum(m.dense_params for m in group) + 1e-9
    ranks = [plan[f"model.layers.{i}.q_proj"] for i in range(4)]
    assert len(set(ranks)) > 1, "heterogeneous: layers with different losses get different ranks"


def test_v2_gives_more_rank_to_higher_loss():
    ms = llama_like()
    plan = allocate("v2", ms, profile_for(ms, decay_per_layer=1.0), 0.4)
    q = [plan[f"model.layers.{i}.q_proj"] for i in range(4)]
    assert q == sorted(q), f"larger truncation loss should keep more rank: {q}"


def test_v2_pins_matrices_whose_loss_is_at_most_one():
    ms = llama_like()
    prof = profile_for(ms)
    tiny = "model.layers.0.o_proj"
    prof.spectra[tiny] = prof.spectra[tiny] * 1e-6  # L ≤ 1 → log L ≤ 0: the paper's score is undefined
    plan = allocate("v2", ms, prof, 0.4)
    m = next(m for m in ms if m.name == tiny)
    assert plan[tiny] == rank_for_keep(m, 1 - 0.95)
    group = [m for m in ms if m.kind == "o_proj"]
    assert plan_params(group, plan) <= 0.6 * sum(g.dense_params for g in group)


def test_exact_mean_ratios_clamps_and_keeps_the_mean():
    out = exact_mean_ratios([1.5, 0.1, 0.1, 0.1], target=0.4, upper=0.9)
    assert max(out) <= 0.9 and min(out) >= 0
    assert sum(out) / 4 == pytest.approx(0.4)


# ---- near-dense plans stay dense (--keep-dense-above) ----

def test_a_matrix_planned_near_dense_stays_dense_and_its_budget_goes_elsewhere():
    matrices = llama_like(layers=4)
    sims = [-0.9, 0.95, 0.96, 0.97]  # layer 0 changes its input most: adaCR keeps it at retention 1
    profile = Profile(layer_similarity=sims)
    ratio = 0.3
    plain = allocate("adacr", matrices, profile, ratio, min_retention=0.2, keep_dense_above=1.0)
    near = [m for m in matrices if m.name in plain and plain[m.name] * m.params_per_rank >= 0.95 * m.dense_params]
    assert near and all(m.layer == 0 for m in near)  # the case the option is for
    plan = allocate("adacr", matrices, profile, ratio, min_retention=0.2, keep_dense_above=0.95)
    assert all(m.name not in plan for m in near)  # kept dense: exact, no truncation error
    assert all(plan[m.name] * m.params_per_rank < 0.95 * m.dense_params for m in matrices if m.name in plan)
    assert plan_params(matrices, plan) <= (1 - ratio) * sum(m.dense_params for m in matrices)
    later = [m for m in matrices if m.layer > 0]
    assert sum(plan[m.name] for m in later) < sum(plain[m.name] for m in later)  # paid by the other layers


def test_keep_dense_above_that_leaves_no_budget_is_an_error():
    matrices = llama_like(layers=2)
    with pytest.raises(ValueError, match="keep-dense-above"):
        allocate("uniform", matrices, None, 0.03, keep_dense_above=0.9)
    with pytest.raises(ValueError, match="keep-dense-above"):
        allocate("uniform", matrices, None, 0.4, keep_dense_above=0.0)
