"""JRTForCausalLM: recurrent decoding equals one pass, left padding, generate(), save/load, presets, errors."""

from __future__ import annotations

import pytest
import torch

import jrt  # noqa: F401  (registers the Auto classes)
from helpers import rel_err
from jrt.models import JRTCache, JRTConfig, JRTForCausalLM, JRTModel

WINDOW, MAX_PREFIX = 8, 16




@pytest.fixture(scope="module")
def tiny() -> JRTForCausalLM:
    torch.manual_seed(0)
    # a larger init than the default 0.02 so that greedy continuations vary (stronger generation checks)
    config = JRTConfig.from_preset(
        "jrt-tiny", swa_window=WINDOW, max_prefix_length=MAX_PREFIX, initializer_range=0.3
    )
    return JRTForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prompt", [5, 12, 24])  # < window < max_prefix < prompt
def test_prefill_then_decode_equals_full_forward(tiny, tokens, prompt):
    with torch.no_grad():
        full = tiny(tokens, prefix_lengths=min(prompt, MAX_PREFIX), use_cache=False).logits
        cache = tiny.make_cache(2)
        steps = [tiny(tokens[:, :prompt], cache=cache).logits]
        steps += [tiny(tokens[:, i : i + 1], cache=cache).logits for i in range(prompt, tokens.shape[1])]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-4
    assert cache.num_positions == tokens.shape[1]


def test_default_prefix_is_the_capped_prompt(tiny, tokens):
    with torch.no_grad():
        short = tokens[:, :10]
        assert torch.equal(tiny(short).logits, tiny(short, prefix_lengths=10).logits)
        assert torch.equal(tiny(tokens).logits, tiny(tokens, prefix_lengths=MAX_PREFIX).logits)


def test_left_padded_batch_matches_each_prompt_alone(tiny, tokens):
    lengths = [7, 20, 13]
    prompts = [tokens[i % 2, :n] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.full((3, width), 50256, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        batched = tiny(ids, attention_mask=mask).logits
        for i, p in enumerate(prompts):
            alone = tiny(p[None]).logits
            assert rel_err(batched[i, width - len(p):], alone[0]) < 1e-4
        generated = tiny.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for i, p in enumerate(prompts):
            alone = tiny.generate(p[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(generated[i, width:], alone[0, len(p):])


def test_generate_equals_manual_greedy_decoding(tiny, tokens):
    prompt = tokens[:1, :20]
    with torch.no_grad():
        generated = tiny.generate(prompt, max_new_tokens=8, do_sample=False)
        seq = prompt
        for _ in range(8):
            logits = tiny(seq, prefix_lengths=MAX_PREFIX, use_cache=False).logits  # prefix: the capped prompt
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, seq)


def test_generate_sampling_eos_and_stop_strings(tiny, tokens, shared_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(shared_data / "tokenizers" / "gpt2"))
    prompt = tokens[:1, :10]
    with torch.no_grad():
        torch.manual_seed(3)
        sampled = tiny.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, temperature=1.0)
        torch.manual_seed(3)
        again = tiny.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, temperature=1.0)
        assert sampled.shape == (1, 15) and torch.equal(sampled, again)
        assert int(sampled.max()) < tiny.config.vocab_size
        # EOS and stop strings: replay a sampled continuation with its 4th token as the stop condition
        torch.manual_seed(5)
        reference = tiny.generate(prompt, max_new_tokens=8, do_sample=True, top_k=50)
        new = reference[0, 10:]
        stop = int(new[3])
        end = 10 + int((new == stop).nonzero()[0]) + 1
        torch.manual_seed(5)
        stopped = tiny.generate(prompt, max_new_tokens=8, do_sample=True, top_k=50, eos_token_id=stop)
        assert stopped.shape[1] == end and torch.equal(stopped[0], reference[0, :end])
        torch.manual_seed(5)
        by_string = tiny.generate(
            prompt, max_new_tokens=8, do_sample=True, top_k=50, stop_strings=[tokenizer.decode([stop])],
            tokenizer=tokenizer,
        )
        assert 10 < by_string.shape[1] <= end
        assert torch.equal(by_string[0], reference[0, : by_string.shape[1]])


def test_save_pretrained_round_trip(tiny, tokens, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    tiny.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path), JRTConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, JRTForCausalLM)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embeddings.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, tiny(tokens).logits)
    assert isinstance(AutoModel.from_pretrained(tmp_path), JRTModel)


def test_state_is_constant_in_context_length(tiny, tokens):
    sizes = []
    for length in (4, 40):
        cache = tiny.make_cache(2)
        with torch.no_grad():
            tiny(tokens[:, :length], cache=cache)
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1] == tiny.state_size_bytes(2)


def test_labels_give_the_shifted_next_token_loss(tiny, tokens):
    out = tiny(tokens, labels=tokens)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert abs(out.loss.item() - expected.item()) < 1e-5
    out.loss.backward()
    assert tiny.model.layers[1].mixer.proj_k_enc.weight.grad is not None
    tiny.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "name, params",
    [("jrt-360m", 356_578_304), ("jrt-1.3b", 1_375_143_168)],
)
def test_preset_parameter_counts_match_published(name, params):
    with torch.device("meta"):
        model = JRTForCausalLM(JRTConfig.from_preset(name))
    assert sum(p.numel() for p in model.parameters()) == params  # tied matrix counted once


