"""The arguments of `python -m infer`: the parser, the checks that span several arguments, and
the sampler the flags (or the model's generation defaults) ask for. Every check runs before
anything loads; a bad argument exits with status 2 and a line saying what is allowed.
"""

from __future__ import annotations

import argparse
from typing import Any

from infer import sampling
from infer.requests import MAX_SEED
from lmjax.config import DTYPES
from lmjax.packed import FORMATS as PACKED_FORMATS

__all__ = ["PROG", "SAMPLING_FLAGS", "parser", "check_args", "make_sampler"]

PROG = "python -m infer"
SAMPLING_FLAGS = ("sampler", "temperature", "top_k", "top_p")


def _int_at_least(low: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
      raise argparse.ArgumentTypeError(f"{value} is not an integer >= {low}")
    return value
  return parse


def _seed(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = -1
  if not 0 <= value < MAX_SEED:
    raise argparse.ArgumentTypeError(f"{text} is not an integer in [0, 2**31)")
  return value


def _nonempty(text: str) -> str:
  if not text:
    raise argparse.ArgumentTypeError("must not be empty")
  return text


def parser(description: str | None = None) -> argparse.ArgumentParser:
  """The argument parser (`description`: the text --help shows first)."""
  p = argparse.ArgumentParser(prog=PROG, description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", help="a pretraining run's directory (latest checkpoint)")
  src.add_argument("--model", help="a pretrained model's name or path (lmjax.load_pretrained)")
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--prompt", action="append", type=_nonempty,
                    help="text to continue (repeat for a batch)")
  what.add_argument("--chat", type=_nonempty,
                    help="a user message, rendered with the model's chat template")
  what.add_argument("--interactive", action="store_true",
                    help="a multi-turn chat: user turns from stdin (one a line) until EOF or "
                         "/exit; /reset starts over; the conversation is kept in a prefix cache "
                         "(--prefix-cache-mb, default 512), so each turn prefills only its new "
                         "tokens")
  p.add_argument("--system", type=_nonempty,
                 help="with --chat or --interactive: a system message first")
  p.add_argument("--sampler", choices=sampling.NAMES,
                 help="how tokens are picked (default: with no --temperature/--top-k/--top-p, "
                      "the model's own generation defaults from its generation_config.json or "
                      "GGUF general.sampling.* keys, else greedy)")
  p.add_argument("--temperature", type=float, help=">= 0; 0 is greedy")
  p.add_argument("--top-k", type=int, help=">= 1: sample among the k most likely tokens")
  p.add_argument("--top-p", type=float, help="in (0, 1]: nucleus sampling")
  p.add_argument("--num-samples", type=_int_at_least(1), default=1,
                 help="sequences per prompt (default: 1)")
  p.add_argument("--best-of", type=_int_at_least(1),
                 help="generate N (>= --num-samples), print the best (mean log-prob, or "
                      "--reward-model's reward)")
  p.add_argument("--reward-model", metavar="RUN",
                 help="with --best-of: rank the candidates by this reward model (a run dir of "
                      "python -m train.reward or a *ForSequenceClassification folder)")
  p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64,
                 help="tokens to generate at most (default: 64)")
  p.add_argument("--seed", type=_seed, default=0, help="in [0, 2**31) (default: 0)")
  p.add_argument("--stop", action="append", type=_nonempty, help="a stop string (repeatable)")
  p.add_argument("--dtype", choices=DTYPES,
                 help="cast the params to this dtype (default: float32 for --model, the run's "
                      "own for --workdir)")
  p.add_argument("--packed", nargs="?", const="bfloat16", default="auto",
                 choices=("auto", "none", *PACKED_FORMATS),
                 help="decode from packed weights (lmjax.packed: output-major, the fastest "
                      "batch-1 decoding on a CPU, float32 activations). auto (default): on a "
                      "CPU for one sequence, in the params' dtype; --packed alone: bfloat16")
  p.add_argument("--quant", choices=("int8", "int4", "nf4", "keep"),
                 help="decode from quantized weights (lmjax.quant; replaces --packed): int8 "
                      "per channel, int4/nf4 in groups of 64; for one sequence on a CPU "
                      "(unless --packed none) packed output-major instead (int4: groups of 32 "
                      "with offsets, GGUF Q4_1 arithmetic); keep: a GGUF --model's own "
                      "Q8_0/Q4_0/Q4_1 blocks")
  p.add_argument("--int8-activations", action="store_true",
                 help="round products' inputs to int8 where that is faster (a little less "
                      "accurate). --quant int8: products of more than 16 rows (a prompt's "
                      "prefill) quantize their inputs per token and multiply int8 x int8 in "
                      "int32 (W8A8, lmjax.quant.packed_int), 1-16 rows (decoding, speculative "
                      "checks) per group of 32 (lmjax.quant.cpu_int8). --quant int4 / keep "
                      "(Q4_0/Q4_1): products of up to 16 rows (decoding) round their inputs per "
                      "group of 32 and take integer dot products on an x86-64 CPU (W4A8 as "
                      "llama.cpp, lmjax.quant.cpu_int4). Packed weights only (not with --packed "
                      "none)")
  p.add_argument("--draft", help="speculative decoding (infer.speculative): 'ngram' (prompt "
                 "lookup) or a drafter model's name or path with the same tokenizer")
  p.add_argument("--draft-quant", choices=("int8", "int4", "nf4"),
                 help="with --draft MODEL: quantize the drafter's weights (lmjax.quant; packed "
                      "for one sequence on a CPU, with int8 activations for int8 / int4: "
                      "drafts change the acceptance, never the output). The model itself in "
                      "int8 or int4 drafts for its float32 self (--draft MODEL --draft-quant "
                      "int4): the output stays the float32 model's")
  p.add_argument("--num-draft-tokens", type=_int_at_least(1), default=4,
                 help="with --draft: tokens drafted per round (default: 4)")
  p.add_argument("--prefix-cache-mb", type=_int_at_least(1),
                 help="share the KV of the prompts' common prefixes (infer.PrefixCache; "
                      "--interactive: its conversation, default 512)")
  p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                 help="print tokens as they come (default: on a terminal, for one sequence)")
  p.add_argument("--timings", action="store_true",
                 help="print a breakdown of the time to the first token on stderr, as JSON: "
                      "import, load, pack, compile, first token")
  return p


