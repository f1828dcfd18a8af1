"""``jrt bench decode``: per-token decode time and decoding-state memory against context length.

Two models of the same shape (d_model, layers, heads, SwiGLU width, GPT-2 vocabulary, tied head):

* ``jrt``: :class:`jrt.models.JRTForCausalLM` with the published layer pattern (layer ``i % 5 == 1`` prefix
  linear attention, ``i % 5 == 2`` sliding window, the rest BaseConv), decoding from its recurrent cache;
* ``llama``: ``transformers``' ``LlamaForCausalLM`` (SDPA attention, rotary) decoding from its ``DynamicCache``
  (the default of ``generate()``).

For each context length ``L`` and batch ``B`` the models hold the decoding state of an ``L``-token context and
decode ``--steps`` tokens one at a time; the row reports the median seconds per decode step (one new token for
each of the ``B`` sequences) and the state bytes. The ``L``-token state is synthesised instead of prefilled
(prefill is what ``jrt bench prefill`` measures, and a quadratic 32k prefill of the baseline on a CPU would take
hours): the Llama cache gets ``L`` random keys/values per layer at positions ``0..L-1``; the JRT cache comes from a
real prefill of ``min(L, 256)`` random tokens, after which its sliding-window positions are shifted to end at
``L``. Both give decode steps with exactly the work and memory traffic of a real ``L``-token context: a JRT state
has the same shapes for every ``L`` (that is the point), and Llama attends over all ``L`` cached positions.
The JRT states of all context lengths are small, so their decode steps are interleaved (one step per context in
turn) to expose every length to the same machine load; the Llama rows run one after the other.

``--pretrained [LABEL=]MODEL ...`` measures real models instead (anything ``jrt eval --model`` loads: a Hub id, a
local folder such as a ``jrt linearize`` student, or ``smollm2-135m``): each is prefilled with a real
``L``-token random prompt (``logits_to_keep=1``), then decodes from its own cache (a ``DynamicCache`` for a
Transformer, the recurrent cache for a JRT or linearized model); the state bytes are those of every tensor the
cache holds. The summary gives each model's time per token and state against the first model's.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

from jrt.bench import write_json

DEFAULT_CONTEXTS = (1024, 4096, 16384, 32768)
DEFAULT_BATCHES = (1, 8)
PREFILL_TOKENS = 256


def _jrt_mixers(layers: int) -> list[str]:
    return ["pla" if i % 5 == 1 else "swa" if i % 5 == 2 else "base_conv" for i in range(layers)]


def build_models(hidden_size: int, layers: int, heads: int, seed: int = 0) -> tuple[Any, Any]:
    """The JRT and Llama-style models (float32, eval mode) of one shape."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jrt.models import JRTConfig, JRTForCausalLM

    torch.manual_seed(seed)
    jrt_config = JRTConfig(
        hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=heads, mixers=_jrt_mixers(layers),
        intermediate_size=2 * hidden_size,
    )
    jrt_model = JRTForCausalLM(jrt_config).eval()
    llama_config = LlamaConfig(
        vocab_size=jrt_config.vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=1 << 17, tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256,
    )
    llama_config._attn_implementation = "sdpa"
    llama = LlamaForCausalLM(llama_config).eval()
    return jrt_model, llama


def _jrt_state(model, context: int, batch: int):
    """A JRT cache holding the state of a ``context``-token prompt (see the module docstring)."""
    import torch

    from jrt.layers import SlidingWindowState

    cache = model.make_cache(batch)
    prompt = min(context, PREFILL_TOKENS)
    ids = torch.randint(0, 50257, (batch, prompt))
    model(ids, cache=cache, logits_to_keep=1)
    shift = context - prompt
    for state in cache.layers:
        if isinstance(state, SlidingWindowState) and shift:
            ring = state.cache
            ring.positions = torch.where(ring.positions >= 0, ring.positions + shift, ring.positions)
            ring.length = ring.length + shift
    cache.num_positions = context
    cache.seen_tokens = cache.seen_tokens + shift
    return cache


