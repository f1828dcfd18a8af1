"""Synthetic recall data: set disjointness (SD) and multi-query associative recall (MQAR).

Every generator is vectorised (one batched tensor program, no per-example Python loop), seeded (the same
seed gives the same tensors on every machine: sampling runs on a CPU ``torch.Generator``) and returns a
:class:`SyntheticBatch`, whose ``labels`` are aligned with ``input_ids``: ``labels[b, i]`` is the token the
model must predict *from position i* (no shift is applied by the trainer) and ``-100`` everywhere the loss
is not taken.

Token layout (both tasks): id 0 is padding / "no query here", ids ``1 .. NUM_SPECIAL-1`` are separators, and
ids ``NUM_SPECIAL .. vocab_size-1`` are the content vocabulary, split into a lower and an upper half.

**SD** (the authors' generator, ``synthetic/zoology/data/non_autoreg.py`` of their repository)::

    [1] a_1 .. a_n [2] b_1 .. b_m [3]        -> label at [3]: the one element shared by A and B
    [1] A [2] B [1] A [2] B [3]              (read twice)

For every example a fresh random permutation of the content vocabulary is split into two halves; A (the
first set, ``n`` tokens) is drawn from the first half and B (``m`` tokens) from the second, then one element of
B is overwritten by an element of A, so ``|A & B| = 1``. Because the halves are random per example, the
position of a token in the vocabulary says nothing about which set it belongs to: finding the shared element
needs a memory of A (or of B). "Short first" means ``n < m``; the authors' pairs list both orders, e.g.
(4, 16) and (16, 4).

**MQAR** (Zoology style)::

    k_1 v_1 .. k_P v_P  0 .. k_i 0 .. k_j 0 ..   -> labels at the queried keys: their values
    k_1 v_1 .. k_P v_P  k_1 v_1 .. k_P v_P  0 .. k_i ..   (read twice: the key-value block repeated)

Keys are drawn without replacement from the lower half, values from the upper half; each key is queried once,
at slots whose distance from the context follows a power law (``p(g) ~ g^(alpha-1)``, short gaps frequent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Padding / filler id and the number of reserved (non-content) ids at the bottom of the vocabulary.
PAD_ID = 0
NUM_SPECIAL = 4
SEP_A, SEP_B, SEP_QUERY = 1, 2, 3
IGNORE_INDEX = -100

SD_ORDERS = ("short_first", "long_first")
#: Rows generated per chunk (the per-example permutations of a chunk are one ``[rows, V]`` argsort).
_SD_CHUNK = 2048


@dataclass
class SyntheticBatch:
    """A batch of synthetic sequences.

    Attributes:
        input_ids: int64 ``[N, T]``.
        labels: int64 ``[N, T]``, aligned with ``input_ids`` (the target predicted at position ``i``), -100
            where no loss is taken.
        prefix_lengths: int64 ``[N]``: the number of leading tokens a JRT-RNN reads non-causally (the sets for
            SD, the key-value block(s) for MQAR).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    prefix_lengths: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def slice(self, start: int, stop: int) -> SyntheticBatch:
        """Rows ``start:stop`` of every tensor."""
        return SyntheticBatch(
            self.input_ids[start:stop], self.labels[start:stop], self.prefix_lengths[start:stop]
        )

    def index(self, rows: torch.Tensor) -> SyntheticBatch:
        """The rows selected by an index tensor."""
        return SyntheticBatch(self.input_ids[rows], self.labels[rows], self.prefix_lengths[rows])

    def to(self, device: torch.device | str) -> SyntheticBatch:
        return SyntheticBatch(
            self.input_ids.to(device), self.labels.to(device), self.prefix_lengths.to(device)
        )


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def _sample_distinct(num: int, count: int, low: int, high: int, gen: torch.Generator) -> torch.Tensor:
    """``[num, count]`` ids, distinct within each row, uniform over ``[low, high)``."""
    perm = torch.rand(num, high - low, generator=gen).argsort(dim=1)[:, :count]
    return perm + low


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def sd_seq_len(first_size: int, second_size: int, read_twice: bool = False) -> int:
    """Length of an SD sequence: ``n + m + 3`` tokens, ``2 (n + m + 2) + 1`` when read twice."""
    body = first_size + second_size + 2
    return (2 * body if read_twice else body) + 1


def sd_halves(vocab_size: int) -> tuple[int, int]:
    """Sizes of the two halves of the content vocabulary that A and B are drawn from (the first half has
    ``vocab_size // 2`` ids, the second the rest of the ``vocab_size - NUM_SPECIAL`` content ids)."""
    first = vocab_size // 2
    return first, vocab_size - NUM_SPECIAL - first


