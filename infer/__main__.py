"""`python -m infer`: generate from a trained run or a pretrained model, on the command line.

    python -m infer --workdir /tmp/run --prompt "Once upon a time"
    python -m infer --workdir /tmp/run --prompt "To be" --sampler top-p --top-p 0.9 \\
        --temperature 0.8 --num-samples 3 --max-new-tokens 64 --seed 1
    python -m infer --model smollm2-135m-instruct --chat "What is the capital of France?"
    python -m infer --model smollm2-135m-instruct --interactive --system "Be brief."

`--workdir` loads the latest checkpoint and tokenizer of a pretraining run
(`lmjax.checkpoint.load_run`); `--model` a pretrained model by name or path
(`lmjax.load_pretrained`); `--dtype` casts the params of either. `--chat` renders the message
with the tokenizer's chat template (`infer.prompts.render_chat`) before generating;
`--interactive` holds a multi-turn chat on stdin (`infer.chat`: one user turn a line, `/reset`,
`/exit`), each turn streamed, the conversation kept in a prefix cache. On a CPU,
one sequence decodes from weights laid out for the CPU's matrix-vector products
(`lmjax.packed`, in the params' own dtype: float32 stays exact); `--packed bfloat16|float32`
asks for a format, `--packed none` decodes from the params as loaded. Output streams token by
token when stdout is a terminal and one sequence is asked for (`--stream` / `--no-stream`
override).

Sampler: `--sampler greedy|random|temperature|top-k|top-p`; without it, the flags decide
(`--top-k`/`--top-p`: top-k then top-p, at `--temperature` or 1; `--temperature` alone:
temperature sampling). With no sampling flag: the model's own generation defaults, read as
transformers reads them (`lmjax.convert.generation_defaults`: a Hugging Face folder's
generation_config.json, a GGUF file's general.sampling.* keys), else greedy, as transformers'
`generate` is. SmolLM2's GGUF gives none, so its chat is greedy. The sampler used is printed
on stderr.

Every argument is checked before anything loads: a bad one exits with status 2 and a line
saying what is allowed; a model that cannot be loaded exits with status 1.

Cold start. The command keeps two caches under `~/.cache/lmjax` (`$XDG_CACHE_HOME/lmjax`), so
that a second run skips most of the first one's work: JAX's persistent compilation cache
(`lmjax.compilation_cache`; `LMJAX_COMPILATION_CACHE=0` turns it off, a path moves it) and,
for a GGUF `--model`, the converted weights in the layout decoding reads
(`lmjax.load_pretrained(..., weights_cache=True)`; `LMJAX_WEIGHTS_CACHE=0` / a path). A compiled
decode loop serves any `--max-new-tokens` within the same multiple of 64 and any prompt length
within its bucket (`infer.requests` lists what compiles anew). `--timings` prints where the
time went, on stderr (JSON): import, load (packing included for --model: pack is null), pack,
compile (tracing, lowering, and compiling or reading the cache, up to the first token), the
first token's compute (with the prompt's rendering), and how many executables the process
compiled or read from the cache.
"""

# ruff: noqa: E402  (the clock starts before the imports, for --timings)
from __future__ import annotations

import time

_T0 = time.perf_counter()

import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import jax
import jax.numpy as jnp

import lmjax
from infer import cli_args, sampling
from infer.cli_args import PROG, check_args, make_sampler

__all__ = ["main", "load", "packed_format", "check_args", "make_sampler", "Timings"]


def _parser():
  return cli_args.parser(__doc__)


def _fail(message: str) -> NoReturn:
  """A problem with the model's files (not the arguments): one line, exit status 1."""
  print(f"{PROG}: error: {message}", file=sys.stderr)
  raise SystemExit(1)


def packed_format(choice: str, bf16: bool, one_row: bool) -> str | None:
  """The `lmjax.packed` format `--packed choice` asks for (None: the params as loaded), for
  params in bfloat16 (`bf16`) or not, decoding one sequence (`one_row`) or more."""
  if choice == "none":
    return None
  if choice != "auto":
    return choice
  if jax.default_backend() != "cpu" or not one_row:
    return None  # packing is a batch-1 CPU layout
  return "bfloat16" if bf16 else "float32"