def _llama_state(model, context: int, batch: int):
    """A ``DynamicCache`` with ``context`` random keys/values per layer (float32)."""
    import torch
    from transformers import DynamicCache

    config = model.config
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # transformers 4.x
        cache = DynamicCache()
    head_dim = config.hidden_size // config.num_attention_heads
    shape = (batch, config.num_key_value_heads, context, head_dim)
    for layer in range(config.num_hidden_layers):
        cache.update(torch.randn(shape) * 0.5, torch.randn(shape), layer)
    return cache


def _cache_bytes(cache) -> int:
    import torch

    seen, total = set(), 0
    stack = [cache]
    while stack:  # every tensor reachable from the cache object (keys/values per layer)
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


def _cache_keyword(model) -> str:
    """The name under which ``model.forward`` takes its cache (``cache`` or ``past_key_values``, by transformers
    version)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    """The cache of a model output, whichever field name the installed transformers uses."""
    cache = getattr(out, "past_key_values", None)
    return cache if cache is not None else getattr(out, "cache", None)


def _row(model_name: str, context: int, batch: int, times: list[float], state_bytes: int) -> dict[str, Any]:
    seconds = statistics.median(times)
    return {
        "model": model_name, "context": context, "batch": batch, "seconds_per_token": seconds,
        "tokens_per_second": batch / seconds, "state_bytes": state_bytes,
    }


def measure_jrt(model, contexts: list[int], batch: int, steps: int, warmup: int) -> list[dict[str, Any]]:
    """JRT rows for every context at once: the (small, constant-size) states of all contexts are built first and
    their decode steps interleaved, so that load changes on a shared machine hit every context alike."""
    import torch

    with torch.inference_mode():
        caches = {context: _jrt_state(model, context, batch) for context in contexts}
        tokens = {context: torch.randint(0, 50257, (batch, 1)) for context in contexts}
        times: dict[int, list[float]] = {context: [] for context in contexts}
        for step in range(warmup + steps):
            order = contexts if step % 2 == 0 else contexts[::-1]
            for context in order:
                start = time.perf_counter()
                logits = model(tokens[context], cache=caches[context]).logits
                tokens[context] = logits[:, -1:].argmax(-1)
                if step >= warmup:
                    times[context].append(time.perf_counter() - start)
    return [_row("jrt", c, batch, times[c], caches[c].nbytes()) for c in contexts]


def measure_llama(model, context: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Median seconds per decode step of the Llama baseline with a ``context``-token KV cache."""
    import torch

    cache_arg = _cache_keyword(model)
    with torch.inference_mode():
        cache = _llama_state(model, context, batch)
        state_bytes = _cache_bytes(cache)
        token = torch.randint(0, 50257, (batch, 1))
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            position = torch.full((batch, 1), context + step, dtype=torch.long)
            logits = model(token, position_ids=position, use_cache=True, **{cache_arg: cache}).logits
            token = logits[:, -1:].argmax(-1)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    del cache
    gc.collect()
    return _row("llama", context, batch, times, state_bytes)


def parse_pretrained(specs: list[str]) -> dict[str, str]:
    """``["[LABEL=]MODEL", ...]`` -> ``{label: model}`` (the label defaults to the model's last path part)."""
    out: dict[str, str] = {}
    for spec in specs:
        label, sep, model = spec.partition("=")
        if not sep:
            label, model = spec.rstrip("/").split("/")[-1] or spec, spec
        if not label or not model:
            raise ValueError(f"--pretrained takes [LABEL=]MODEL, got {spec!r}")
        if label in out:
            raise ValueError(f"--pretrained label {label!r} given twice; name them with LABEL=MODEL")
        out[label] = model
    return out


