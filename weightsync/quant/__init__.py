"""int4 (W4A16) quantization in the compressed-tensors pack-quantized format.

One grid for the trainer's fake-quant forward (QAT) and the rollout packer, so the engine's
dequantized weights equal the weights the trainer's forward used, bit for bit.
"""

from weightsync.quant.config import DEFAULT_IGNORE, Int4Config
from weightsync.quant.int4 import fake_quant_int4, pack_int4, unpack_int4
from weightsync.quant.stream import packed_meta, quantize_named, quantize_stream

__all__ = [
    "DEFAULT_IGNORE",
    "Int4Config",
    "fake_quant_int4",
    "pack_int4",
    "packed_meta",
    "quantize_named",
    "quantize_stream",
    "unpack_int4",
]