def load(args, one_row: bool = False, weights_cache: bool = False, clock=None):
  """(config, params, tokenizer) of `--workdir` or `--model`, in `--dtype` when given, packed
  as `--packed` asks (`packed_format`; for `--model` at load, from the converted-weights cache
  when `weights_cache`). `clock`: a `Timings` told when loading and packing end."""
  source = args.workdir if args.workdir is not None else args.model
  try:
    if getattr(args, "quant", None):
      return _load_quantized(args, clock, one_row)
    if args.workdir is not None:
      config, params, tokenizer = lmjax.checkpoint.load_run(args.workdir)
    else:
      dtype = args.dtype or "float32"
      kw: dict[str, Any] = {"weights_cache": True} if weights_cache else {}
      fmt = packed_format(args.packed, dtype == "bfloat16", one_row)
      if fmt is not None:
        kw["packed"] = fmt
      loaded = lmjax.load_pretrained(args.model, dtype=dtype, **kw)
      if clock:
        clock.phase("load")  # packing included
      return loaded
  except (OSError, ValueError) as e:
    _fail(f"cannot load {source!r}: {e}")
  if args.dtype is not None:
    config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, args.dtype), params)
  if clock:
    clock.phase("load")
  bf16 = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  fmt = packed_format(args.packed, bf16, one_row)
  if fmt is not None:
    params = lmjax.packed.pack(lmjax.model_for(config), params, fmt)
  if clock:
    clock.phase("pack")
  return config, params, tokenizer


def _load_quantized(args, clock, one_row: bool = False):
  """`load` with `--quant`: the float params loaded, then `lmjax.quant.quantize`d (or a GGUF's
  blocks kept); for one sequence on a CPU (`--packed auto`) packed instead (`lmjax.packed`:
  int8 rows, int4 / nf4 two codes a byte in groups of 32 / 64)."""
  if args.workdir is not None:
    if args.quant == "keep":
      raise ValueError("--quant keep needs a GGUF --model")
    config, params, tokenizer = lmjax.checkpoint.load_run(args.workdir)
  elif args.quant == "keep":
    config, params, tokenizer = lmjax.load_pretrained(args.model, dtype=args.dtype or "float32",
                                                      quant="keep")
    acts = "int8" if getattr(args, "int8_activations", False) else None
    if acts or packed_format(args.packed, False, one_row) is not None:
      params = _pack_kept(lmjax.model_for(config), params, acts)
    return config, params, tokenizer
  else:
    config, params, tokenizer = lmjax.load_pretrained(args.model, dtype=args.dtype or "float32")
  if args.dtype is not None:
    config = config.replace(dtype=args.dtype, param_dtype=args.dtype)
    params = jax.tree.map(lambda x: jnp.asarray(x, args.dtype), params)
  if clock:
    clock.phase("load")
  model = lmjax.model_for(config)
  acts = "int8" if getattr(args, "int8_activations", False) else None  # packed in any case
  if acts or packed_format(args.packed, False, one_row) is not None:
    # batch 1 on a CPU: codes output-major (lmjax.quant.packed_int, packed_int4), the fast layout
    return config, lmjax.packed.pack(model, params, args.quant, activations=acts), tokenizer
  return config, lmjax.quant.quantize(model, params, args.quant), tokenizer


