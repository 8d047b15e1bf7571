"""report.json and the one-screen summary."""
from __future__ import annotations

import json
from pathlib import Path


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def ratio_block(requested: float, linears_dense: int, linears_after: int, model_dense: int, model_after: int) -> dict:
    if linears_dense <= 0 or model_dense <= 0:
        raise ValueError("cannot compute a compression ratio: the model has no compressible parameters")
    return {
        "requested": requested,
        "realized_linears": 1.0 - linears_after / linears_dense,
        "realized_model": 1.0 - model_after / model_dense,
    }


def write_json(report: dict, folder: Path) -> Path:
    path = Path(folder) / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False))
    return path


def summary(report: dict) -> str:
    r, p = report["ratio"], report["params"]
    lines = [
        f"model        {report['model']}",
        f"recipe       {report.get('recipe', report['method'])} (propagate {report['propagate']})",
        f"ratio        requested {r['requested']:.3f} · realised {r['realized_linears']:.3f} of the compressed linears, "
        f"{r['realized_model']:.3f} of the whole model",
        f"params       {p['dense_total']:,} -> {p['compressed_total']:,}",
        *([f"budget       {report['budget']['bytes']:,} bytes -> weights {report['budget']['weight_bytes']:,} bytes"]
          if "budget" in report else []),
        f"modules      {len(report['layers'])} low-rank, {report['dense_linears']} linears left dense",
    ]
    ppl = report.get("perplexity") or {}
    if "dense" in ppl:
        lines.append(f"perplexity   dense {ppl['dense']:.3f} -> compressed {ppl['compressed']:.3f}"
                     f"  ({ppl.get('tokens', '?')} tokens, window {ppl.get('window', '?')})"
                     + ("  IN-SAMPLE: evaluated on the calibration text" if ppl.get("in_sample") else ""))
    loss = [v["loss"] / v["loss_min"] for v in report["layers"].values() if v["loss_min"] > 0]
    if loss:
        lines.append(f"trunc. loss  achieved / theoretical minimum: median {sorted(loss)[len(loss) // 2]:.4f}, "
                     f"max {max(loss):.4f}")
    adacomp = (report.get("method_details") or {}).get("adacomp") or {}
    gain = sorted(v["loss_after"] / v["loss_before"] for v in adacomp.values() if v["loss_before"] > 0)
    if gain:
        lines.append(f"adaComp      ‖W'X_c − WX_o‖ after / before: median {gain[len(gain) // 2]:.4f}, "
                     f"max {gain[-1]:.4f}")
    refine = (report.get("method_details") or {}).get("refine") or {}
    gain = sorted(v["loss_after"] / v["loss_before"] for v in refine.values() if v.get("loss_before"))
    if gain:
        per_layer = sum(v["seconds"] for v in refine.values()) / len(refine)
        lines.append(f"refine       layer output error after / before: median {gain[len(gain) // 2]:.4f}; "
                     f"{sum(v['kept'] for v in refine.values())}/{len(refine)} layers improved, {per_layer:.1f}s/layer")
    e2e = (report.get("method_details") or {}).get("refine_e2e")
    if e2e and e2e.get("loss_before") is not None:
        lines.append(f"refine e2e   KL to the dense model per token: {e2e['loss_before']:.4f} -> {e2e['loss_after']:.4f} "
                     f"(held out {e2e['holdout_before']:.4f} -> {e2e['holdout_after']:.4f}), "
                     f"{'kept' if e2e['kept'] else 'not better: closed form kept'}, {e2e['steps_run']} steps, "
                     f"{e2e['seconds']:.0f}s" + (f", on {e2e['sequences']} x {e2e['seqlen']} tokens"
                                                 if "sequences" in e2e else ""))
    lines += quantize_lines(report.get("method_details") or {})
    onnx = report.get("onnx")
    if onnx:
        lines.append(f"onnx         {onnx['file']}: {onnx['graph']} graph, {onnx['dtype']}, "
                     f"{onnx['rewritten_linears']} low-rank pairs"
                     + (f", {onnx['quantize']['bits']}-bit weights" if onnx.get("quantize") else "")
                     + (f", {onnx['corrections']} float corrections" if onnx.get("corrections") else ""))
        for kind, check in (onnx.get("parity") or {}).items():
            lines.append(f"onnx parity  {kind}: {'passed' if check['passed'] else 'FAILED'} (max |logit diff| "
                         f"{check['max_abs_diff']:.3g}, greedy {check['greedy']['new_tokens']} tokens "
                         f"{'equal' if check['greedy']['equal'] else 'differ'})")
        for kind, why in (onnx.get("not_checked") or {}).items():
            lines.append(f"onnx parity  {kind}: {why}")
        if onnx.get("dense_reused"):
            lines.append(f"onnx dense   {onnx['dense_reused']}")
    lines.append("timings      " + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items()))
    per_layer = {k: sum(v) / len(v) for k, v in (report.get("layer_seconds") or {}).items() if v}
    if per_layer:  # where a layer's time goes: the passes, and inside the compression pass its stages
        lines.append("per layer    " + ", ".join(f"{k} {v:.1f}s" for k, v in per_layer.items()))
    lines.append(f"peak memory  {report['peak_memory']['host_rss_mb']:.0f} MB host"
                 + (f", {report['peak_memory']['gpu_mb']:.0f} MB GPU" if report['peak_memory'].get('gpu_mb') else ""))
    return "\n".join(lines)


def quantize_lines(details: dict) -> list[str]:
    """--quantizer gptq: ‖(W − Q)X‖² of GPTQ against round-to-nearest on the same grid, per weight."""
    weights = [r for record in (details.get("quantize") or {}).values()
               for r in ([record] if "gptq" in record else record.values())]
    gain = sorted(r["gptq"] / r["nearest"] for r in weights if r["nearest"] > 0)  # guard: 0 when X never moved it
    if not gain:
        return []
    head = details.get("quantize_head") or {}
    lines = [f"quantize     GPTQ ‖(W − Q)X‖² / round-to-nearest: median {gain[len(gain) // 2]:.4f}, max {gain[-1]:.4f} "
             f"({len(gain)} weights)" + (f"; lm_head {head['gptq'] / head['nearest']:.4f}" if head.get("nearest") else "")]
    fixes = [r["correction"] for r in (details.get("quantize") or {}).values() if "correction" in r]
    kept = sorted(f["loss"] / f["loss_before"] for f in fixes if f["loss_before"] > 0)  # guard: Q = W exactly
    if kept:
        lines.append(f"correction   rank {max(f['rank'] for f in fixes)} beside {len(fixes)} linears: ‖(W − Q − up·down)X‖ "
                     f"/ ‖(W − Q)X‖ median {kept[len(kept) // 2]:.4f}, max {kept[-1]:.4f}")
    return lines
