"""Pretrained weights in and out of lmjax: GGUF files, Hugging Face folders, their tokenizers.

`load_pretrained(path_or_name)` returns `(config, params, tokenizer)`; `save_pretrained` writes
a folder transformers loads. Reading GGUF needs `gguf`; tokenizers need `tokenizers` (and
`jinja2` for chat templates); all are imported only when used.
"""

from lmjax.convert.hf_tokenizer import HFTokenizer, render_chat_template
from lmjax.convert.pretrained import PRETRAINED, load_pretrained, resolve, save_pretrained

__all__ = [
    "PRETRAINED",
    "HFTokenizer",
    "load_pretrained",
    "render_chat_template",
    "resolve",
    "save_pretrained",
]
