"""Text in and out of a model: tokenizers (byte-level BPE and SentencePiece) and chat templates."""
