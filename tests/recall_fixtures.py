"""Small local recall-task files and tiny random models shared by the evaluation tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from jrt.paths import data_path

FILLER = (
    "The committee reviewed the annual report and discussed the budget for the coming year. "
    "Several members raised questions about maintenance of the old library building. "
)


def gpt2_tokenizer():
    """The offline GPT-2 tokenizer (left padding, pad = eos), or None when the data folder is absent."""
    folder = data_path("tokenizers", "gpt2")
    if not folder.is_dir():
        return None
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.padding_side = "left"
    tok.pad_token = tok.eos_token
    tok.model_max_length = int(1e12)
    return tok


def write_recall_files(folder: Path, n: int = 4) -> Path:
    """``fda.jsonl``, ``squad.jsonl`` and ``nq.jsonl`` with ``n`` short records each (stand-in schemas).

    Some answers are common letter pairs ("an", "re", "in") so that a random model's ``contains`` varies.
    """
    folder.mkdir(parents=True, exist_ok=True)
    short = ["an", "re", "in", "on", "er", "at"]
    fda, squad, nq = [], [], []
    for i in range(n):
        value = f"K{1000 + i}" if i % 2 else short[i % len(short)]
        text = f"{FILLER * (1 + i % 2)}A. 510(k) Number: {value}\nB. Applicant: Company {i}\n{FILLER}"
        fda.append({"doc_id": f"D{i}", "key": "510(k) number", "value": value, "text": text})
        answer = short[(i + 1) % len(short)] if i % 2 == 0 else f"Person {i}"
        ctx = f"{FILLER}The prize in year {1900 + i} went to {answer} for the discovery. {FILLER * (i % 3)}"
        squad.append({"id": f"s{i}", "title": "t", "context": ctx, "question": f"Who won in {1900 + i}?",
                      "answers": [answer]})
        nq.append({"id": f"nq-{i}", "question": f"who won the prize in {1900 + i}", "answers": [answer],
                   "context": f"Title: Prize\n{ctx}"})
    for name, rows in (("fda", fda), ("squad", squad), ("nq", nq)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def tiny_llama(vocab_size: int = 50257, max_positions: int = 4096, seed: int = 0):
    """A random 2-layer Llama (float32, eval mode) for the GPT-2 vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=50256, eos_token_id=50256,
        pad_token_id=50256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_mamba(vocab_size: int = 50257, seed: int = 0):
    """A random 2-layer Mamba (float32, eval mode) for the GPT-2 vocabulary."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(
        vocab_size=vocab_size, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4,
        bos_token_id=50256, eos_token_id=50256, pad_token_id=50256,
    )
    return MambaForCausalLM(config).eval()