def test_based_preset_is_jrt_without_encoder_projections():
    with torch.device("meta"):
        jrt_model = JRTForCausalLM(JRTConfig.from_preset("jrt-360m"))
        based = JRTForCausalLM(JRTConfig.from_preset("based-360m"))
    encoder = 5 * (16 * 16 * 1024 + 1024 * 1024)
    assert sum(p.numel() for p in jrt_model.parameters()) - sum(p.numel() for p in based.parameters()) == encoder
    assert based.config.mixers.count("based") == 5 and "pla" not in based.config.mixers


def test_based_tiny_ignores_prefix(tokens):
    model = JRTForCausalLM(JRTConfig.from_preset("based-tiny")).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens[:, :9]).logits, model(tokens[:, :9], prefix_lengths=0).logits)


def test_bad_inputs(tiny, tokens):
    with pytest.raises(ValueError, match="unknown preset"):
        JRTConfig.from_preset("jrt-7b")
    with pytest.raises(ValueError, match="unknown mixer"):
        JRTConfig(num_hidden_layers=2, mixers=["pla", "mamba"], hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="mixers lists"):
        JRTConfig(num_hidden_layers=3, mixers=["pla"], hidden_size=64, num_attention_heads=4)
    with pytest.raises(ValueError, match="prefix length larger than the sequence"):
        tiny(tokens[:, :5], prefix_lengths=6)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        tiny(tokens[:, :5], attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        tiny(tokens[:, :5], attention_mask=torch.full((2, 5), 2))
    cache = tiny.make_cache(2)
    with torch.no_grad():
        tiny(tokens[:, :5], cache=cache)
        with pytest.raises(ValueError, match="prefix_lengths must be None or 0"):
            tiny(tokens[:, 5:6], cache=cache, prefix_lengths=1)
        with pytest.raises(ValueError, match="cache holds 2 sequences"):
            tiny(tokens[:1, 5:6], cache=cache)
    with pytest.raises(ValueError, match="exactly one of"):
        tiny()
    assert isinstance(cache, JRTCache)


def test_beam_search_reorders_the_cache(tiny, tokens):
    # with a prompt longer than max_prefix_length the prefix is the same with and without the cache, so
    # cached beam search (which reorders JRTCache rows) must equal the uncached one
    prompt = tokens[:, :20]
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        cached = tiny.generate(prompt, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
        uncached = tiny.generate(
            prompt, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False, use_cache=False
        )
    assert torch.equal(cached, uncached)


def test_generate_from_inputs_embeds(tiny, tokens):
    prompt = tokens[:, :10]
    mask = torch.ones_like(prompt)
    with torch.no_grad():
        from_ids = tiny.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False)
        embeds = tiny.get_input_embeddings()(prompt)
        from_embeds = tiny.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(from_embeds[:, -4:], from_ids[:, 10:])


def test_init_scales_residual_outputs():
    model = JRTForCausalLM(JRTConfig.from_preset("jrt-tiny"))
    layers = model.config.num_hidden_layers
    block = model.model.layers[1]
    assert abs(block.mlp.fc1.weight.std().item() / 0.02 - 1) < 0.1
    for weight in (block.mlp.fc2.weight, block.mixer.out_proj.weight):
        assert abs(weight.std().item() / (0.02 / (2 * layers) ** 0.5) - 1) < 0.1
    assert torch.equal(block.norm1.weight, torch.ones_like(block.norm1.weight))


def test_gradient_checkpointing_gives_the_same_gradients(tokens):
    torch.manual_seed(0)
    model = JRTForCausalLM(JRTConfig.from_preset("jrt-tiny")).train()
    model(tokens, labels=tokens, prefix_lengths=8).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.model.gradient_checkpointing = True
    model(tokens, labels=tokens, prefix_lengths=8).loss.backward()
    for name, param in model.named_parameters():
        assert rel_err(param.grad, expected[name]) < 1e-5, name


@pytest.mark.parametrize(("ids", "message"), [
    (torch.tensor([[1, 2, 100]]), r"token id 100 is outside the vocabulary \[0, 100\)"),
    (torch.tensor([[3, -1]]), r"token id -1 is outside the vocabulary \[0, 100\)"),
    (torch.tensor([[1.0, 2.0]]), "input_ids must hold integer token ids, got dtype torch.float32"),
    (torch.zeros(0, 3, dtype=torch.long), "input_ids has batch size 0"),
])
def test_bad_token_ids_are_value_errors(ids, message):
    model = JRTForCausalLM(JRTConfig.from_preset("jrt-tiny", vocab_size=100, bos_token_id=0, eos_token_id=0,
                                                 pad_token_id=0, mask_token_id=99)).eval()
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=2, do_sample=False)