def _pack_kept(model, qparams, activations=None):
  """A GGUF's kept Q4_0 / Q4_1 blocks packed as they are (packed int4: their codes, scales and
  minimums; `activations` as `lmjax.packed.pack`'s), for one sequence on a CPU; other files
  (Q8_0 blocks: packed int8 holds one scale per output row; a float matrix among the blocks)
  keep the quantized reader (slower)."""
  try:
    return lmjax.packed.pack(model, qparams, "int4", activations=activations)
  except ValueError as e:
    print(f"--quant keep: decoding through the quantized reader (slower): {e}", file=sys.stderr)
    return qparams


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class Timings:
  """`--timings`: wall-clock phases since the process imported this module, with JAX's own
  compile events (tracing, lowering, and compiling or reading the persistent cache) during
  generation counted apart from the first token's compute, and the executables the whole
  process compiled or read from the cache."""

  def __init__(self):
    self.phases: dict[str, float | None] = {"import_s": time.perf_counter() - _T0}
    self.last = time.perf_counter()
    self.compile_s, self.executables, self.hits = 0.0, 0, 0  # since generation started
    self.all_executables, self.all_hits = 0, 0  # the whole process
    self.first: dict[str, float] | None = None
    jax.monitoring.register_event_duration_secs_listener(self._duration)
    jax.monitoring.register_event_listener(self._event)

  def _duration(self, event: str, secs: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:
      self.compile_s += secs
      if event == _COMPILE_EVENTS[-1]:
        self.executables += 1
        self.all_executables += 1

  def _event(self, event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
      self.hits += 1
      self.all_hits += 1

  def phase(self, name: str) -> None:
    """Ends phase `name` (it ran since the previous one ended)."""
    now = time.perf_counter()
    self.phases[f"{name}_s"] = now - self.last
    self.last = now

  def generation(self) -> None:
    """Generation starts (the prompt rendered, tokenized, ...): its compiles counted alone."""
    self.phases.setdefault("pack_s", None)  # None: --model packs at load
    self.last = time.perf_counter()
    self.compile_s, self.executables, self.hits = 0.0, 0, 0

  def first_token(self) -> None:
    if self.first is None:
      took = time.perf_counter() - self.last
      self.first = {"compile_s": self.compile_s, "first_token_s": took - self.compile_s,
                    "executables": self.executables, "cache_hits": self.hits}

  def report(self, mode: str, new_tokens: int) -> str:
    """The `timings: {...}` line; stops listening to JAX's events."""
    jax.monitoring.unregister_event_duration_listener(self._duration)
    jax.monitoring.unregister_event_listener(self._event)
    self.first_token()  # generate (no stream): its first token came with the last
    out = {**self.phases, **self.first, "total_s": time.perf_counter() - _T0,
           "process_executables": self.all_executables,
           "process_compiled": self.all_executables - self.all_hits, "mode": mode,
           "new_tokens": new_tokens}
    return "timings: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                     for k, v in out.items()})


def main(argv: Sequence[str] | None = None, *, caches: bool = False) -> int:
  """The command line; `caches`: use lmjax's compilation and converted-weights caches (module
  docstring), as `python -m infer` does (a call from Python, as in tests, leaves them alone)."""
  parser = _parser()
  args = parser.parse_args(argv)
  check_args(parser, args)
  clock = Timings() if args.timings else None
  if caches:
    lmjax.compilation_cache.enable_for_command(PROG)
  if any(getattr(args, k) is not None for k in cli_args.SAMPLING_FLAGS):
    try:
      sampler = make_sampler(args)
    except ValueError as e:
      parser.error(str(e))
    why = "from the flags"
  else:  # the model's own defaults: read its small files, before the weights
    defaults = None
    if args.model is not None:
      try:
        defaults = lmjax.convert.generation_defaults(args.model)
      except (OSError, ValueError) as e:
        _fail(f"cannot load {args.model!r}: {e}")
    try:
      sampler = make_sampler(args, defaults)
    except ValueError as e:
      _fail(str(e))
    why = ("no generation defaults in the model's files" if defaults is None
           else f"the model's generation defaults, {defaults['source']}")
  name = "greedy" if isinstance(sampler, sampling.Greedy) else repr(sampler)
  print(f"sampler: {name} ({why})", file=sys.stderr)

  n_out = (len(args.prompt) if args.prompt else 1) * args.num_samples
  one_row = n_out == 1 and args.best_of is None
  plain = args.prefix_cache_mb is None and not args.interactive  # (packed params: one row)
  config, params, tokenizer = load(args, one_row and plain, caches, clock)
  if tokenizer is None:
    _fail("the loaded model has no tokenizer; python -m infer needs one")
  from infer import decode, prompts, streaming

  if clock:
    clock.generation()
  model = lmjax.model_for(config)
  if args.interactive:
    texts = []
  elif args.chat is not None:
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.chat})
    texts = [prompts.render_chat(messages, tokenizer, add_generation_prompt=True)]
  else:
    texts = args.prompt
  stream = args.stream
  if stream is None:
    stream = sys.stdout.isatty() and one_row
  kw = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, sampler=sampler,
            seed=args.seed, stop=args.stop, num_samples=args.num_samples,
            add_bos=None)  # the tokenizer's convention, as in training (train.chat_data)
  if args.draft is not None:
    draft = args.draft
    if draft != "ngram":
      try:
        dcfg, dparams, dtok = lmjax.load_pretrained(draft, dtype=args.dtype or "float32")
      except (OSError, ValueError) as e:
        _fail(f"cannot load the draft model {draft!r}: {e}")
      dmodel = lmjax.model_for(dcfg)
      if args.draft_quant and packed_format(args.packed, False, one_row) is not None:
        # packed, the fast layout of one sequence on a CPU; int8 activations (drafts change the
        # acceptance, never the output): int8's prompt prefill ~2.5x faster, int4's steps
        # through lmjax.quant.cpu_int4
        acts = "int8" if args.draft_quant in ("int8", "int4") else None
        dparams = lmjax.packed.pack(dmodel, dparams, args.draft_quant, activations=acts)
      elif args.draft_quant:
        dparams = lmjax.quant.quantize(dmodel, dparams, args.draft_quant)
      draft = (dmodel, dparams, dtok)
    kw.update(draft=draft, num_draft_tokens=args.num_draft_tokens)
  if args.prefix_cache_mb is not None or args.interactive:
    from infer import prefix_cache
    mb = 512 if args.prefix_cache_mb is None else args.prefix_cache_mb
    kw["prefix_cache"] = prefix_cache.PrefixCache(max_bytes=mb * 2**20)
  if args.interactive:
    from infer import chat
    return chat.run(model, params, tokenizer, kw, system=args.system,
                    stream=args.stream is not False)
  try:
    if stream:
      gen = streaming.stream(model, params, texts, **kw)
      if args.chat is None:
        sys.stdout.write(texts[0])
      def show(step):
        if clock:
          clock.first_token()
        sys.stdout.write(step.text[0])
        sys.stdout.flush()
      result = streaming.drain(gen, show)
      sys.stdout.write(f"\n[{result.stop_reason[0]}, {len(result.tokens[0])} tokens]\n")
      if clock:
        print(clock.report("stream", len(result.tokens[0])), file=sys.stderr)
      return 0
    scorer = None
    if args.reward_model is not None:
      from infer import reward_scorer
      try:
        scorer = reward_scorer.reward_scorer(args.reward_model)
      except (OSError, ValueError) as e:
        _fail(f"cannot load the reward model {args.reward_model!r}: {e}")
    result = decode.generate(model, params, texts, best_of=args.best_of, scorer=scorer, **kw)
  except ValueError as e:  # what depends on the model: a prompt longer than its context, ...
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  if clock:
    print(clock.report("generate", sum(map(len, result.tokens))), file=sys.stderr)
  if args.draft is not None:
    print(f"speculative: acceptance rate {result.acceptance_rate:.3f}, mean accepted length "
          f"{result.mean_accepted_length:.2f} of {args.num_draft_tokens}", file=sys.stderr)
  if args.prefix_cache_mb is not None:
    print(f"prefix cache: {kw['prefix_cache'].stats()}", file=sys.stderr)
  n = result.num_samples
  for k in range(len(result)):
    i, j = divmod(k, n)
    lp = result.log_probs[k]
    score = sum(lp) / len(lp) if lp else float("nan")
    reward = f", reward {result.scores[k]:.3f}" if scorer is not None else ""
    print(f"=== prompt {i}, sample {j} ({result.stop_reason[k]}, {len(result.tokens[k])} tokens, "
          f"mean log-prob {score:.3f}{reward}) ===")
    print(("" if args.chat is not None else texts[i]) + result.text[k])
  return 0


if __name__ == "__main__":
  sys.exit(main(caches=True))
