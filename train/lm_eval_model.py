"""lmjax models in lm-evaluation-harness (the `lm-eval` package; EleutherAI, Gao et al., "A
framework for few-shot language model evaluation").

`LMJaxLM` implements lm-eval's model interface on lmjax: `loglikelihood` (through lm-eval's
`TemplateLM`, which tokenizes and splits context and continuation as for its Hugging Face
backend) and `loglikelihood_rolling` on the batched, bucketed scorer of `train.eval_scoring`,
`generate_until` on `infer.generate` (greedy unless the task samples; stop strings matched in
the compiled loop). It is registered as model `lmjax` when this module is imported.

lm-eval 0.4 finds models only in its own registry (no entry points), so the plain `lm_eval`
command does not know `lmjax`. Run it through this module, which registers the model and then
hands its arguments to lm-eval's own command line:

    python -m train.lm_eval_model --model lmjax \\
        --model_args model=smollm2-135m-instruct,batch_size=16 --tasks hellaswag

(`run`, `ls`, `validate` and every lm-eval option work as with `lm_eval`.) From Python:

    import lm_eval
    from train.lm_eval_model import LMJaxLM
    lm = LMJaxLM.from_model(model, params, tokenizer, batch_size=16)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

`model_args`: `model` (anything `lmjax.load_pretrained` takes, or a run dir), `batch_size`
(rows per forward pass and prompts per generation batch, default 8), `max_length` (default the
model's `max_len`), `max_gen_toks` (default 256).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from train import eval_scoring
from train.evaluate import context_prefix, load_model, rolling_prefix


@register_model("lmjax")
class LMJaxLM(TemplateLM):
  """An lmjax `CausalLM` behind lm-eval's `LM` interface (module docstring)."""

  backend = "causal"

  def __init__(self, model: str | None = None, batch_size: int | str = 8,
               max_length: int | str | None = None, max_gen_toks: int | str = 256,
               loaded: tuple | None = None, **unused):
    """Args (strings from `--model_args` are converted):
      model: a pretrained name or path, or a run dir (ignored when `loaded` is given).
      batch_size, max_length, max_gen_toks: see the module docstring.
      loaded: `(model, params, tokenizer)` already in memory (`from_model`).
    """
    super().__init__()
    if loaded is None:
      if not model:
        raise ValueError("give --model_args model=NAME (a pretrained name or path, or a run dir)")
      loaded = load_model(str(model))
    self.model, self.params, self.tokenizer = loaded
    self.name = str(model) if model else type(self.model).__name__
    if str(batch_size).startswith("auto"):
      batch_size = 8
    self.batch_size = int(batch_size)
    self._max_length = int(max_length) if max_length not in (None, "") else None
    self.max_gen_toks = int(max_gen_toks)
    self.scorer = eval_scoring.Scorer(self.model, self.params, batch_size=self.batch_size,
                                      max_length=self._max_length)

  @classmethod
  def from_model(cls, model, params, tokenizer, **kwargs) -> LMJaxLM:
    """An adapter around a model already in memory."""
    return cls(loaded=(model, params, tokenizer), **kwargs)

  # --- tokens ------------------------------------------------------------------------------

  @property
  def max_length(self) -> int:
    return self.scorer.max_length

  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    return rolling_prefix(self.tokenizer)  # BOS, else EOS (as lm-eval's HF backend)

  @property
  def tokenizer_name(self) -> str:
    return self.name.replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs
                 ) -> list[int]:
    """Ids of `string`; the BOS first when the tokenizer's convention adds one (never when
    `add_special_tokens` is False, nor twice)."""
    ids = [int(i) for i in self.tokenizer.encode(string, add_bos=False, add_eos=False)]
    prefix = [] if add_special_tokens is False else context_prefix(self.tokenizer)
    if prefix and ids[:1] != prefix:
      ids = prefix + ids
    return ids

  def tok_decode(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(list(ids))

  # --- log-likelihoods ---------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                            ) -> list[tuple[float, bool]]:
    scores = self.scorer.loglikelihood([(ctx, cont) for _, ctx, cont in requests])
    out = []
    for (key, _, _), s in zip(requests, scores):
      answer = (s.logprob, s.is_greedy)
      if key is not None:
        self.cache_hook.add_partial("loglikelihood", key, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows, owner = [], []
    for i, (string,) in enumerate(r.args for r in requests):
      w = eval_scoring.rolling_windows(self.tok_encode(string), self.prefix_token_id,
                                       self.max_length)
      windows += w
      owner += [i] * len(w)
    totals = [0.0] * len(requests)
    for i, s in zip(owner, self.scorer.loglikelihood(windows)):
      totals[i] += s.logprob
    for r, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
    return totals

  # --- generation --------------------------------------------------------------------------

  def _sampler(self, kwargs: dict):
    import infer

    if not kwargs.get("do_sample") or not kwargs.get("temperature"):
      return infer.sampling.Greedy()
    t = float(kwargs["temperature"])
    if kwargs.get("top_p") not in (None, 1, 1.0):
      return infer.sampling.TopP(p=float(kwargs["top_p"]), temperature=t)
    if kwargs.get("top_k"):
      return infer.sampling.TopK(k=int(kwargs["top_k"]), temperature=t)
    return infer.sampling.Temperature(temperature=t)

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    from lm_eval.models.utils import normalize_gen_kwargs

    import infer

    groups: dict[Any, list[int]] = {}
    settings = []
    for i, r in enumerate(requests):
      context, gen_kwargs = r.args
      kw = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
      until = tuple(s for s in kw.get("until") or [] if s and s != self.tokenizer.eos_token)
      key = (until, kw["max_gen_toks"], repr(self._sampler(kw)))
      groups.setdefault(key, []).append(i)
      settings.append(kw)
    out: list[str | None] = [None] * len(requests)
    bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until (lmjax)")
    for (until, max_new, _), idx in groups.items():
      if max_new >= self.max_length:
        raise ValueError(f"max_gen_toks={max_new} must be below max_length={self.max_length}")
      keep = self.max_length - max_new
      for s in range(0, len(idx), self.batch_size):
        chunk = idx[s:s + self.batch_size]
        ids = [self.tok_encode(requests[i].args[0])[-keep:] for i in chunk]
        ids += [ids[0]] * (self.batch_size - len(ids))  # one compiled loop for every chunk
        res = infer.generate(self.model, self.params, ids, tokenizer=self.tokenizer,
                             max_new_tokens=max_new, sampler=self._sampler(settings[chunk[0]]),
                             stop=list(until) or None, seed=int(settings[chunk[0]].get("seed",
                                                                                         0)))
        for i, text in zip(chunk, res.text):
          for term in until:  # as lm-eval's backends: cut at every stop string
            text = text.split(term)[0]
          out[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
        bar.update(len(chunk))
    bar.close()
    return out  # type: ignore[return-value]

  # --- chat --------------------------------------------------------------------------------

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return getattr(self.tokenizer, "chat_template", None) if chat_template else None

  def apply_chat_template(self, chat_history: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    from infer import prompts

    return prompts.render_chat(chat_history, self.tokenizer,
                               add_generation_prompt=add_generation_prompt)


def main(argv: Sequence[str] | None = None) -> None:
  """lm-eval's command line, with `lmjax` registered (module docstring)."""
  from lm_eval.__main__ import cli_evaluate

  sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


if __name__ == "__main__":
  main()
