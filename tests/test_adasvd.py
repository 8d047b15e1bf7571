"""adaComp on synthetic inputs (X_c ≠ X_o), adaCR's budget, and adasvd end to end on tiny models."""
import math

import pytest
import torch
from conftest import random_batches, tiny_model

from exporter import CompressionConfig, compress_
from exporter.config import ALLOCATIONS, default_min_retention
from exporter.factorize.adasvd import adacomp, adacomp_loss, rebalance
from exporter.factorize.base import MatrixInput, get_method
from exporter.factorize.stats import InputStats
from exporter.factorize.svd_llm_v2 import SVDLLMV2
from exporter.model.candidates import Matrix
from exporter.plan import adacr, allocate
from exporter.plan.adacr import shift_to_budget
from exporter.plan.profile import Profile
from exporter.plan.ranks import plan_params


def drifted_inputs(n_in=24, tokens=400, drift=0.3, seed=0):
    """X_o with a few dominant directions, and X_c = X_o passed through a perturbed map (what earlier
    compressed layers do to the stream). Rows are tokens."""
    gen = torch.Generator().manual_seed(seed)
    f64 = dict(generator=gen, dtype=torch.float64)
    x_o = torch.randn(tokens, n_in, **f64) * torch.logspace(0, -1.5, n_in, dtype=torch.float64)
    mix = torch.eye(n_in, dtype=torch.float64) + drift * torch.randn(n_in, n_in, **f64) / math.sqrt(n_in)
    x_c = x_o @ mix + 0.05 * torch.randn(tokens, n_in, **f64)
    return x_o, x_c


def stats_of(x_c, x_o, w):
    """adaComp's statistics of one input, with ‖W X_o‖² of the weight `w` (named "w")."""
    stats = InputStats(x_c.shape[1], "cpu", cross=True, targets={"w": w})
    stats.add(x_c, x_o)
    return stats


def direct_loss(w, approx, x_c, x_o):
    return float(torch.linalg.norm(x_c @ approx.T - x_o @ w.T))


def reduced_rank_optimum(w, x_c, x_o, rank):
    """min over rank-r W' of ‖W' X_c − W X_o‖, computed from the activations themselves: project the
    target onto the row space of X_c, then Eckart–Young on the projection."""
    y = x_o @ w.T  # tokens × out
    q, _ = torch.linalg.qr(x_c)
    y_proj = q @ (q.T @ y)
    s = torch.linalg.svdvals(y_proj)
    return math.sqrt(float(torch.linalg.norm(y - y_proj)) ** 2 + float(s[rank:].square().sum()))


@pytest.fixture
def case():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 24, generator=gen, dtype=torch.float64)
    x_o, x_c = drifted_inputs()
    return w, x_o, x_c, stats_of(x_c, x_o, w), 6


def whitened_init(w, stats, rank):
    return SVDLLMV2().factorize(MatrixInput("w", w, stats), rank)


def test_second_moment_loss_equals_activation_loss(case):
    w, x_o, x_c, stats, rank = case
    up, down = whitened_init(w, stats, rank)
    assert adacomp_loss(w, up, down, stats, "w") == pytest.approx(direct_loss(w, up @ down, x_c, x_o), rel=1e-6)


def test_statistics_fold_by_row_blocks_and_keep_the_target_energy_not_x_o_x_oᵀ(case, monkeypatch):
    """Folded a few rows at a time (no n×n temporaries), the sums equal the whole products; and X_o X_oᵀ
    is not kept, only ‖W X_o‖² of each target weight."""
    from exporter.factorize import stats as stats_module
    w, x_o, x_c, _, _ = case
    monkeypatch.setattr(stats_module, "ROWS", 5)  # 24 inputs: blocks of 5, 5, 5, 5, 4
    stats = InputStats(x_c.shape[1], "cpu", cross=True, targets={"w": w, "2w": 2 * w})
    for part in range(4):  # four batches of 100 tokens
        stats.add(x_c[part * 100:(part + 1) * 100], x_o[part * 100:(part + 1) * 100])
    x_c32, x_o32 = x_c.float().double(), x_o.float().double()  # the per-batch products run in float32 on the CPU
    torch.testing.assert_close(stats.gram, x_c32.T @ x_c32, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.cross, x_c32.T @ x_o32, rtol=1e-5, atol=1e-4)
    energy = float((x_o @ w.T).square().sum())
    assert stats.target_energy["w"] == pytest.approx(energy, rel=1e-5)
    assert stats.target_energy["2w"] == pytest.approx(4 * energy, rel=1e-5)
    assert not hasattr(stats, "gram_orig")
    with pytest.raises(RuntimeError, match="after X Xᵀ was read"):  # the mirrored sum is final
        stats.add(x_c[:10], x_o[:10])


