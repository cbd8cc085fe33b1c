"""Pretrained weights in and out of lmjax: GGUF files, Hugging Face folders, their tokenizers.

`load_pretrained(path_or_name)` returns `(config, params, tokenizer)`; `generation_defaults`
the sampling settings the checkpoint's files give (generation_config.json); `save_pretrained`
writes a folder transformers loads. Reading GGUF needs `gguf`; tokenizers need `tokenizers` (and
`jinja2` for chat templates); all are imported only when used.
"""

from lmjax.convert.chat_template import render_chat_template, special_tokens_map
from lmjax.convert.hf_tokenizer import HFTokenizer
from lmjax.convert.pretrained import (
    PRETRAINED,
    generation_defaults,
    load_pretrained,
    pretrained_config,
    pretrained_tokenizer,
    resolve,
    save_pretrained,
)

__all__ = [
    "PRETRAINED",
    "HFTokenizer",
    "generation_defaults",
    "load_pretrained",
    "pretrained_config",
    "pretrained_tokenizer",
    "render_chat_template",
    "resolve",
    "save_pretrained",
    "special_tokens_map",
]
