"""Small shared helpers for the tests (fixtures live in conftest.py)."""

import json
from pathlib import Path

DEMO_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "self_instruct_seed_tasks.jsonl"


def seed_tasks(n: int) -> list[dict]:
    """The first n self-instruct seed tasks (real instruction data shipped for the demo)."""
    with DEMO_DATA.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


# Tokens of the tiny proxy's vocabulary: the full GPT-2 vocabulary (50257) makes the LM head and its log-softmax
# most of every test's time; with 4096 a tiny training is about ten times faster.
TINY_VOCAB = 4096


def write_gpt2_bpe(vocab_file: Path, merges_file: Path, folder: Path, size: int) -> None:
    """GPT-2's byte-level BPE cut to its first `size` tokens, as `vocab.json` and `merges.txt` in `folder`: the 256
    byte tokens, the first `size - 257` merges (GPT-2's token 256 + i is the result of merge i) and
    `<|endoftext|>` as the last token. Every text still encodes (into more, shorter tokens)."""
    eos = "<|endoftext|>"
    full = json.loads(vocab_file.read_text(encoding="utf-8"))
    header, *merges = [line for line in merges_file.read_text(encoding="utf-8").split("\n") if line]
    kept = merges[: size - 257]
    vocab = {token: i for token, i in full.items() if i < size - 1 and token != eos}
    assert len(vocab) == size - 1 and all(vocab["".join(m.split(" "))] == 256 + i for i, m in enumerate(kept))
    vocab[eos] = size - 1
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([header, *kept]) + "\n", encoding="utf-8")


def write_tiny_gpt2(folder: Path, vocab_size: int, **config) -> None:
    """A tiny randomly initialised (seed 0) GPT-2 whose last token is `<|endoftext|>`, into `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, vocab_size=vocab_size,
                        bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, **config)
    GPT2LMHeadModel(config).save_pretrained(folder)


def imported(module: str) -> bool:
    """Whether this process has imported `module` (run in a worker process)."""
    import sys

    return module in sys.modules