def make_sd(
    num_examples: int,
    first_size: int,
    second_size: int,
    vocab_size: int,
    *,
    read_twice: bool = False,
    seed: int = 0,
) -> SyntheticBatch:
    """Set-disjointness sequences ``[1] A [2] B [3]`` with ``|A| = first_size``, ``|B| = second_size`` and exactly
    one element shared by A and B, drawn as the authors do (a fresh permutation of the vocabulary per example).

    Args:
        num_examples: number of sequences N.
        first_size, second_size: the sizes of the set read first (A) and second (B).
        vocab_size: total vocabulary, including the ``NUM_SPECIAL`` reserved ids.
        read_twice: emit ``[1] A [2] B [1] A [2] B [3]`` (JRT-Prompt).
        seed: the sequences are a deterministic function of all arguments.

    Returns:
        A :class:`SyntheticBatch` with ``input_ids`` ``[N, sd_seq_len(...)]``, one label per row (at the
        final ``[3]``) and ``prefix_lengths`` = everything before that final ``[3]``.
    """
    _check_positive("num_examples", num_examples)
    _check_positive("first_size", first_size)
    _check_positive("second_size", second_size)
    half_a, half_b = sd_halves(vocab_size)
    if first_size > half_a or second_size > half_b:
        raise ValueError(
            f"set sizes ({first_size}, {second_size}) do not fit the halves of the content vocabulary "
            f"({half_a}, {half_b} of vocab_size {vocab_size}): sets cannot be drawn without repeats"
        )
    gen = _generator(seed)
    content = vocab_size - NUM_SPECIAL
    a_parts, b_parts = [], []
    for start in range(0, num_examples, _SD_CHUNK):
        rows = min(_SD_CHUNK, num_examples - start)
        perm = torch.rand(rows, content, generator=gen).argsort(dim=1) + NUM_SPECIAL  # a fresh permutation per row
        # the first entries of each (randomly ordered) half: a uniform draw without replacement from that half
        a_parts.append(perm[:, :first_size])
        b_parts.append(perm[:, half_a : half_a + second_size])
    a, b = torch.cat(a_parts), torch.cat(b_parts)
    rows = torch.arange(num_examples)
    answer = a[rows, torch.randint(0, first_size, (num_examples,), generator=gen)]
    b[rows, torch.randint(0, second_size, (num_examples,), generator=gen)] = answer
    col = lambda tok: torch.full((num_examples, 1), tok, dtype=torch.long)  # noqa: E731
    body = torch.cat([col(SEP_A), a, col(SEP_B), b], dim=1)
    parts = [body, body] if read_twice else [body]
    input_ids = torch.cat([*parts, col(SEP_QUERY)], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, -1] = answer
    prefix = torch.full((num_examples,), input_ids.shape[1] - 1, dtype=torch.long)
    return SyntheticBatch(input_ids, labels, prefix)


def make_sd_mixed(
    num_examples: int,
    short_size: int,
    long_size: int,
    vocab_size: int,
    *,
    short_first: float = 0.5,
    read_twice: bool = False,
    seed: int = 0,
) -> SyntheticBatch:
    """SD sequences of one set-size pair in both orders: ``round(short_first * N)`` rows with the short set
    first, the rest with the long set first, rows shuffled (all rows have the same length)."""
    _check_positive("num_examples", num_examples)
    if not 0.0 <= short_first <= 1.0:
        raise ValueError(f"short_first must be in [0, 1], got {short_first!r}")
    if short_size > long_size:
        raise ValueError(f"short_size ({short_size}) must not exceed long_size ({long_size})")
    n_short = round(short_first * num_examples)
    parts = []
    if n_short:
        parts.append(make_sd(n_short, short_size, long_size, vocab_size, read_twice=read_twice, seed=seed))
    if num_examples - n_short:
        parts.append(make_sd(num_examples - n_short, long_size, short_size, vocab_size, read_twice=read_twice,
                             seed=seed + 7919))
    batch = SyntheticBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("input_ids", "labels", "prefix_lengths")))
    return batch.index(torch.randperm(num_examples, generator=_generator(seed + 104729)))


def sd_first_sizes(input_ids: torch.Tensor) -> torch.Tensor:
    """``|A|`` per row of SD sequences ``[N, T]``: the position of the first ``[2]`` minus one."""
    return (input_ids == SEP_B).int().argmax(dim=1) - 1


