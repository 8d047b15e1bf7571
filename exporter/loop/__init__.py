"""THE layer loop: every stage that needs the model's layers plugs in here, one decoder layer at a time.

    walk.py         layer_by_layer: materialise layer i, hand it to the stages, release it
    streams.py      the activations carried from one layer to the next (calibration, evaluation; dense, compressed)
    observe.py      hooks on a layer's linears → their input statistics (factorize/stats.py)
    profile.py      the profile pass: what the allocations read, before any matrix is compressed
    layer.py        one layer of the compression pass: observe → factorize → swap → refine → advance → write
    result.py       CompressionResult: ranks, losses and per-layer measurements, for the report
    compress.py     compress_source / compress_: capture → profile → plan → compression pass → (e2e refinement)
    forward.py      a plain forward through a source (the PyTorch reference of streamed validation)
    host_memory.py  freed heap returned to the OS between the forward passes and the factorization
"""
