"""`jrt data prepare`: shards round-trip to the token stream, validation split, idempotence, redo of a
half-written output, bad input; the deterministic per-rank sampler."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jrt.training.data import COMPLETE_FILE, BatchSampler, TokenDataset, TokenStream, is_complete, read_index
from jrt.training.prepare import iter_documents, load_tokenizer, prepare_dataset, write_token_dataset

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox {i * 7} jumps over the lazy dog. Ünïcödé ✓ line {i}.\nSecond line {i}."
    for i in range(60)
)


@pytest.fixture
def corpus(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text(TEXT, encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps({"text": f"json document {i} with text"}) for i in range(15)) + "\n")
    return [str(a), str(b)]


def _expected_stream(tok, docs):
    out = []
    for d in docs:
        out.extend(tok(d, add_special_tokens=False)["input_ids"])
        out.append(tok.eos_token_id)
    return out


def test_prepare_round_trip(shared_data, corpus, tmp_path):
    out = tmp_path / "tok"
    index = prepare_dataset(corpus, out, "gpt2", workers=2, val_fraction=0.1, shard_tokens=300,
                            batch_docs=7, progress=False)
    tok = load_tokenizer("gpt2")
    docs = list(iter_documents(corpus))
    assert len(docs) == 75
    assert index["dtype"] == "uint16" and index["eos_id"] == 50256 and index["vocab_size"] == 50257
    assert len(index["train"]["shards"]) > 2  # several shards, documents cut across them
    train_docs = [d for i, d in enumerate(docs) if i % 10 != 0]
    val_docs = [d for i, d in enumerate(docs) if i % 10 == 0]
    for split, split_docs in (("train", train_docs), ("val", val_docs)):
        stream = TokenStream(out, split)
        assert stream.read(0, len(stream)).tolist() == _expected_stream(tok, split_docs)
        assert index[split]["documents"] == len(split_docs)
    # a re-run is a no-op (same index, files untouched)
    mtime = (out / "train_00000.bin").stat().st_mtime_ns
    assert prepare_dataset(corpus, out, "gpt2", workers=1, val_fraction=0.1, shard_tokens=300,
                           progress=False) == index
    assert (out / "train_00000.bin").stat().st_mtime_ns == mtime


def test_half_written_output_is_redone(shared_data, corpus, tmp_path):
    out = tmp_path / "tok"
    index = prepare_dataset(corpus, out, "gpt2", workers=1, shard_tokens=500, progress=False)
    reference = TokenStream(out, "train").read(0, index["train"]["tokens"])
    # simulate a killed run: marker gone, a shard truncated, a stray extra shard
    (out / COMPLETE_FILE).unlink()
    with open(out / "train_00000.bin", "r+b") as fh:
        fh.truncate(10)
    (out / "train_00099.bin").write_bytes(b"\0" * 8)
    assert not is_complete(out)
    with pytest.raises(ValueError, match="not a complete"):
        read_index(out)
    again = prepare_dataset(corpus, out, "gpt2", workers=1, shard_tokens=500, progress=False)
    assert again == index and not (out / "train_00099.bin").exists()
    assert np.array_equal(TokenStream(out, "train").read(0, index["train"]["tokens"]), reference)
    # other options on a complete output: refuse unless --overwrite
    with pytest.raises(ValueError, match="other inputs or options"):
        prepare_dataset(corpus, out, "gpt2", workers=1, shard_tokens=400, progress=False)
    prepare_dataset(corpus, out, "gpt2", workers=1, shard_tokens=400, overwrite=True, progress=False)


def test_bad_inputs(shared_data, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="empty"):
        prepare_dataset([str(empty)], tmp_path / "o1", "gpt2", workers=1, progress=False)
    one = tmp_path / "one.txt"
    one.write_text("just one paragraph")
    with pytest.raises(ValueError, match="at least 2"):
        prepare_dataset([str(one)], tmp_path / "o2", "gpt2", workers=1, progress=False)
    with pytest.raises(FileNotFoundError):
        prepare_dataset([str(tmp_path / "missing*.txt")], tmp_path / "o3", "gpt2", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_dataset([str(one)], tmp_path / "o4", "gpt2", val_fraction=1.5, progress=False)


def test_cli_prepare(shared_data, corpus, tmp_path, capsys):
    import argparse

    from jrt.training.cli import register

    parser = argparse.ArgumentParser(prog="jrt")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "prepare", "--input", *corpus, "--output", str(tmp_path / "o"),
                              "--workers", "1", "--no-progress"])
    assert args.func(args) == 0
    assert "train tokens" in capsys.readouterr().out
    assert is_complete(tmp_path / "o")


def test_pretokenized_dataset_windows_and_uint32(tmp_path):
    docs = [list(range(i, i + 10)) for i in range(40)]
    index = write_token_dataset(docs, tmp_path / "d", vocab_size=70_000, eos_id=69_999, val_fraction=0.25,
                                shard_tokens=37)
    assert index["dtype"] == "uint32"
    ds = TokenDataset(tmp_path / "d", seq_len=16)
    stream = TokenStream(tmp_path / "d").read(0, index["train"]["tokens"])
    assert len(ds) == (len(stream) - 1) // 16
    for i in (0, 3, len(ds) - 1):
        assert ds[i].tolist() == stream[i * 16: i * 16 + 17].tolist()
    with pytest.raises(ValueError, match="too few"):
        TokenDataset(tmp_path / "d", seq_len=10_000)
    with pytest.raises(ValueError, match="outside"):
        write_token_dataset([[1, 2], [3, 99]], tmp_path / "e", vocab_size=50, eos_id=0)


def test_sampler_ranks_partition_global_batch():
    one = BatchSampler(num_sequences=50, global_batch_size=8, seed=1)
    two = [BatchSampler(50, 8, 1, rank=r, world_size=2) for r in range(2)]
    for step in (0, 5, 6, 13):  # crosses epoch boundaries (50 is not a multiple of 8)
        glob = one.global_indices(step)
        assert two[0].rank_indices(step) + two[1].rank_indices(step) == glob
    first_epoch = [i for s in range(7) for _, i in one.global_indices(s)][:50]
    assert sorted(first_epoch) == list(range(50))
    assert one.position(7) == {"sequences_consumed": 56, "epoch": 1, "index_in_epoch": 6}


def test_hf_dataset_input(shared_data, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [f"document number {i} has some words" for i in range(30)] + [""]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": rows})}).save_to_disk(tmp_path / "ds")
    index = prepare_dataset([f"hf:{tmp_path / 'ds'}@train"], tmp_path / "o", "gpt2", workers=1, val_fraction=0.1,
                            progress=False)
    assert (index["train"]["documents"], index["val"]["documents"]) == (27, 3)
    tok = load_tokenizer("gpt2")
    stream = TokenStream(tmp_path / "o", "val")
    assert stream.read(0, len(stream)).tolist() == _expected_stream(tok, [rows[0], rows[10], rows[20]])
