"""The defining property of each truncation, on synthetic matrices with explicit X.

V2 (eigendecomposition + two SVDs) reaches the theoretical minimum ‖WX − W'X‖_F = √Σ_{i>r} σ_i(WX)²,
also when X Xᵀ is singular — where v1's Cholesky fails, needs a jitter, and ends above the minimum."""
import pytest
import torch

from exporter.factorize.base import MatrixInput, get_method
from exporter.factorize.linalg import min_truncation_loss, truncation_loss, whiten
from exporter.factorize.stats import InputStats
from exporter.factorize.svd_llm import cholesky_with_jitter

IN, OUT, N = 48, 32, 400


def activations(kind: str, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "full":  # full rank, badly conditioned channels like LLM activations
        x = torch.randn(IN, N, generator=g, dtype=torch.float64)
        x *= torch.logspace(0, 2, IN, dtype=torch.float64)[:, None]
    elif kind == "singular":  # rank 20 < 48: X Xᵀ is singular, Cholesky must fail
        x = torch.randn(IN, 20, generator=g, dtype=torch.float64) @ torch.randn(20, N, generator=g, dtype=torch.float64)
    elif kind == "dead-channels":  # some input channels never fire (exact zeros in X Xᵀ)
        x = torch.randn(IN, N, generator=g, dtype=torch.float64)
        x[::5] = 0
    else:
        raise ValueError(kind)
    return x * scale


def stats_of(x: torch.Tensor, tokens: bool = False) -> InputStats:
    if tokens:  # X itself kept (fewer tokens than features)
        s = InputStats(x.shape[0], "cpu")
        s.add(x.T)
        assert s.tokens is not None
        return s
    # Summed directly in float64 (add() would take float32 per-batch products on the CPU).
    return InputStats.from_gram(x @ x.T, x.shape[1])


def weight(seed=1) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def achieved(method: str, w, x, rank: int) -> float:
    up, down = get_method(method).factorize(MatrixInput("w", w, stats_of(x)), rank)
    assert up.shape == (OUT, rank) and down.shape == (rank, IN)
    return float(torch.linalg.norm(w @ x - up @ down @ x))


def theoretical_min(w, x, rank: int) -> float:
    return float(torch.linalg.svdvals(w @ x)[rank:].square().sum().sqrt())


@pytest.mark.parametrize("kind", ["full", "singular", "dead-channels"])
@pytest.mark.parametrize("rank", [1, 8, 19])
def test_v2_loss_equals_theoretical_minimum(kind, rank):
    w, x = weight(), activations(kind)
    assert achieved("svd-llm-v2", w, x, rank) == pytest.approx(theoretical_min(w, x, rank), rel=1e-6)


@pytest.mark.parametrize("kind", ["full", "singular"])
def test_whitened_spectrum_is_the_spectrum_of_wx(kind):
    """The spectrum used for loss_min and allocation is σ(WX), computed from X Xᵀ alone."""
    w, x = weight(), activations(kind)
    mi = MatrixInput("w", w, stats_of(x))
    ref = torch.linalg.svdvals(w @ x)
    k = min(OUT, 20)
    assert torch.allclose(mi.spectrum[:k], ref[:k], rtol=1e-8)
    assert min_truncation_loss(mi.spectrum, 8) == pytest.approx(theoretical_min(w, x, 8), rel=1e-8)


def test_loss_from_gram_matches_loss_from_x():
    w, x = weight(), activations("full")
    approx = w + 0.01 * weight(seed=7)
    assert truncation_loss(w, approx, torch.eye(IN, dtype=torch.float64), x @ x.T) == pytest.approx(float(torch.linalg.norm((w - approx) @ x)), rel=1e-10)


def test_v1_cholesky_fails_on_singular_gram_and_ends_above_minimum():
    # Small activations (as in some LLM layers): v1's absolute jitter (−λ_min + 1e-6) is then not negligible.
    w, x = weight(), activations("singular", scale=1e-3)
    gram = x @ x.T
    assert int(torch.linalg.cholesky_ex(gram).info) != 0, "X Xᵀ should not be positive definite"
    _, jitter = cholesky_with_jitter(gram)
    assert jitter > 0
    for rank in (10, 16):  # the gap grows with the rank (more of the jittered spectrum is kept)
        best = theoretical_min(w, x, rank)
        v1, v2 = achieved("svd-llm", w, x, rank), achieved("svd-llm-v2", w, x, rank)
        assert v1 > best * (1 + 1e-9), "v1 with jitter should land above the theoretical minimum"
        assert v2 == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_v2_never_worse_than_v1_or_plain_svd(seed):
    w, x = weight(seed), activations("full", seed)
    for rank in (2, 8, 16):
        v2 = achieved("svd-llm-v2", w, x, rank)
        assert v2 <= achieved("svd-llm", w, x, rank) * (1 + 1e-9)
        assert v2 < achieved("svd", w, x, rank)


def test_whiten_rejects_zero_statistics():
    with pytest.raises(ValueError, match="never reached"):
        whiten(torch.zeros(4, 4, dtype=torch.float64))


def test_input_stats_accumulate_in_float64_and_reject_nan():
    s = InputStats(3, "cpu", abs_mean=True)
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
    s.add(x)
    s.add(x)
    assert s.gram.dtype == torch.float64
    assert torch.allclose(s.gram, 2 * (x.T @ x).double())
    assert torch.allclose(s.abs_mean, x.abs().mean(0).double())
    with pytest.raises(FloatingPointError):
        InputStats(3, "cpu").add(torch.tensor([[float("nan"), 0.0, 0.0]]))
    with pytest.raises(RuntimeError, match="after X Xᵀ was read"):  # the statistics read are final
        s.add(x)


def test_reported_loss_on_a_float32_accumulated_singular_gram():
    """Fewer calibration tokens than inputs, products summed from float32 batches (the CPU path): the raw
    gram has rounding-noise negative eigenvalues. The reported loss must still match the minimum
    (a tr(E C Eᵀ) on the raw sum came out negative and was clamped to 0 on SmolLM2)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(IN, 30, generator=g) * torch.logspace(0, 3, IN)[:, None]  # 30 tokens < 48 inputs
    stats = InputStats(IN, "cpu")
    stats.add(x.T)
    w = weight()
    mi = MatrixInput("w", w, stats)
    rank = 29  # just below rank(X) = 30: the true loss is small next to W's never-excited components
    up, down = get_method("svd-llm-v2").factorize(mi, rank)
    loss, best = mi.loss(up, down), mi.min_loss(rank)
    assert best > 0 and loss == pytest.approx(best, rel=1e-9)  # a clamped minimum was off by 2e-5 here
    # and both describe the data: ‖WX − W'X‖ in float64 on the float32 activations the statistics came from
    truth = float(torch.linalg.norm(w @ x.double() - up @ down @ x.double()))
    assert loss == pytest.approx(truth, rel=1e-4)


@pytest.mark.parametrize("rank", [1, 8, 25, 29])
def test_kept_tokens_and_gram_give_the_same_minimal_truncation(rank):
    """Fewer tokens than inputs (30 < 48): the tokens themselves are kept and WX is formed directly; the
    result must be the Gram path's, at the theoretical minimum."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(IN, 30, generator=g, dtype=torch.float64) * torch.logspace(0, 1, IN, dtype=torch.float64)[:, None]
    w = weight()
    kept, summed = MatrixInput("w", w, stats_of(x, tokens=True)), MatrixInput("w", w, stats_of(x))
    assert kept.stats.tokens is not None and summed.stats.tokens is None
    best = theoretical_min(w, x, rank)
    for mi in (kept, summed):
        up, down = get_method("svd-llm-v2").factorize(mi, rank)
        assert mi.loss(up, down) == pytest.approx(best, rel=1e-7, abs=1e-9)
        assert mi.min_loss(rank) == pytest.approx(best, rel=1e-7, abs=1e-9)
    torch.testing.assert_close(kept.spectrum[:30], summed.spectrum[:30], rtol=1e-7, atol=1e-8)
    assert kept.spectrum[30:].abs().max() == 0 and summed.spectrum[30:].abs().max() < 1e-5  # √(rounding noise)


def test_past_the_rank_of_x_the_kept_directions_stay_closest_to_w():
    """Rank 40 > 30 tokens: the calibration loss is 0 whatever the last 10 directions are; they are the ones
    that keep most of W (never further from W than the Gram path's arbitrary null-space vectors)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(IN, 30, generator=g, dtype=torch.float64)
    w = weight()
    mi = MatrixInput("w", w, stats_of(x, tokens=True))
    up, down = get_method("svd-llm-v2").factorize(mi, 31)
    assert torch.allclose(up.T @ up, torch.eye(31, dtype=torch.float64), atol=1e-10)
    assert mi.loss(up, down) == pytest.approx(0.0, abs=1e-8)
    gram_up, gram_down = get_method("svd-llm-v2").factorize(MatrixInput("w", w, stats_of(x)), 31)
    assert torch.linalg.norm(w - up @ down) <= torch.linalg.norm(w - gram_up @ gram_down) + 1e-12


@pytest.mark.parametrize("path", ["tokens", "output-gram", "root"])
def test_float32_profile_spectrum_keeps_the_tail_sums(path):
    """The allocation's profile pass computes σ(WX) in float32 (compress.PROFILE_DTYPE). What an allocation
    reads from it, the tail sums L_r = √Σ_{i>r} σ_i², stays within 1e-4 of float64 wherever the tail holds
    at least 1e-3 of ‖WX‖², and within 1e-3 down to 1e-6 of it (an eigenvalue's float32 error is ~1e-7 of the
    largest one), on each of the three ways the spectrum is computed. V2 reads 1/log L: a 1e-3 change in L moves
    it by less than 1e-3/log L."""
    x = activations("full")
    w = weight() if path != "root" else torch.randn(IN + 16, IN, generator=torch.Generator().manual_seed(2),
                                                       dtype=torch.float64)  # m > n: D = W S
    stats = stats_of(x[:, :40], tokens=True) if path == "tokens" else stats_of(torch.cat([x, x], dim=1))
    exact = MatrixInput("w", w, stats).spectrum
    single = MatrixInput("w", w.to(torch.float32), stats).spectrum
    assert single.dtype == torch.float32 and single.shape == exact.shape
    energy = float(exact.square().sum())
    checked = 0
    for r in range(len(exact)):
        tail = min_truncation_loss(exact, r)
        if tail ** 2 >= 1e-3 * energy:
            assert min_truncation_loss(single, r) == pytest.approx(tail, rel=1e-4), r
            checked += 1
        elif tail ** 2 >= 1e-6 * energy:
            assert min_truncation_loss(single, r) == pytest.approx(tail, rel=1e-3), r
    assert checked >= 20
