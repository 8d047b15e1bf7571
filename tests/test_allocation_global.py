"""The global greedy allocation against brute force, its budget, floors and dense guard; the gradient
sensitivity pass; both global allocations end to end on a tiny model."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import random_batches, tiny_model

from exporter.config import CompressionConfig
from exporter.loop.compress import compress_
from exporter.model.candidates import Matrix, list_matrices
from exporter.plan import allocate
from exporter.plan.greedy import DENSE, chain, greedy_ranks
from exporter.plan.profile import Profile
from exporter.plan.ranks import plan_params
from exporter.plan.sensitivity import output_gradient_sensitivity


def loss(matrices, spectra, weights, plan) -> float:
    """Σ_i w_i Σ_{j ≥ r_i} σ_ij² (dense: 0)."""
    return math.fsum(weights[m.name] * float(spectra[m.name][plan[m.name]:].square().sum())
                     for m in matrices if m.name in plan)


def brute_force(matrices, spectra, weights, budget, min_rank=1):
    """The exact optimum over every combination of ranks (floor .. last saving rank, or dense)."""
    options = []
    for m in matrices:
        last = (m.dense_params - 1) // m.params_per_rank
        options.append([(r, r * m.params_per_rank) for r in range(min_rank, last + 1)] + [(DENSE, m.dense_params)])
    best = None
    for combo in itertools.product(*options):
        if sum(cost for _, cost in combo) > budget:
            continue
        plan = {m.name: r for m, (r, _) in zip(matrices, combo) if r != DENSE}
        value = loss(matrices, spectra, weights, plan)
        if best is None or value < best:
            best = value
    return best


def make(shapes, seed=0, decay=None):
    gen = torch.Generator().manual_seed(seed)
    matrices, spectra, weights = [], {}, {}
    for i, (out, inp) in enumerate(shapes):
        m = Matrix(f"layers.{i}.w", "w", i, out, inp)
        n = min(out, inp)
        if decay is None:
            s = torch.rand(n, generator=gen, dtype=torch.float64).sort(descending=True).values * 10
        else:  # geometric: each σ² is `decay` times the previous one
            s = 3.0 * torch.rand((), generator=gen, dtype=torch.float64) * decay ** (torch.arange(n) / 2)
        matrices.append(m)
        spectra[m.name] = s
        weights[m.name] = float(torch.rand((), generator=gen)) + 0.1
    return matrices, spectra, weights


def test_equal_step_costs_match_brute_force_at_every_budget():
    # Square even matrices with fast-decaying spectra: every step costs m+n (going dense too), so the
    # greedy is an exact solution of the integer problem, not only of its relaxation.
    matrices, spectra, weights = make([(8, 8)] * 4, seed=1, decay=0.3)
    assert all(s.cost == 16 for m in matrices for s in chain(m, spectra[m.name], weights[m.name], 1))
    floors = sum(m.params_per_rank for m in matrices)
    for budget in range(floors, sum(m.dense_params for m in matrices) + 1, 8):
        plan = greedy_ranks(matrices, spectra, weights, budget)
        assert plan_params(matrices, plan) <= budget
        assert loss(matrices, spectra, weights, plan) == pytest.approx(
            brute_force(matrices, spectra, weights, budget), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixed_shapes_within_one_step_of_brute_force(seed):
    # Different step costs make the integer problem a knapsack: the greedy is optimal for its prefix and
    # loses at most the gain of the one step that stopped it (the fractional-knapsack bound).
    matrices, spectra, weights = make([(8, 12), (6, 10), (10, 10), (7, 9)], seed=seed)
    biggest_step = max(s.gain for m in matrices for s in chain(m, spectra[m.name], weights[m.name], 1))
    floors = sum(m.params_per_rank for m in matrices)
    for budget in range(floors, sum(m.dense_params for m in matrices) + 1, 5):
        plan = greedy_ranks(matrices, spectra, weights, budget)
        got, best = loss(matrices, spectra, weights, plan), brute_force(matrices, spectra, weights, budget)
        assert best - 1e-9 <= got <= best + biggest_step


def next_step_cost(m, spectrum, weight, rank, min_rank):
    """Cost of the step the greedy would take next for this matrix (None if it is already dense)."""
    if rank == DENSE:
        return None
    steps = chain(m, spectrum, weight, min_rank)
    if rank == min_rank:
        return steps[0].cost
    return steps[[s.rank for s in steps].index(rank) + 1].cost


@pytest.mark.parametrize("min_rank", [1, 3])
def test_budget_is_never_exceeded_and_nothing_else_fits(min_rank):
    matrices, spectra, weights = make([(64, 64), (32, 96), (96, 32), (48, 64)] * 3, seed=3)
    floors = sum(min_rank * m.params_per_rank for m in matrices)
    dense = sum(m.dense_params for m in matrices)
    for budget in (floors, floors + 1, (floors + dense) // 3, dense // 2 + 17, dense - 1):
        plan = greedy_ranks(matrices, spectra, weights, budget, min_rank)
        used = plan_params(matrices, plan)
        assert used <= budget
        left = budget - used
        for m in matrices:
            rank = plan.get(m.name, DENSE)
            assert rank == DENSE or min_rank <= rank and rank * m.params_per_rank < m.dense_params
            cost = next_step_cost(m, spectra[m.name], weights[m.name], rank, min_rank)
            assert cost is None or cost > left, f"{m.name} could still grow by {cost} <= {left}"


def test_floor_that_saves_nothing_stays_dense_and_too_small_budget_fails():
    matrices, spectra, weights = make([(4, 4), (32, 32)])
    plan = greedy_ranks(matrices, spectra, weights, budget=16 + 3 * 64, min_rank=3)
    assert "layers.0.w" not in plan  # rank 3 of a 4×4 costs 24 > 16: dense, paid in full
    assert plan["layers.1.w"] == 3
    with pytest.raises(ValueError, match="minimum rank"):
        greedy_ranks(matrices, spectra, weights, budget=16 + 3 * 64 - 1, min_rank=3)


def test_going_dense_is_pooled_when_the_tail_is_worth_it():
    # A flat spectrum on a wide matrix: the last saving rank costs almost as much as dense, and the dense
    # step (cost m·n − r(m+n), gain the whole tail) is worth more per parameter than any component.
    m = Matrix("w", "w", 0, 8, 64)  # p = 72, d = 512, last saving rank 7, dense step costs 8
    steps = chain(m, torch.ones(8, dtype=torch.float64), 1.0, 1)
    assert len(steps) == 1 and steps[0].rank == DENSE and steps[0].cost == 512 - 72
    assert greedy_ranks([m], {"w": torch.ones(8, dtype=torch.float64)}, {"w": 1.0}, budget=511) == {"w": 1}
    assert greedy_ranks([m], {"w": torch.ones(8, dtype=torch.float64)}, {"w": 1.0}, budget=512) == {}


def test_weights_steer_the_allocation():
    matrices, spectra, _ = make([(32, 32)] * 2, seed=4)
    spectra["layers.1.w"] = spectra["layers.0.w"].clone()
    budget = sum(m.dense_params for m in matrices) // 3
    even = greedy_ranks(matrices, spectra, {"layers.0.w": 1.0, "layers.1.w": 1.0}, budget)
    skewed = greedy_ranks(matrices, spectra, {"layers.0.w": 100.0, "layers.1.w": 1.0}, budget)
    assert abs(even["layers.0.w"] - even["layers.1.w"]) <= 1
    assert skewed["layers.0.w"] > skewed["layers.1.w"]


def test_allocate_global_relative_meets_ratio():
    matrices, spectra, _ = make([(64, 64), (32, 96), (96, 32)] * 4, seed=5)
    profile = Profile(spectra=spectra)
    dense = sum(m.dense_params for m in matrices)
    plan = allocate("global-relative", matrices, profile, 0.4, min_rank=1)
    assert dense * 0.6 - max(m.dense_params for m in matrices) < plan_params(matrices, plan) <= dense * 0.6
    with pytest.raises(ValueError, match="sensitivity"):
        allocate("global-fisher", matrices, profile, 0.4, min_rank=1)


def whole_model_sensitivity(model, batches, matrices) -> dict[str, float]:
    """The definition, the plain way: one backward of the whole model's summed next-token cross-entropy per
    batch, (∂L/∂y)² hooked at every linear's output, averaged in float64."""
    sums, counts = dict.fromkeys((m.name for m in matrices), 0.0), dict.fromkeys((m.name for m in matrices), 0)

    def hook(name):
        def grad(g):
            sums[name] += float(g.to(torch.float64).square().sum())
            counts[name] += g.numel()

        def forward(_module, _args, out):
            out.register_hook(grad)  # a forward hook that returns nothing leaves the output as it is
        return forward
    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in sums]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True)))
    with torch.enable_grad():
        for ids in batches:
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                              reduction="sum").backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)
    return {name: sums[name] / counts[name] for name in sums}


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sensitivity_walks_one_layer_at_a_time_and_equals_the_whole_models_backward(family, monkeypatch):
    """The layer-by-layer pass (forward walk keeping each layer's inputs, the head's gradient, a reverse walk
    carrying ∂L/∂h down) gives the whole model's backward, in groups of any size and for any batching (the
    summed loss), restores every grad flag, and never holds two decoder layers at once."""
    import exporter.plan.sensitivity as sensitivity
    from exporter.load.resident import ResidentSource
    from exporter.model.layer_inputs import capture_inputs
    model = tiny_model(family)
    source = ResidentSource(model, "cpu")
    matrices = list_matrices(model, source.arch)
    model.get_submodule(matrices[2].name).weight.requires_grad_(False)  # a flag the pass must give back as found
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    monkeypatch.setattr(sensitivity, "HEAD_CHUNK", 5)  # several chunks per window (32 positions)
    held, order = set(), []
    materialize, release = source.materialize, source.release

    def watched_materialize(i):
        assert not held, f"layer {i} materialised while {held} is"
        held.add(i)
        order.append(i)
        return materialize(i)
    source.materialize = watched_materialize
    source.release = lambda i: (held.discard(i), release(i))
    batches = random_batches(4, batch_size=2)
    expected = whole_model_sensitivity(model, batches, matrices)
    calib = capture_inputs(model, source.arch, batches, "cpu")
    whole = output_gradient_sensitivity(source, calib, batches, matrices)  # one group: the budget fits all
    layers = list(range(len(model.get_decoder().layers)))
    assert order == layers + layers[::-1]
    order.clear()
    per_batch = output_gradient_sensitivity(source, calib, batches, matrices, host_budget=1)  # groups of one
    assert order == (layers + layers[::-1]) * len(batches)
    singles = random_batches(4, batch_size=1)
    per_one = output_gradient_sensitivity(source, capture_inputs(model, source.arch, singles, "cpu"), singles, matrices)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert set(whole) == {m.name for m in matrices}
    assert all(v > 0 and math.isfinite(v) for v in whole.values())
    for name in whole:
        assert whole[name] == pytest.approx(expected[name], rel=1e-5), name
        assert per_batch[name] == pytest.approx(whole[name], rel=1e-6), name
        assert per_one[name] == pytest.approx(whole[name], rel=1e-4), name  # a token's gradient, whatever its batch


