"""Where the weights come from: a name resolved to files, the files checked, and the model opened as a layer
source that materialises one decoder layer at a time (exporter/loop walks it).

    names.py         --model: alias, hub id, directory or .gguf → ModelSource
    integrity.py     truncated or corrupt safetensors/GGUF files, NaN weights, incomplete checkpoints: one line each
    files.py         TensorFiles: a checkpoint folder's tensors by name, memory-mapped one at a time
    key_renaming.py  checkpoint key names back to the model's own (transformers' load-time renamings)
    source.py        LayerSource: the interface (materialize(i) / release(i))
    resident.py      ResidentSource: a model already in memory (GGUF, tests, library callers)
    checkpoint.py    CheckpointSource: a skeleton on `meta`, layer i read from the checkpoint when its turn comes
    written.py       WrittenSource: the compressed model read back from the output folder (streamed ONNX)
    open.py          open_source / load: the model as a source (streamed unless a stage needs it whole)
"""
