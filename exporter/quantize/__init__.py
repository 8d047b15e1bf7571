"""--quantize: the factors (and the linears left dense) as the MatMulNBits weights the graph ships.

    grid.py         the number grid of one weight: blocks of `block_size` along the input dimension, one
                    scale per (output row, block), symmetric codes (the zero point implied), as ONNX Runtime's
                    MatMulNBits stores them
    gptq.py         GPTQ on that grid: columns rounded one at a time, each rounding error pushed onto the
                    columns not yet rounded through the inverse Hessian X Xᵀ of the weight's inputs
    activations.py  what accuracy level 4 does to a MatMulNBits input (int8 per block), as a PyTorch hook
    layer.py        one decoder layer: every linear's weights replaced by their quantized values, the scales kept
                    beside them (model/quantized.py), in the layer loop where X Xᵀ is at hand
    correction.py   --correction-rank: the best rank-r part of a dense linear's grid error, kept float beside it
"""