@pytest.mark.parametrize("allocation", ["global-relative", "global-fisher"])
def test_compress_with_global_allocation(arch, allocation):
    model = copy.deepcopy(tiny_model(arch))
    config = CompressionConfig(method="svd-llm-v2", ratio=0.5, allocation=allocation)
    result = compress_(model, random_batches(), config, device="cpu", progress=False)
    dense, after = result.linear_params()
    assert after <= 0.5 * dense
    assert result.plan and set(result.records) == set(result.plan)
    assert len(set(result.plan.values())) > 1  # not a uniform plan in disguise
    ids = random_batches(1)[0]
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_per_type_keeps_each_type_within_its_share():
    matrices, spectra, _ = make([(64, 64), (32, 96)] * 4, seed=6)
    matrices = [Matrix(m.name, "a" if m.out_features == 64 else "b", m.layer, m.out_features, m.in_features)
                for m in matrices]
    weights = {m.name: (1000.0 if m.kind == "a" else 1.0) for m in matrices}  # "a" would take everything
    profile = Profile(spectra=spectra, sensitivity=weights)
    one = allocate("global-fisher", matrices, profile, 0.5)
    per_type = allocate("global-fisher-per-type", matrices, profile, 0.5)
    for kind in "ab":
        group = [m for m in matrices if m.kind == kind]
        assert plan_params(group, per_type) <= 0.5 * sum(m.dense_params for m in group)
    b = [m for m in matrices if m.kind == "b"]
    assert plan_params(b, one) < plan_params(b, per_type)  # the single greedy starved type "b"
