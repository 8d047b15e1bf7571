"""--rank-multiple: every rank a multiple of N, the parameter budget met, nothing left that could still be
rounded up within it, and matrices where no multiple of N saves parameters kept dense."""
import pytest

from exporter.model.candidates import Matrix
from exporter.plan import allocate
from exporter.plan.ranks import plan_params, saves_params
from exporter.plan.rounding import round_ranks

# SmolLM2-135M's linears: q/o 576², k/v 192×576, gate/up 1536×576, down 576×1536, 30 layers.
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "v_proj": (192, 576), "o_proj": (576, 576),
          "gate_proj": (1536, 576), "up_proj": (1536, 576), "down_proj": (576, 1536)}
MATRICES = [Matrix(f"model.layers.{i}.{kind}", kind, i, *shape) for i in range(30) for kind, shape in SHAPES.items()]


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
@pytest.mark.parametrize("multiple", [8, 16, 32, 64])
def test_ranks_are_multiples_and_the_budget_is_met(ratio, multiple):
    plan = allocate("uniform", MATRICES, None, ratio)
    budget = (1 - ratio) * sum(m.dense_params for m in MATRICES)
    rounded = round_ranks(MATRICES, plan, multiple)
    assert rounded and all(r % multiple == 0 and r >= multiple for r in rounded.values())
    assert plan_params(MATRICES, rounded) <= plan_params(MATRICES, plan) <= budget
    by_name = {m.name: m for m in MATRICES}
    assert all(saves_params(by_name[n], r) for n, r in rounded.items())
    spare = plan_params(MATRICES, plan) - plan_params(MATRICES, rounded)
    for name, rank in rounded.items():  # greedy's end state: no rounded-down rank could still go up
        m = by_name[name]
        if rank < plan[name] and saves_params(m, rank + multiple):
            assert multiple * m.params_per_rank > spare, name


def test_multiple_one_is_the_plan_itself():
    plan = allocate("uniform", MATRICES, None, 0.4)
    assert round_ranks(MATRICES, plan, 1) == plan


def test_small_ranks_go_up_to_n_or_stay_dense_and_others_pay():
    small = Matrix("tiny", "tiny", 0, 40, 40)  # break-even rank 20: rank 32 would not save anything
    mid = Matrix("mid", "mid", 0, 100, 100)  # rank 10 → 16 costs 6·200 more
    big = Matrix("big", "big", 0, 1000, 1000)
    matrices = [small, mid, big]
    plan = {"tiny": 10, "mid": 10, "big": 300}
    rounded = round_ranks(matrices, plan, 32)
    assert "tiny" not in rounded  # dense: 1600 parameters instead of 800
    assert rounded["mid"] == 32 and rounded["big"] % 32 == 0 and rounded["big"] < 300
    assert plan_params(matrices, rounded) <= plan_params(matrices, plan)


def test_explicit_budget_and_errors():
    m = Matrix("a", "a", 0, 64, 64)
    assert round_ranks([m], {"a": 20}, 16, budget_params=16 * 128) == {"a": 16}
    with pytest.raises(ValueError, match="no plan of multiples of 16 meets the budget"):
        round_ranks([m], {"a": 20}, 16, budget_params=10 * 128)
    with pytest.raises(ValueError, match="not a candidate matrix"):
        round_ranks([m], {"b": 8}, 8)
    with pytest.raises(ValueError, match="must be >= 1"):
        round_ranks([m], {"a": 8}, 0)
