"""Quantization.

    gguf_blocks.py  GGUF's block types (Q4_0, Q8_0, Q4_K, ...) and their dequantization
    quantize.py     perfx's int4 / int8 / fp16 quantizers and the clipping search
    awq.py          AWQ: activation-aware scales and clipping, on the NumPy reference model
"""
