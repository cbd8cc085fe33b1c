"""Forward + backward + AdamW step time, tokens/s and MFU of lmjax models at sequence 512.

MFU is against this machine's matmul peak measured in the same run (a large `jnp.dot` in the
compute dtype). A plain linen GPT (a baseline written here in a few lines, no options) is timed
the same way, so the library's overhead shows as a ratio.

  python benchmarks/model_step.py [--batch 2] [--seq 512] [--steps 3] [--models gpt2-124m,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import lmjax  # noqa: E402


class PlainBlock(nn.Module):
  d: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm()(x)
    qkv = nn.Dense(3 * d)(h).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d // self.heads)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], s, -1e30)
    a = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, d)
    x = x + nn.Dense(d)(a)
    h = nn.LayerNorm()(x)
    return x + nn.Dense(d)(jax.nn.gelu(nn.Dense(4 * d)(h)))


class PlainGPT(nn.Module):
  """The baseline: a GPT in plain linen (learned positions, tied embeddings)."""

  vocab: int = 16000
  d: int = 640
  layers: int = 8
  heads: int = 10
  max_len: int = 1024

  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(self.vocab, self.d)
    x = emb(tokens) + nn.Embed(self.max_len, self.d)(jnp.arange(tokens.shape[1]))[None]
    for _ in range(self.layers):
      x = PlainBlock(self.d, self.heads)(x)
    return emb.attend(nn.LayerNorm()(x))


def plain_flops_per_token(m: PlainGPT, seq: int) -> float:
  return 6.0 * (m.layers * 12 * m.d * m.d + m.vocab * m.d) + 12.0 * m.layers * seq * m.d


def make_step(apply_fn, tx):
  def loss_fn(params, tokens):
    logits = apply_fn(params, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

  @jax.jit
  def step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def bench(name, apply_fn, params, flops_tok, batch, seq, steps, peak):
  tx = optax.adamw(1e-4)
  opt_state = tx.init(params)
  step = make_step(apply_fn, tx)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, 1000)
  state = [params, opt_state]

  def run():
    state[0], state[1], loss = step(state[0], state[1], tokens)
    return loss

  secs = common.time_fn(run, warmup=1, iters=steps)
  tps = batch * seq / secs
  n = lmjax.count_params(params)
  return {"model": name, "params": n, "batch": batch, "seq": seq, "step_s": secs,
          "tokens_per_s": tps, "achieved_gflops": tps * flops_tok / 1e9,
          "mfu": tps * flops_tok / peak}


def main():
  ap = argparse.ArgumentParser(description=__doc__)
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--models", default="plain-gpt-49m,lmjax-gpt-49m,plain-gpt2-shape,gpt2-124m,"
                  "smollm2-135m")
  ap.add_argument("--dtype", default="float32")
  args = ap.parse_args()
  peak = common.matmul_peak(args.dtype)
  print(f"matmul peak ({args.dtype}, measured now): {peak / 1e9:.1f} GFLOP/s")
  rows = []
  for name in args.models.split(","):
    if name.startswith("plain-"):
      # plain-gpt-49m: the reference figure quoted in the issue; plain-gpt2-shape: the same
      # plain code at GPT-2 small's shape (vocab 50257, 768 wide, 12 layers), like for like.
      m = PlainGPT() if name == "plain-gpt-49m" else PlainGPT(50257, 768, 12, 12)
      params = m.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
      rows.append(bench(name, lambda p, t, m=m: m.apply({"params": p}, t), params,
                        plain_flops_per_token(m, args.seq), args.batch, args.seq, args.steps,
                        peak))
    else:
      # lmjax-gpt-49m: the library at the plain 49M model's shape (the gpt2 preset's options).
      shape = (dict(vocab_size=16000, model_dim=640, num_decoder_layers=8, num_heads=10,
                    ffn_dim=2560) if name == "lmjax-gpt-49m" else {})
      cfg = lmjax.TransformerConfig.from_preset(
          "gpt2-124m" if shape else name, dtype=args.dtype, max_len=max(args.seq, 1024), **shape)
      model = lmjax.model_for(cfg)
      params = jax.jit(lambda m=model: nn.meta.unbox(m.init(
          jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))()
      rows.append(bench(name, lambda p, t, m=model: m.apply({"params": p}, t), params,
                        lmjax.flops_per_token(cfg, args.seq), args.batch, args.seq, args.steps,
                        peak))
    print(rows[-1], flush=True)
  base = next((r for r in rows if r["model"] == "plain-gpt-49m"), None)
  same = next((r for r in rows if r["model"] == "plain-gpt2-shape"), None)
  for r in rows:
    r["mfu_vs_plain"] = r["mfu"] / base["mfu"] if base else None
    # the plain GPT of the same shape, where there is one (smollm2 has GQA, SwiGLU, rotary)
    like = {"plain-gpt-49m": base, "lmjax-gpt-49m": base, "plain-gpt2-shape": same,
            "gpt2-124m": same}.get(r["model"])
    r["mfu_vs_plain_same_shape"] = r["mfu"] / like["mfu"] if like else None
  print(common.table(rows, ["model", "params", "batch", "seq", "step_s", "tokens_per_s",
                            "achieved_gflops", "mfu", "mfu_vs_plain",
                            "mfu_vs_plain_same_shape"]))
  path = common.write("model_step", {"dtype": args.dtype, "matmul_peak_flops": peak,
                                     "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
