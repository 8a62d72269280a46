"""Megatron-core <-> HuggingFace weights: gather TP/PP/EP/ETP shards into HF-named tensors."""