def check_args(parser: argparse.ArgumentParser, args) -> None:
  """The checks that span several arguments (argparse does each one's own); exits with
  `parser.error` on the first problem."""
  if args.system is not None and args.chat is None and not args.interactive:
    parser.error("--system needs --chat or --interactive (it is the system message of a chat)")
  if args.interactive and (args.num_samples > 1 or args.best_of is not None):
    parser.error("--interactive answers each turn once: no --num-samples > 1, no --best-of")
  if args.reward_model is not None and args.best_of is None:
    parser.error("--reward-model ranks the candidates of --best-of N: give --best-of")
  if args.best_of is not None and args.best_of < args.num_samples:
    parser.error(f"--best-of {args.best_of} must be >= --num-samples {args.num_samples}")
  if getattr(args, "int8_activations", False) and (args.quant not in ("int8", "int4", "keep")
                                                  or args.packed == "none"):
    parser.error(f"--int8-activations needs --quant int8, int4 or keep and packed weights "
                 f"(got --quant {args.quant}, --packed {args.packed}): it multiplies packed "
                 f"int8 or int4 weights")
  if getattr(args, "draft_quant", None) and args.draft in (None, "ngram"):
    parser.error(f"--draft-quant {args.draft_quant} quantizes a drafter model: give --draft "
                 f"MODEL (got --draft {args.draft})")
  n_out = (len(args.prompt) if args.prompt else 1) * args.num_samples
  if args.stream and (n_out > 1 or args.best_of is not None):
    parser.error("--stream prints one sequence: one prompt, one sample, no --best-of "
                 "(use --no-stream)")


def make_sampler(args, defaults: dict[str, Any] | None = None) -> sampling.BaseSampler:
  """The sampler the flags ask for; with no sampling flag, the model's generation defaults
  (`lmjax.convert.generation_defaults`, transformers' meaning: top_k 0 and top_p 1 are off),
  else greedy (module docstring).

  Raises:
    ValueError: a bad flag value, or generation defaults no sampler takes (naming their file).
  """
  if args.sampler is not None:
    return sampling.from_name(args.sampler, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p)
  if args.top_k is not None or args.top_p is not None:
    return sampling.Sampler(temperature=1.0 if args.temperature is None else args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
  if args.temperature is not None:
    return sampling.Temperature(args.temperature)
  if defaults is None or not defaults["do_sample"]:
    return sampling.Greedy()
  try:
    return sampling.Sampler(temperature=defaults["temperature"],
                            top_k=defaults["top_k"] or None,
                            top_p=None if defaults["top_p"] == 1 else defaults["top_p"])
  except ValueError as e:
    raise ValueError(f"the model's generation defaults ({defaults['source']}) give no usable "
                     f"sampler: {e}") from e

