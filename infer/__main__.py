"""`python -m infer`: generate from a trained run or a pretrained model, on the command line.

    python -m infer --workdir /tmp/run --prompt "Once upon a time"
    python -m infer --workdir /tmp/run --prompt "To be" --sampler top-p --top-p 0.9 \\
        --temperature 0.8 --num-samples 3 --max-new-tokens 64 --seed 1
    python -m infer --model smollm2-135m-instruct --chat "What is the capital of France?"

`--workdir` loads the latest checkpoint and tokenizer of a pretraining run
(`lmjax.checkpoint.load_run`); `--model` a pretrained model by name or path
(`lmjax.load_pretrained`). `--chat` renders the message with the tokenizer's chat template
(`infer.prompts.render_chat`) before generating. On a CPU, one sequence decodes from weights
laid out for the CPU's matrix-vector products (`lmjax.packed`, in the params' own dtype:
float32 stays exact); `--packed bfloat16|float32` asks for a format, `--packed none` decodes
from the params as loaded. Output streams token by token when stdout is a terminal and one
sequence is asked for (`--stream` / `--no-stream` override).

Sampler: `--sampler greedy|random|temperature|top-k|top-p`; without it, the flags decide
(`--top-k`/`--top-p`: top-k then top-p; `--temperature` alone: temperature), and with no flags
it is nucleus sampling with p = 0.9.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from infer import sampling
from lmjax.packed import FORMATS as PACKED_FORMATS


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m infer", description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a pretraining run's directory (latest checkpoint)")
  src.add_argument("--model", help="a pretrained model's name or path (lmjax.load_pretrained)")
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--prompt", action="append", help="text to continue (repeat for a batch)")
  what.add_argument("--chat", help="a user message, rendered with the chat template")
  p.add_argument("--system", help="with --chat: a system message first")
  p.add_argument("--sampler", choices=sampling.NAMES, help="default: see above")
  p.add_argument("--temperature", type=float)
  p.add_argument("--top-k", type=int)
  p.add_argument("--top-p", type=float)
  p.add_argument("--num-samples", type=int, default=1, help="sequences per prompt")
  p.add_argument("--best-of", type=int, help="generate N, print the best (mean log-prob)")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", help="a stop string (repeatable)")
  p.add_argument("--dtype", default="float32", help="with --model: the params dtype")
  p.add_argument("--packed", nargs="?", const="bfloat16", default="auto",
                 choices=("auto", "none", *PACKED_FORMATS),
                 help="decode from packed weights (lmjax.packed: output-major, the fastest "
                      "batch-1 decoding on a CPU, float32 activations). auto (default): on a "
                      "CPU for one sequence, in the params' dtype; --packed alone: bfloat16")
  p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                 help="print tokens as they come (default: on a terminal, for one sequence)")
  return p


def make_sampler(args) -> sampling.BaseSampler:
  """The sampler the flags ask for (module docstring)."""
  if args.sampler is not None:
    return sampling.from_name(args.sampler, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p)
  if args.top_k is not None or args.top_p is not None:
    return sampling.Sampler(temperature=1.0 if args.temperature is None else args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
  if args.temperature is not None:
    return sampling.Temperature(args.temperature)
  return sampling.TopP(0.9)


def packed_format(choice: str, params, one_row: bool) -> str | None:
  """The `lmjax.packed` format `--packed choice` asks for (None: the params as loaded)."""
  if choice == "none":
    return None
  if choice != "auto":
    return choice
  if jax.default_backend() != "cpu" or not one_row:
    return None  # packing is a batch-1 CPU layout
  bf16 = any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  return "bfloat16" if bf16 else "float32"


def load(args):
  """(config, params, tokenizer) of `--workdir` or `--model`."""
  import lmjax

  if args.workdir is not None:
    try:
      checkpoint = importlib.import_module("lmjax.checkpoint")
    except ImportError as e:
      raise SystemExit(f"--workdir needs lmjax.checkpoint.load_run, which is missing: {e}") from e
    loader, source = (lambda: checkpoint.load_run(args.workdir)), args.workdir
  else:
    if not hasattr(lmjax, "load_pretrained"):
      raise SystemExit("--model needs lmjax.load_pretrained, which is missing in this install")
    loader, source = (lambda: lmjax.load_pretrained(args.model, dtype=args.dtype)), args.model
  try:
    return loader()
  except (OSError, ValueError) as e:
    raise SystemExit(f"error: cannot load {source!r}: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    sampler = make_sampler(args)
  except ValueError as e:
    parser.error(str(e))
  config, params, tokenizer = load(args)
  if tokenizer is None:
    raise SystemExit("the loaded model has no tokenizer; python -m infer needs one")
  import lmjax
  from infer import decode, prompts, streaming

  model = lmjax.model_for(config)
  if args.chat is not None:
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.chat})
    texts = [prompts.render_chat(messages, tokenizer, add_generation_prompt=True)]
  else:
    texts = args.prompt
  n_out = len(texts) * args.num_samples
  fmt = packed_format(args.packed, params, n_out == 1 and args.best_of is None)
  if fmt is not None:
    params = lmjax.packed.pack(model, params, fmt)
  stream = args.stream
  if stream is None:
    stream = sys.stdout.isatty() and n_out == 1 and args.best_of is None
  kw = dict(tokenizer=tokenizer, max_new_tokens=args.max_new_tokens, sampler=sampler,
            seed=args.seed, stop=args.stop, num_samples=args.num_samples,
            add_bos=False if args.chat is not None else None)  # a chat template writes its own
  try:
    if stream:
      if args.best_of is not None or n_out > 1:
        raise ValueError("--stream prints one sequence: one prompt, one sample, no --best-of "
                         "(use --no-stream)")
      gen = streaming.stream(model, params, texts, **kw)
      if args.chat is None:
        sys.stdout.write(texts[0])
      while True:
        try:
          step = next(gen)
        except StopIteration as e:
          result = e.value
          break
        piece = step.text[0]
        sys.stdout.write(piece)
        sys.stdout.flush()
      sys.stdout.write(f"\n[{result.stop_reason[0]}, {len(result.tokens[0])} tokens]\n")
      return 0
    result = decode.generate(model, params, texts, best_of=args.best_of, **kw)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = result.num_samples
  for k in range(len(result)):
    i, j = divmod(k, n)
    lp = result.log_probs[k]
    score = sum(lp) / len(lp) if lp else float("nan")
    print(f"=== prompt {i}, sample {j} ({result.stop_reason[k]}, {len(result.tokens[k])} tokens, "
          f"mean log-prob {score:.3f}) ===")
    print(("" if args.chat is not None else texts[i]) + result.text[k])
  return 0


if __name__ == "__main__":
  sys.exit(main())