def measure_pretrained(label: str, model, context: int, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Prefill ``batch`` random prompts of ``context`` tokens, then time ``steps`` decode steps (median)."""
    import torch

    keyword = _cache_keyword(model)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(context + batch)
    with torch.inference_mode():
        ids = torch.randint(0, vocab, (batch, context), generator=generator)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = _returned_cache(out)
        if cache is None:
            raise ValueError(f"{label}: the model returned no cache after prefill")
        token = out.logits[:, -1:].argmax(-1)
        state_bytes = _cache_bytes(cache)
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{keyword: cache})
            returned = _returned_cache(out)
            cache = cache if returned is None else returned
            token = out.logits[:, -1:].argmax(-1)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    del cache, out
    gc.collect()
    return _row(label, context, batch, times, state_bytes)


def summarise_pretrained(rows: list[dict[str, Any]]) -> list[str]:
    """Each model against the first one, per context and batch: decode time and state ratios."""
    labels = list(dict.fromkeys(r["model"] for r in rows))
    index = {(r["model"], r["context"], r["batch"]): r for r in rows}
    lines = []
    for (label, context, batch), row in index.items():
        base = index.get((labels[0], context, batch))
        if label == labels[0] or base is None:
            continue
        lines.append(
            f"batch {batch}, context {context}: {label} decodes at {row['seconds_per_token'] * 1e3:.1f} ms/token, "
            f"{base['seconds_per_token'] / row['seconds_per_token']:.2f}x the speed of {labels[0]}, with "
            f"{row['state_bytes'] / base['state_bytes']:.3f}x its state ({row['state_bytes'] / 2**20:.1f} vs "
            f"{base['state_bytes'] / 2**20:.1f} MiB)"
        )
    return lines


def llama_cache_bytes(hidden_size: int, layers: int, context: int, batch: int) -> int:
    """float32 keys and values of every layer: ``2 * layers * batch * context * hidden_size * 4``."""
    return 2 * layers * batch * context * hidden_size * 4


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets: flat JRT decode time, speed-up and state ratio at the longest context."""
    lines = []
    index = {(r["model"], r["context"], r["batch"]): r for r in rows if "seconds_per_token" in r}
    contexts = sorted({r["context"] for r in rows})
    for batch in sorted({r["batch"] for r in rows}):
        short, long = contexts[0], contexts[-1]
        jrt_short, jrt_long = index.get(("jrt", short, batch)), index.get(("jrt", long, batch))
        llama_long = index.get(("llama", long, batch))
        if jrt_short and jrt_long:
            ratio = jrt_long["seconds_per_token"] / jrt_short["seconds_per_token"]
            lines.append(f"batch {batch}: jrt time/token at {long} vs {short}: {ratio:.2f}x (target <= 1.3x)")
        if jrt_long and llama_long:
            speed = llama_long["seconds_per_token"] / jrt_long["seconds_per_token"]
            state = llama_long["state_bytes"] / jrt_long["state_bytes"]
            lines.append(
                f"batch {batch}: at {long}: jrt decodes {speed:.1f}x faster (target >= 3x) and holds "
                f"{state:.0f}x less state (target >= 10x)"
            )
    return lines


def _run_synthetic(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, int]]:
    from tqdm import tqdm

    models = dict(zip(("jrt", "llama"), build_models(args.hidden_size, args.layers, args.heads, args.seed)))
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(args.batches) * len(args.contexts) * len(args.models), desc="decode bench",
              unit="row") as progress:
        for batch in args.batches:
            if "jrt" in args.models:
                rows += measure_jrt(models["jrt"], list(args.contexts), batch, args.steps, args.warmup)
                progress.update(len(args.contexts))
            if "llama" not in args.models:
                continue
            for context in args.contexts:
                need = llama_cache_bytes(args.hidden_size, args.layers, context, batch)
                if need > args.max_cache_gb * 2**30:
                    rows.append({"model": "llama", "context": context, "batch": batch,
                                 "skipped": f"KV cache {need / 2**30:.1f} GiB > --max-cache-gb {args.max_cache_gb}"})
                else:
                    rows.append(measure_llama(models["llama"], context, batch, args.steps, args.warmup))
                progress.update(1)
    return rows, params


