"""AdaSVD on the real SmolLM2-135M (slow): at 60% compression it must beat SVD-LLM, as in the paper."""
import copy

import pytest

from exporter import CompressionConfig, compress_
from exporter.calibration.data import calibration_batches, evaluation_tokens
from exporter.validate.perplexity import perplexity, torch_logits


@pytest.mark.slow
def test_adasvd_beats_svd_llm_at_ratio_0_6(smollm2, wikitext):
    dense, tokenizer = smollm2
    # 16 x 256 = 4096 calibration tokens: more than the widest input (1536), so X Xᵀ is full rank
    batches = calibration_batches(dense, tokenizer, str(wikitext / "wiki.valid.tokens"), 16, 256, seed=0, batch_size=4)
    eval_ids = evaluation_tokens(dense, tokenizer, str(wikitext / "wiki.test.raw"), 4096, 1024)
    ppl, details = {}, {}
    # each method with its defaults: svd-llm uniform; adasvd adaCR (mrr 0.3 at 60%, as the paper) + adaComp
    for method in ("svd-llm", "adasvd"):
        model = copy.deepcopy(dense)
        result = compress_(model, batches, CompressionConfig(method=method, ratio=0.6), progress=False)
        ppl[method] = perplexity(torch_logits(model), eval_ids, 1024, progress=False)
        details[method] = result
        del model
    adacomp = details["adasvd"].extra["adacomp"]
    assert sum(e["loss_after"] for e in adacomp.values()) < sum(e["loss_before"] for e in adacomp.values())
    ratios = details["adasvd"].layer_ratios()
    assert len(set(round(r, 3) for r in ratios)) > 1 and all(0 <= r < 1 for r in ratios)
    print(f"SmolLM2 ratio 0.6 perplexity: {ppl}")
    assert ppl["adasvd"] < ppl["svd-llm"], ppl
