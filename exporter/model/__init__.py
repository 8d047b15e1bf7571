"""What a causal LM is made of, seen from the compressor: no weight is read or written here.

    architecture.py  Architecture: where the decoder layers are and which linears share an input (data)
    discovery.py     finds the Architecture of any decoder-only model (one forward of one layer per structure)
    experts.py       fused MoE experts unfused into one linear per expert (an equivalent model, checked)
    linears.py       what counts as a linear (nn.Linear, Conv1D) and its weight as out×in
    lowrank.py       LowRankLinear (x → down → up) and the module swap
    corrected.py     CorrectedLinear: a quantized linear + a float low-rank correction of its grid error
    candidates.py    Matrix: one compression candidate (name, type, layer, shape); list_matrices
    activations.py   Activations: the hidden states and layer arguments between decoder layers; advance
    layer_inputs.py  capture_inputs: what decoder layer 0 receives and every layer's arguments
    head.py          logits from final hidden states, through the model's own head
"""
