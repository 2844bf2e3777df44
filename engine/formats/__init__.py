"""Model files: each kind read into one shape (a ModelConfig, GGUF-named `QTensor`s, a tokenizer), and written.

    loader.py        open_model: any supported file or directory, by its kind
    gguf_file.py     GGUF files
    hf.py            Hugging Face checkpoint directories (AutoAWQ's included)
    perfx_format.py  perfx's own format: one safetensors file holding the whole model
    tensors.py       QTensor: a weight as a file stores it, quantized blocks kept as they are
    features.py      what a file asks for against what perfx runs: the rest is refused
    convert.py       `perfx convert`: any model into a perfx file, quantized
    export.py        `perfx export`: any model into a Hugging Face checkpoint
"""