def sd_prediction_sets(input_ids: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where SD answers come from: whether each predicted token is in the first set read and in the second.

    Args:
        input_ids: SD sequences ``[N, T]`` (single or read twice: the sets of the first read are used).
        predictions: the predicted answer token per row, ``[N]``.

    Returns:
        ``(in_first, in_second)``, bool ``[N]`` each (the right answer is in both).
    """
    t = input_ids.shape[1]
    pos = torch.arange(t, device=input_ids.device)
    first_b = (input_ids == SEP_B).int().argmax(dim=1, keepdim=True)
    after_b = pos > first_b
    ends = ((input_ids == SEP_A) | (input_ids == SEP_QUERY)) & after_b
    end = torch.where(ends.any(dim=1, keepdim=True), ends.int().argmax(dim=1, keepdim=True), t)
    match = input_ids == predictions[:, None]
    in_first = (match & (pos > 0) & (pos < first_b)).any(dim=1)
    in_second = (match & after_b & (pos < end)).any(dim=1)
    return in_first, in_second


def mqar_seq_len(num_pairs: int, seq_len: int, read_twice: bool = False) -> int:
    """Length of an MQAR sequence: ``seq_len``, plus ``2 * num_pairs`` when read twice."""
    return seq_len + (2 * num_pairs if read_twice else 0)


def _power_law_slots(num: int, count: int, slots: int, power_a: float, gen: torch.Generator) -> torch.Tensor:
    """``[num, count]`` distinct slot indices (gap - 1) in ``0..slots-1`` per row, drawn without replacement with
    ``p(gap) ~ gap^(power_a - 1)`` (Gumbel top-k)."""
    gaps = torch.arange(1, slots + 1, dtype=torch.float64)
    logp = (power_a - 1.0) * torch.log(gaps)
    gumbel = -torch.log(-torch.log(torch.rand(num, slots, generator=gen, dtype=torch.float64)))
    return (logp + gumbel).topk(count, dim=1).indices


def make_mqar(
    num_examples: int,
    num_pairs: int,
    seq_len: int,
    vocab_size: int,
    *,
    read_twice: bool = False,
    power_a: float = 0.01,
    seed: int = 0,
) -> SyntheticBatch:
    """Multi-query associative recall sequences (Zoology style).

    Args:
        num_examples: number of sequences N.
        num_pairs: key-value pairs P per sequence; every key is queried once.
        seq_len: length of a single-read sequence: ``2P`` context tokens plus the query region, which must
            hold ``P`` queries at distinct even offsets (``seq_len >= 4P``).
        vocab_size: total vocabulary; keys come from the lower half of the content ids, values from the upper.
        read_twice: repeat the key-value block before the queries (length grows by ``2P``).
        power_a: the exponent ``alpha`` of the power-law over query gaps (Zoology's default 0.01).
        seed: the sequences are a deterministic function of all arguments.

    Returns:
        A :class:`SyntheticBatch`: ``input_ids`` ``[N, mqar_seq_len(...)]``, labels (the values) at the ``P``
        query positions, ``prefix_lengths`` = the key-value block(s).
    """
    _check_positive("num_examples", num_examples)
    _check_positive("num_pairs", num_pairs)
    _check_positive("seq_len", seq_len)
    if not power_a > 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")
    half = (vocab_size - NUM_SPECIAL) // 2
    if num_pairs > half:
        raise ValueError(
            f"num_pairs ({num_pairs}) is larger than half the content vocabulary ({half} of vocab_size "
            f"{vocab_size}): keys cannot be distinct"
        )
    if seq_len < 4 * num_pairs:
        raise ValueError(
            f"seq_len ({seq_len}) is too short for {num_pairs} key-value pairs and their queries: "
            f"need at least 4 * num_pairs = {4 * num_pairs}"
        )
    gen = _generator(seed)
    keys = _sample_distinct(num_examples, num_pairs, NUM_SPECIAL, NUM_SPECIAL + half, gen)
    values = _sample_distinct(num_examples, num_pairs, NUM_SPECIAL + half, NUM_SPECIAL + 2 * half, gen)
    kv = torch.stack([keys, values], dim=2).reshape(num_examples, 2 * num_pairs)
    query_len = seq_len - 2 * num_pairs
    chosen = _power_law_slots(num_examples, num_pairs, query_len // 2, power_a, gen)
    queries = torch.zeros(num_examples, query_len, dtype=torch.long)
    labels_q = torch.full((num_examples, query_len), IGNORE_INDEX, dtype=torch.long)
    pos = 2 * chosen
    queries.scatter_(1, pos, keys)
    labels_q.scatter_(1, pos, values)
    blocks = [kv, kv] if read_twice else [kv]
    context = torch.cat(blocks, dim=1)
    input_ids = torch.cat([context, queries], dim=1)
    labels = torch.cat([torch.full_like(context, IGNORE_INDEX), labels_q], dim=1)
    prefix = torch.full((num_examples,), context.shape[1], dtype=torch.long)
    return SyntheticBatch(input_ids, labels, prefix)
