"""The ASVD and FWSVD baselines: their math on synthetic weights, and end to end on tiny random models."""
import copy

import pytest
import torch
from conftest import random_batches, tiny_model

from exporter import CompressionConfig, compress_
from exporter.factorize.asvd import column_scaled_svd
from exporter.factorize.base import MatrixInput, get_method
from exporter.factorize.fwsvd import fisher_columns
from exporter.factorize.linalg import truncation_loss
from exporter.factorize.stats import InputStats
from exporter.model.candidates import list_matrices
from exporter.model.discovery import architecture_of
from exporter.model.lowrank import LowRankLinear


def outlier_inputs(n_in=32, tokens=500, seed=0):
    """Activations where a few channels are 30x larger than the rest (what ASVD is built for)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=gen)
    x[:, :3] *= 30
    stats = InputStats(n_in, "cpu", abs_mean=True)
    stats.add(x)
    return stats


def weight(out=24, n_in=32, seed=1):
    return torch.randn(out, n_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_unit_scale_is_plain_svd():
    w = weight()
    up, down = column_scaled_svd(w, torch.ones(w.shape[1]), 8)
    ref_up, ref_down = get_method("svd").factorize(MatrixInput("w", w, outlier_inputs()), 8)
    torch.testing.assert_close(up @ down, ref_up @ ref_down)


def test_asvd_with_alpha_zero_is_plain_svd():
    w, stats = weight(), outlier_inputs()
    up, down = get_method("asvd", alpha=0.0).factorize(MatrixInput("w", w, stats), 8)
    ref_up, ref_down = get_method("svd").factorize(MatrixInput("w", w, stats), 8)
    torch.testing.assert_close(up @ down, ref_up @ ref_down)


def test_asvd_beats_plain_svd_on_outlier_activations():
    w, stats = weight(), outlier_inputs()
    losses = {}
    for name in ("svd", "asvd"):
        up, down = get_method(name, alpha=0.5).factorize(MatrixInput("w", w, stats), 8)
        losses[name] = truncation_loss(w, up, down, stats.gram)
    assert losses["asvd"] < 0.9 * losses["svd"]


def test_a_channel_with_zero_scale_maps_to_zero_not_inf():
    w, scale = weight(), torch.rand(32, dtype=torch.float64) + 0.5
    scale[5] = 0.0
    up, down = column_scaled_svd(w, scale, 8)
    assert torch.isfinite(down).all() and torch.count_nonzero(down[:, 5]) == 0


@pytest.mark.parametrize("method", ["asvd", "fwsvd"])
def test_baselines_run_on_every_architecture(arch, method):
    model, batches = tiny_model(arch), random_batches()
    with torch.no_grad():
        dense = model(input_ids=batches[0]).logits
    result = compress_(model, batches, CompressionConfig(method=method, ratio=0.4), progress=False)
    assert result.allocation == "uniform" and result.plan and set(result.plan) == set(result.records)
    for name, rank in result.plan.items():
        assert isinstance(model.get_submodule(name), LowRankLinear) and model.get_submodule(name).rank == rank
    with torch.no_grad():
        out = model(input_ids=batches[0]).logits
    assert torch.isfinite(out).all() and not torch.allclose(out, dense)
    for rec in result.records.values():  # data-aware, but not optimal for ‖(W − W')X‖: never below the minimum
        assert rec.loss >= rec.loss_min * (1 - 1e-6)


def test_fisher_matches_autograd_and_leaves_the_model_clean(arch):
    model, batches = tiny_model(arch), random_batches(n=4, batch_size=2)
    names = [m.name for m in list_matrices(model, architecture_of(model))]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = fisher_columns(model, batches, names, "cpu")
    assert set(fisher) == set(names)
    assert all(f.shape == (model.get_submodule(n).in_features,) and (f > 0).all() for n, f in fisher.items())
    assert all(p.grad is None for p in model.parameters())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}

    reference = copy.deepcopy(model)  # plain autograd, full gradients, one batch at a time
    target = names[-1]
    expected = torch.zeros_like(fisher[target])
    for ids in batches:
        reference.zero_grad()
        # the summed next-token loss: HF's mean times the number of predicted tokens
        (reference(input_ids=ids, labels=ids).loss * ids[:, 1:].numel()).backward()
        expected += reference.get_submodule(target).weight.grad.to(torch.float64).square().mean(0)
    torch.testing.assert_close(fisher[target], expected, rtol=1e-5, atol=0)
