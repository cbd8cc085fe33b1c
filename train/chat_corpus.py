"""The embedded chat set: English dialogs of the `chatterbot-corpus` package as SFT jsonl.

`train/corpora/chatterbot_en.jsonl.gz` ships with lmjax, so the SFT demo needs no download. Each
line is one conversation, `{"messages": [{"role": "user"|"assistant", "content"}, ...],
"category": ..., "split": "train"|"heldout"}`; the utterances of a chatterbot conversation
alternate user, assistant, user, ... Provenance: `chatterbot-corpus==1.3.3` on PyPI
(https://github.com/gunthercox/chatterbot-corpus, BSD-3-Clause, by Gunther Cox), its
`chatterbot_corpus/data/english/*.yml` files in name order. Conversations with an empty or
non-text utterance are left out, and so is every exact repeat of an earlier conversation
(`tech_support.yml` repeats ten dialogs 1,050 times); nothing else is changed. The held-out
split is every conversation whose SHA-256 of its JSON text falls in the lowest tenth (a fixed,
content-keyed choice, the same on every machine).

Rebuild it (needs PyYAML, a dependency of flax):

    pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cc && cd /tmp/cc && unzip -q *.whl
    python -m train.chat_corpus /tmp/cc/chatterbot_corpus/data/english
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from importlib import resources
from pathlib import Path

FILE = "chatterbot_en.jsonl.gz"
HELDOUT_FRACTION = 0.1


def path() -> Path:
  """Where the shipped corpus lies."""
  return Path(str(resources.files("train") / "corpora" / FILE))


def _split(messages: list[dict]) -> str:
  digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).digest()
  return "heldout" if int.from_bytes(digest[:8], "big") < HELDOUT_FRACTION * 2**64 else "train"


def convert(english_dir: str | Path) -> list[dict]:
  """The rows of the shipped file, from the package's English YAML folder."""
  import yaml

  rows, seen = [], set()
  for f in sorted(Path(english_dir).glob("*.yml")):
    data = yaml.safe_load(f.read_text(encoding="utf-8"))
    category = f.stem
    for conv in data.get("conversations", []):
      if not conv or not all(isinstance(u, str) and u.strip() for u in conv):
        continue
      messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": u.strip()}
                  for i, u in enumerate(conv)]
      key = json.dumps(messages, sort_keys=True)
      if len(messages) < 2 or key in seen:
        continue
      seen.add(key)
      rows.append({"messages": messages, "category": category, "split": _split(messages)})
  return rows


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print(__doc__, file=sys.stderr)
    return 2
  rows = convert(argv[0])
  out = Path(__file__).parent / "corpora" / FILE
  with gzip.GzipFile(out, "wb", mtime=0) as f:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
  held = sum(r["split"] == "heldout" for r in rows)
  print(f"wrote {out}: {len(rows)} conversations ({held} held out)")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