def _run_pretrained(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, int]]:
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    from jrt.models.loading import load_model, resolve_model_source

    hf_logging.set_verbosity_error()
    specs = parse_pretrained(args.pretrained)
    models = {}
    for label, name in specs.items():
        source, gguf = resolve_model_source(name)
        models[label] = load_model(source, gguf, "cpu", "float32")
    params = {label: sum(p.numel() for p in m.parameters()) for label, m in models.items()}
    rows = []
    with tqdm(total=len(args.batches) * len(args.contexts) * len(models), desc="decode bench", unit="row") as bar:
        for batch in args.batches:
            for context in args.contexts:
                for label, model in models.items():
                    rows.append(measure_pretrained(label, model, context, batch, args.steps, args.warmup))
                    bar.update(1)
    return rows, params


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    for name in ("steps", "hidden_size", "layers", "heads"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.hidden_size % args.heads:
        raise ValueError("--hidden-size must be divisible by --heads")
    if any(c < 1 for c in args.contexts) or any(b < 1 for b in args.batches):
        raise ValueError("context lengths and batch sizes must be >= 1")
    if args.pretrained:
        rows, params = _run_pretrained(args)
    else:
        rows, params = _run_synthetic(args)
    width = max(6, *(len(r["model"]) for r in rows))
    print(f"{'model':{width}} {'context':>8} {'batch':>5} {'ms/step':>9} {'tok/s':>9} {'state MiB':>10}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:{width}} {r['context']:>8} {r['batch']:>5} skipped: {r['skipped']}")
            continue
        print(f"{r['model']:{width}} {r['context']:>8} {r['batch']:>5} {r['seconds_per_token'] * 1e3:>9.2f} "
              f"{r['tokens_per_second']:>9.1f} {r['state_bytes'] / 2**20:>10.2f}")
    summary = summarise_pretrained(rows) if args.pretrained else summarise(rows)
    for line in summary:
        print(line)
    if args.json:
        payload = {
            "rows": rows,
            "summary": summary,
            "config": {"pretrained": parse_pretrained(args.pretrained) if args.pretrained else None,
                       "hidden_size": args.hidden_size, "layers": args.layers, "heads": args.heads,
                       "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
                       "parameters": params, "device": "cpu", "torch": torch.__version__},
        }
        write_json(args.json, payload)
    return 0


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    parser = bench_subparsers.add_parser(
        "decode",
        help="per-token decode time and state memory vs context: JRT-RNN against a Llama-style KV cache (CPU)",
        description="Per-token decode time and decoding-state memory against context length, on the CPU: "
        "JRT-RNN (recurrent cache) against a transformers Llama-style model of the same shape (SDPA, KV cache).",
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=list(DEFAULT_CONTEXTS), metavar="L",
                        help="context lengths (default: 1024 4096 16384 32768)")
    parser.add_argument("--batches", type=int, nargs="+", default=list(DEFAULT_BATCHES), metavar="B",
                        help="batch sizes (default: 1 8)")
    parser.add_argument("--models", nargs="+", choices=("jrt", "llama"), default=["jrt", "llama"])
    parser.add_argument("--pretrained", nargs="+", default=None, metavar="[LABEL=]MODEL",
                        help="measure these real models instead (Hub id, local folder such as a jrt linearize "
                        "student, or smollm2-135m), each prefilled with a real random prompt; the first is the "
                        "baseline of the summary")
    parser.add_argument("--hidden-size", type=int, default=256, help="d_model of both models (default 256)")
    parser.add_argument("--layers", type=int, default=8, help="layers of both models (default 8)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4: head dim 64)")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: decode steps are small, and more threads than free cores "
                        "slow every step down; 0 = torch's choice)")
    parser.add_argument("--max-cache-gb", type=float, default=6.0,
                        help="skip Llama rows whose KV cache would exceed this many GiB (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="F", help="write {'rows': [...]} to this file")
    parser.set_defaults(func=run)