def test_tokens_are_stored_as_observed_and_multiplied_in_float64_by_row_blocks(case, monkeypatch):
    """float32 activations are kept in float32 (a float64 copy would only double them); every product with
    them is the float64 product of the same values, formed a few rows at a time."""
    from exporter.factorize import stats as stats_module
    w, x_o, x_c, _, _ = case
    x_c, x_o = x_c[:20].float(), x_o[:20].float()  # 20 tokens, 24 inputs: kept
    monkeypatch.setattr(stats_module, "ROWS", 6)  # blocks of 6, 6, 6, 2 tokens
    stats = InputStats(24, "cpu", cross=True, targets={"w": w})
    stats.add(x_c[:8], x_o[:8])
    stats.add(x_c[8:], x_o[8:])
    assert stats.tokens.dtype == stats.tokens_orig.dtype == torch.float32
    c, o = x_c.double(), x_o.double()  # the exact values, in float64
    d = torch.randn(24, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = dict(rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(stats.project(w), w @ c.T, **exact)
    torch.testing.assert_close(stats.moment_products(d), (c.T @ (c @ d), o.T @ (c @ d)), **exact)
    torch.testing.assert_close(stats.moment_products(d, transpose_cross=False), (c.T @ (c @ d), c.T @ (o @ d)),
                               **exact)
    torch.testing.assert_close(stats.gram, c.T @ c, **exact)
    torch.testing.assert_close(stats.cross, c.T @ o, **exact)
    assert stats.trace == pytest.approx(float(c.square().sum()), rel=1e-13)
    stats.drop_cross()  # once the group's linears are factorized: X_oᵀ is freed, adaComp refuses
    assert stats.tokens_orig is None and stats.cross is None
    with pytest.raises(ValueError, match="cross statistics"):
        adacomp(w, [w[:2], torch.eye(2, 24, dtype=torch.float64)], stats, 1)


def test_token_mode_gives_the_sums_results_without_any_n_by_n_matrix(case):
    """While N ≤ n the two streams are kept as tokens: adaComp (with a down step) gives what the n×n sums give,
    the products with the moments and the damped solve are exact, and no n×n matrix is ever formed."""
    w, x_o, x_c, _, rank = case
    x_o, x_c = x_o[:20], x_c[:20]  # 20 tokens, 24 inputs
    kept = stats_of(x_c, x_o, w)
    summed = InputStats(x_c.shape[1], "cpu", cross=True, targets={"w": w}, keep_tokens=False)
    summed.add(x_c, x_o)
    assert kept.tokens is not None and summed.tokens is None
    d = torch.randn(24, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for transpose, cross in ((True, x_o.T @ x_c), (False, x_c.T @ x_o)):
        got = kept.moment_products(d, transpose_cross=transpose)
        torch.testing.assert_close(got[0], x_c.T @ (x_c @ d), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[1], cross @ d, rtol=1e-12, atol=1e-12)
    lam = 0.7
    want = d.T @ torch.linalg.inv(x_c.T @ x_c + lam * torch.eye(24, dtype=torch.float64))
    torch.testing.assert_close(kept.solve_damped(d.T, lam), want, rtol=1e-9, atol=1e-12)
    assert kept.trace == pytest.approx(float(x_c.square().sum()), rel=1e-12)
    results = {}
    for mode, stats in (("kept", kept), ("summed", summed)):
        up, down = whitened_init(w, stats, rank)
        values = []
        up, down = adacomp(w, [up, down], stats, 2, 0.5, energy=stats.target_energy["w"], objective_values=values)
        results[mode] = up @ down, values
    assert not {"gram", "cross"} & set(kept.__dict__)  # never formed from the tokens
    torch.testing.assert_close(results["kept"][0], results["summed"][0], rtol=1e-4, atol=1e-5)
    assert results["kept"][1] == pytest.approx(results["summed"][1], rel=1e-4)
    # ‖W X_o‖² is summed from float32 products on the CPU: 1e-6
    assert results["kept"][1][1] == pytest.approx(direct_loss(w, results["kept"][0], x_c, x_o), rel=1e-6)
    with pytest.raises(RuntimeError, match="after X Xᵀ was read"):  # the tokens read are final
        kept.add(x_c[:2], x_o[:2])


def test_adacomp_records_the_objective_before_and_after(case):
    w, x_o, x_c, stats, rank = case
    up, down = whitened_init(w, stats, rank)
    values = []
    up1, down1 = adacomp(w, [up, down], stats, 2, 0.5, energy=stats.target_energy["w"], objective_values=values)
    assert values[0] == pytest.approx(direct_loss(w, up @ down, x_c, x_o), rel=1e-6)
    assert values[1] == pytest.approx(direct_loss(w, up1 @ down1, x_c, x_o), rel=1e-6)
    unmoved = []
    adacomp(w, [up, down], stats, 0, energy=stats.target_energy["w"], objective_values=unmoved)  # no step taken
    assert unmoved == pytest.approx([values[0]] * 2, rel=1e-12)
    with pytest.raises(ValueError, match="energy"):
        adacomp(w, [up, down], stats, 1, objective_values=[])
    with pytest.raises(ValueError, match="‖W X_o‖²"):
        adacomp_loss(w, up, down, stats, "not a target")


def test_adacomp_reduces_the_loss_when_inputs_drifted(case):
    w, x_o, x_c, stats, rank = case
    up, down = whitened_init(w, stats, rank)
    before = direct_loss(w, up @ down, x_c, x_o)
    up1, down1 = adacomp(w, [up, down], stats, iterations=1)
    after = direct_loss(w, up1 @ down1, x_c, x_o)
    optimum = reduced_rank_optimum(w, x_c, x_o, rank)
    assert up1.shape == up.shape and down1.shape == down.shape
    assert after < 0.95 * before  # a real gain, not rounding
    assert after >= optimum * (1 - 1e-9)  # and never below what any rank-r matrix can do


def test_adacomp_never_increases_its_objective(case):
    w, x_o, x_c, stats, rank = case
    up, down = whitened_init(w, stats, rank)
    losses = [adacomp_loss(w, up, down, stats, "w")]
    for _ in range(10):
        up, down = adacomp(w, [up, down], stats, iterations=1)
        losses.append(adacomp_loss(w, up, down, stats, "w"))
    assert all(b <= a * (1 + 1e-9) for a, b in zip(losses, losses[1:]))
    assert losses[-1] >= reduced_rank_optimum(w, x_c, x_o, rank) * (1 - 1e-9)


def test_adacomp_is_a_no_op_on_undrifted_inputs(case):
    w, x_o, _, _, rank = case
    stats = stats_of(x_o, x_o, w)
    up, down = whitened_init(w, stats, rank)
    up1, down1 = adacomp(w, [up, down], stats, iterations=3)
    torch.testing.assert_close(up1 @ down1, up @ down, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("strength", [0.25, 0.5, 0.75])
def test_partial_strength_compensates_part_of_the_way(case, strength):
    """Target W(β X_o + (1 − β) X_c). Starting from the whitened truncation (the optimum for β = 0), the up
    step moves a fraction β of the way to the full least-squares update, so the paper's objective still
    falls, by less than at β = 1; β = 0 changes nothing."""
    w, x_o, x_c, stats, rank = case
    up, down = whitened_init(w, stats, rank)
    before = direct_loss(w, up @ down, x_c, x_o)
    up1, down1 = adacomp(w, [up, down], stats, 1)
    up_b, down_b = adacomp(w, [up, down], stats, 1, strength)
    full, partial = direct_loss(w, up1 @ down1, x_c, x_o), direct_loss(w, up_b @ down_b, x_c, x_o)
    assert full < partial < before
    up0, down0 = adacomp(w, [up, down], stats, 1, 0.0)
    torch.testing.assert_close(up0 @ down0, up @ down)
    with pytest.raises(ValueError, match="strength"):
        adacomp(w, [up, down], stats, 1, 1.5)


def test_rebalance_keeps_the_product_and_equalises_factor_norms():
    gen = torch.Generator().manual_seed(0)
    up = torch.randn(10, 4, generator=gen, dtype=torch.float64) * 100
    down = torch.randn(4, 12, generator=gen, dtype=torch.float64) / 100
    up1, down1 = rebalance(up, down)
    torch.testing.assert_close(up1 @ down1, up @ down)
    torch.testing.assert_close(up1.norm(dim=0), down1.norm(dim=1))


def test_adasvd_method_reports_loss_before_and_after(case):
    w, _, _, stats, rank = case
    method = get_method("adasvd", iterations=1)
    mi = MatrixInput("w", w, stats)
    up, down = method.factorize(mi, rank)
    extra = {}
    method.report("w", mi, up, down, extra)
    entry = extra["adacomp"]["w"]
    assert entry["iterations"] == 1 and entry["loss_after"] < entry["loss_before"]
    _, x_o, x_c, _, _ = case
    assert entry["loss_after"] == pytest.approx(direct_loss(w, up @ down, x_c, x_o), rel=1e-6)


# ---- adaCR ----

def assert_tight_budget(matrices, plan, ratio):
    """Kept parameters within the budget, and short of it by less than one rank of the largest matrix."""
    budget = (1 - ratio) * sum(m.dense_params for m in matrices)
    assert budget - max(m.params_per_rank for m in matrices) < plan_params(matrices, plan) <= budget


def layer_matrices(n_layers=6, shapes=((64, 64), (64, 64), (16, 64), (64, 64), (128, 64), (64, 128))):
    kinds = ("q_proj", "o_proj", "k_proj", "v_proj", "up_proj", "down_proj")
    return [Matrix(f"model.layers.{i}.{k}", k, i, o, n) for i in range(n_layers) for k, (o, n) in zip(kinds, shapes)]


SIMILARITIES = [0.2, 0.9, 0.95, 0.97, 0.93, 0.5]


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.55])
@pytest.mark.parametrize("importance", ["1-cos", "cos"])
def test_adacr_meets_the_budget_exactly(ratio, importance):
    matrices = layer_matrices()
    plan = allocate("adacr", matrices, Profile(layer_similarity=SIMILARITIES), ratio, min_retention=0.4,
                    importance=importance)
    assert_tight_budget(matrices, plan, ratio)
    for m in matrices:
        matrix_ratio = 1 - plan[m.name] * m.params_per_rank / m.dense_params if m.name in plan else 0.0
        assert 0.0 <= matrix_ratio < 1.0


def test_adacr_keeps_more_of_the_layers_that_change_their_input():
    matrices = layer_matrices()
    plan = adacr(matrices, Profile(layer_similarity=SIMILARITIES), 0.4, min_retention=0.4)
    k_rank = [plan[f"model.layers.{i}.k_proj"] for i in range(6)]
    assert k_rank[0] == max(k_rank) and k_rank[3] == min(k_rank)  # lowest cos kept most, highest cos least
    flipped = adacr(matrices, Profile(layer_similarity=SIMILARITIES), 0.4, min_retention=0.4, importance="cos")
    assert flipped["model.layers.0.k_proj"] < plan["model.layers.0.k_proj"]


def test_adacr_clamps_and_still_meets_the_budget():
    matrices = layer_matrices()
    sims = [-0.5, 0.99, 0.99, 0.99, 0.99, 0.99]  # layer 0's formula retention is far above 1
    ratio = 0.3
    plan = adacr(matrices, Profile(layer_similarity=sims), ratio, min_retention=0.2)
    layer0 = [m for m in matrices if m.layer == 0]
    # capped at retention 1, less the rounding of small ranks
    assert plan_params(layer0, plan) >= 0.98 * sum(m.dense_params for m in layer0)
    assert_tight_budget(matrices, plan, ratio)


def test_adacr_handles_layers_of_different_sizes():
    matrices = [m for m in layer_matrices() if not (m.layer == 2 and m.kind in ("up_proj", "down_proj"))]
    ratio = 0.4
    plan = adacr(matrices, Profile(layer_similarity=SIMILARITIES), ratio, min_retention=0.3)
    assert_tight_budget(matrices, plan, ratio)


def test_adacr_rejects_a_minimum_retention_above_the_target():
    with pytest.raises(ValueError, match="min-retention"):
        adacr(layer_matrices(), Profile(layer_similarity=SIMILARITIES), 0.7, min_retention=0.4)


@pytest.mark.parametrize("ratio", [0.6, 0.8])
def test_adacr_default_minimum_retention_stays_adaptive_at_high_ratios(ratio):
    """A fixed mrr 0.4 would make adaCR uniform at 60% and an error above it; the default follows the ratio."""
    assert default_min_retention(0.2) == 0.4 and default_min_retention(0.6) == pytest.approx(0.3)
    matrices = layer_matrices()
    plan = adacr(matrices, Profile(layer_similarity=SIMILARITIES), ratio)
    assert_tight_budget(matrices, plan, ratio)
    k_rank = [plan[f"model.layers.{i}.k_proj"] for i in range(6)]
    assert k_rank[0] > k_rank[3]


def test_adacr_profile_pass_forms_no_input_moments(monkeypatch):
    """adaCR reads layer similarities only: its profile pass counts tokens and forms no X Xᵀ (no n×n sum per
    input), and gives the same similarities as a pass that does."""
    from exporter.factorize import stats as stats_module
    from exporter.loop.profile import measure_profile
    model, batches = tiny_model("llama"), random_batches()
    with_moments = measure_profile(model, batches, ["v2"], progress=False)  # spectra: X Xᵀ needed

    def forbidden(*_, **__):
        raise AssertionError("an X Xᵀ was accumulated")
    monkeypatch.setattr(stats_module, "accumulate_product", forbidden)
    profile = measure_profile(model, batches, ["adacr"], progress=False)
    assert profile.layer_similarity == pytest.approx(with_moments.layer_similarity, rel=1e-6)
    assert not profile.spectra and not profile.uncalibrated
    with pytest.raises(AssertionError, match="X Xᵀ"):
        measure_profile(model, batches, ["v2"], progress=False)


def test_shift_to_budget_hits_the_weighted_target():
    values = shift_to_budget([0.1, 0.5, 1.4], [1.0, 2.0, 3.0], 0.6, 0.3, 1.0)
    assert all(0.3 <= v <= 1.0 for v in values)
    assert (values[0] * 1 + values[1] * 2 + values[2] * 3) / 6 == pytest.approx(0.6, abs=1e-12)


# ---- end to end ----

def test_adasvd_end_to_end_every_architecture(arch):
    model, batches = tiny_model(arch), random_batches()
    result = compress_(model, batches, CompressionConfig(method="adasvd", ratio=0.4), progress=False)
    assert result.allocation == "adacr" and set(result.plan) == set(result.records)
    assert result.extra["adacr"]["min_retention"] == default_min_retention(0.4)  # the value used is reported
    entries = result.extra["adacomp"]
    assert set(entries) == set(result.plan)
    for entry in entries.values():
        assert entry["loss_after"] <= entry["loss_before"] * (1 + 1e-6)
    assert sum(e["loss_after"] for e in entries.values()) < sum(e["loss_before"] for e in entries.values())
    assert len(result.layer_ratios()) == 2 and all(0 <= r < 1 for r in result.layer_ratios())


@pytest.mark.parametrize("allocation", [a for a in ALLOCATIONS if a in ("uniform", "v2", "adacr")])
@pytest.mark.parametrize("method", ["svd", "asvd", "fwsvd", "svd-llm", "svd-llm-v2", "adasvd"])
def test_every_method_runs_with_every_allocation(method, allocation):
    model = tiny_model("llama")
    if allocation == "v2":  # V2's 1/log(L) needs L > 1: scale the random weights up (see test_pipeline)
        with torch.no_grad():
            for p in model.model.layers.parameters():
                if p.dim() == 2:
                    p.mul_(10)
    result = compress_(model, random_batches(), CompressionConfig(method=method, ratio=0.4, allocation=allocation),
                       progress=False)
    assert result.allocation == allocation and result.plan
    dense, after = result.linear_params()
    assert after <= 0.6 * dense


def test_adasvd_needs_the_compressed_stream():
    with pytest.raises(ValueError, match="compressed"):
        compress_(tiny_model("llama"), random_batches(),
                  CompressionConfig(method="adasvd", ratio=0.4, allocation="uniform", propagate="original"),
                  progress=False)


def test_summary_shows_the_adacomp_gain():
    from exporter.report.summary import summary
    report = {"model": "m", "method": "adasvd", "allocation": "adacr", "propagate": "compressed",
              "ratio": {"requested": 0.4, "realized_linears": 0.4, "realized_model": 0.3},
              "params": {"dense_total": 10, "compressed_total": 7}, "dense_linears": 0, "timings_s": {},
              "peak_memory": {"host_rss_mb": 1.0},
              "layers": {"a": {"loss": 2.0, "loss_min": 1.0}},
              "method_details": {"adacomp": {"a": {"loss_before": 4.0, "loss_after": 3.0},
                                             "b": {"loss_before": 2.0, "loss_after": 1.0}}}}
    assert "after / before: median 0.7500, max 0.7500" in summary(report)


# ---- adaComp past one iteration: the damped exact down step ----

def test_more_iterations_lower_the_objective_towards_the_optimum(case):
    """iterations k = up, then (down, up) k − 1 times: every further iteration lowers f (the option is not a
    no-op past 1), and f never goes below what any rank-r matrix can do."""
    w, x_o, x_c, stats, rank = case
    up, down = whitened_init(w, stats, rank)
    losses = []
    for k in (1, 2, 4):
        taken = []
        u, d = adacomp(w, [up, down], stats, iterations=k, taken=taken)
        assert taken.count("up") == k and taken.count("down") == k - 1
        losses.append(direct_loss(w, u @ d, x_c, x_o))
    assert losses[1] < losses[0] * (1 - 1e-3) and losses[2] < losses[1]
    assert losses[2] >= reduced_rank_optimum(w, x_c, x_o, rank) * (1 - 1e-9)


def test_down_step_is_the_damped_least_squares_solution(case):
    """Against the gradient of the damped objective, solved as one (n·r)-sized linear system."""
    from exporter.factorize.adasvd import down_step
    w, x_o, x_c, stats, rank = case
    up, down = whitened_init(w, stats, rank)
    damping = 0.3
    got = down_step(w, up, down, stats, 1.0, damping)
    gram, n = stats.gram, x_c.shape[1]
    lam = damping * float(torch.trace(gram)) / n
    # ∇_D [‖up D X_c − W X_o‖² + λ‖up (D − down)‖²] = 2 upᵀ (up D (C + λI) − W Crossᵀ − λ up down) = 0,
    # vectorised column by column: (C + λI) ⊗ upᵀup · vec(D) = vec(upᵀ W Crossᵀ + λ upᵀ up down)
    a = torch.kron(gram + lam * torch.eye(n, dtype=torch.float64), up.T @ up)
    b = (up.T @ w @ stats.cross.T + lam * up.T @ up @ down).T.reshape(-1)
    want = torch.linalg.solve(a, b).reshape(x_c.shape[1], rank).T
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    before = adacomp_loss(w, up, down, stats, "w")
    assert adacomp_loss(w, up, got, stats, "w") <= before


def test_adacomp_damping_must_be_positive():
    with pytest.raises(ValueError, match="damping"):
        get_method("adasvd", damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        CompressionConfig(method="adasvd", adacomp_damping=-1.0)
