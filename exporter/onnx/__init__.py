"""The ONNX artifact: two ways to write the graph, one folder layout, one stage that checks it.

    fused/           the decoder written from the weights with ONNX Runtime's fused ops, layer by layer
    plain.py         torch.onnx (dynamo) export of the dense model + the low-rank rewrite (graph_rewrite/)
    files.py         the folder: model.onnx + model.onnx_data, graph metadata, sidecars
    genai_config.py  genai_config.json for onnxruntime-genai
    stage.py         OnnxStage: the dense graph before the loop, the compressed one after, parity and perplexity
"""
