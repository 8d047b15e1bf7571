"""--budget: size parsing, the budget → ratio conversion, and compressed models that fit their budget."""
from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner
from conftest import random_batches, tiny_model

from exporter.cli import main
from exporter.config import CompressionConfig
from exporter.loop.compress import compress_
from exporter.model.candidates import list_matrices
from exporter.model.discovery import architecture_of
from exporter.plan.budget import parse_size, ratio_for_budget, weight_bytes


@pytest.mark.parametrize("text, size", [("7GB", 7 * 10**9), ("7GiB", 7 * 2**30), ("500MB", 500 * 10**6),
                                        ("1.5 gb", 1_500_000_000), ("123456", 123456), ("64kib", 65536)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "7 GBs", "-1GB", "0MB", "seven"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="--budget"):
        parse_size(text)


def fixed_bytes(model, matrices):
    return weight_bytes(model) - sum(m.dense_params for m in matrices) * 4


@pytest.mark.parametrize("allocation", ["uniform", "global-relative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_weights_fit_the_budget(allocation, dtype):
    model = copy.deepcopy(tiny_model("llama")).to(dtype)
    matrices = list_matrices(model, architecture_of(model))
    budget = int(0.6 * weight_bytes(model))
    config = CompressionConfig(method="svd-llm-v2", allocation=allocation, budget_bytes=budget)
    result = compress_(model, random_batches(), config, device="cpu", progress=False)
    after = weight_bytes(model)
    assert after <= budget
    assert 0 < result.ratio < 1
    if allocation == "global-relative":  # the greedy leaves less than one rank step of the widest matrix
        element = torch.tensor([], dtype=dtype).element_size()
        assert budget - after < max(m.params_per_rank for m in matrices) * element


def test_budget_below_the_dense_parts_fails_clearly():
    model = tiny_model("llama")
    matrices = list_matrices(model, architecture_of(model))
    with pytest.raises(ValueError, match="embeddings, lm_head"):
        ratio_for_budget(model, matrices, fixed_bytes(model, matrices))
    assert ratio_for_budget(model, matrices, fixed_bytes(model, matrices) + 4 * 100) > 0.99


def test_budget_the_dense_model_already_meets_is_refused():
    model = tiny_model("llama")
    matrices = list_matrices(model, architecture_of(model))
    for budget in (weight_bytes(model), weight_bytes(model) + 10**6):  # compressing would be a silent loss
        with pytest.raises(ValueError, match="already fit, there is nothing to compress"):
            ratio_for_budget(model, matrices, budget)


def test_cli_ratio_and_budget_are_exclusive():
    result = CliRunner().invoke(main, ["--ratio", "0.3", "--budget", "1MB", "--out", "/nonexistent/x"])
    assert result.exit_code == 1
    assert "either --ratio or --budget" in result.output


def test_cli_rejects_a_bad_budget():
    result = CliRunner().invoke(main, ["--budget", "lots", "--out", "/nonexistent/x"])
    assert result.exit_code == 1
    assert "--budget 'lots'" in result.output
