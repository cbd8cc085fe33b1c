"""Weight quantization: int8 / int4 / NF4 formats, GGUF blocks kept as they are, QAT.

    qparams = lmjax.quant.quantize(model, params, "int8")     # "int4", "nf4"; group_size=64
    logits = lmjax.quant.apply(model, qparams, tokens)
    out = infer.generate(model, qparams, prompts, tokenizer=tok)

`lmjax.quant.nf4` holds the QLoRA entry points (`quantize_nf4`, `dequantize`).
"""

from lmjax.quant import nf4, qat
from lmjax.quant.apply import QuantParams, apply, loop_variant, reading
from lmjax.quant.qarray import FORMATS, NF4_TABLE, QArray, dequantize, quantize_array
from lmjax.quant.quantize import (
    MODEL_FORMATS,
    dequantize_params,
    nbytes,
    quantize,
    shard,
    shardings,
)

__all__ = ["FORMATS", "MODEL_FORMATS", "NF4_TABLE", "QArray", "QuantParams", "apply",
           "dequantize", "dequantize_params", "loop_variant", "nbytes", "nf4", "qat", "quantize",
           "quantize_array", "reading", "shard", "shardings"]
