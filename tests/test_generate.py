"""KV-cache generation: equals step-by-step full forwards, bounded compiles, stops, sampling."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlora
from jaxlora.errors import UserError
from jaxlora.evaluate.generate import (
    apply_repetition_penalty,
    batch_bucket,
    bucket_length,
    decode_fn,
    filter_top_k_top_p,
    generate,
)
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora, parse_targets

LENGTHS = (3, 9, 14)  # one batch, left padded to 16


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return jaxlora.load_model(tiny_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def adapter(model):
    cfg = LoraConfig(rank=4, alpha=8, targets=parse_targets("all"))
    params = init_lora(jax.random.key(0), model.params, cfg)
    # Random non-zero B (and a larger A) so the adapter visibly changes the logits.
    params = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), params
    )
    return Adapter(params, cfg)


def _prompts(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 900, n).tolist() for n in lengths]  # no special tokens


def reference_greedy(model, prompts, n, adapter=None, penalty=1.0):
    """Argmax over full forwards of the growing sequences (right padded to one fixed length:
    causal attention keeps the padding out of the positions that are read)."""
    t = max(map(len, prompts)) + n
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        ids = np.zeros((len(seqs), t), np.int32)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
        logits = np.asarray(model.logits(ids, adapter), np.float64)  # [B, T, V]
        for b, s in enumerate(seqs):
            lg = logits[b, len(s) - 1].copy()
            for tok in set(s):  # HF's formula on every token already in the sequence
                lg[tok] = lg[tok] * penalty if lg[tok] < 0 else lg[tok] / penalty
            s.append(int(np.argmax(lg)))
    return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


@pytest.mark.parametrize("with_adapter", [False, True])
def test_greedy_equals_full_forward_argmax(model, adapter, with_adapter):
    ad = adapter if with_adapter else None
    prompts = _prompts()
    out = generate(model, prompts, adapter=ad, max_new_tokens=6, stop_token_ids=())
    assert out == reference_greedy(model, prompts, 6, ad)
    if with_adapter:  # the adapter is really applied
        assert out != generate(model, prompts, max_new_tokens=6, stop_token_ids=())


def test_repetition_penalty_follows_hf_formula(model):
    prompts = _prompts()
    plain = generate(model, prompts, max_new_tokens=6, stop_token_ids=())
    out = generate(model, prompts, max_new_tokens=6, stop_token_ids=(), repetition_penalty=1.5)
    assert out == reference_greedy(model, prompts, 6, penalty=1.5)
    assert out != plain


def test_compile_count_bounded_by_buckets(model):
    fn = decode_fn(model)
    lengths = (2, 6, 11, 15, 21)  # prompt buckets 16, 16, 16, 16, 24
    before = fn._cache_size()
    for p in _prompts(lengths, seed=1):
        assert len(generate(model, [p], max_new_tokens=3, stop_token_ids=())[0]) == 3
    touched = len({bucket_length(n) for n in lengths})
    assert fn._cache_size() - before <= touched == 2
    after = fn._cache_size()
    # New lengths and budgets inside the buckets already touched: no new compilation.
    for n, new in ((10, 5), (22, 9), (24, 16)):
        generate(model, _prompts((n,), seed=2), max_new_tokens=new, stop_token_ids=())
    assert fn._cache_size() == after


def test_stop_tokens(model):
    prompt = _prompts((9,), seed=4)[0]
    full = generate(model, [prompt], max_new_tokens=8, stop_token_ids=())[0]
    j = next(i for i in range(2, 8) if full[i] not in full[:i])
    stop = full[j]
    assert generate(model, [prompt], max_new_tokens=8, stop_token_ids=[stop])[0] == full[:j]
    kept = generate(
        model, [prompt], max_new_tokens=8, stop_token_ids=[stop], include_stop_token=True
    )
    assert kept[0] == full[: j + 1]
    # In a batch, a row that stops does not cut the others short.
    others = _prompts((5, 12, 7), seed=5)  # a batch of 3 rows, then one of 4
    others_full = generate(model, others, max_new_tokens=8, stop_token_ids=())
    batch = generate(model, [prompt, *others], max_new_tokens=8, stop_token_ids=[stop])
    assert batch[0] == full[:j]
    for got, row in zip(batch[1:], others_full, strict=True):
        assert got == (row[: row.index(stop)] if stop in row else row)


def test_default_stop_ids_come_from_the_model(model, tiny_model_dir):
    from jaxlora.evaluate.generate import default_stop_ids

    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) <= set(default_stop_ids(model))
    assert model.tokenizer.convert_tokens_to_ids("<|im_end|>") in default_stop_ids(model)


def test_top_k_one_sampling_equals_greedy(model):
    prompts = _prompts()
    greedy = generate(model, prompts, max_new_tokens=5, stop_token_ids=())
    sampled = generate(
        model, prompts, max_new_tokens=5, stop_token_ids=(), temperature=0.7, top_k=1, seed=3
    )
    assert sampled == greedy


def test_sampling_respects_top_k_and_seed(model):
    prompt = _prompts()[1]
    ids = np.zeros((3, 20), np.int32)  # the shape reference_greedy already compiled
    ids[0, : len(prompt)] = prompt
    logits = np.asarray(model.logits(ids))[0, len(prompt) - 1]
    top3 = set(np.argsort(-logits)[:3].tolist())
    kw = dict(max_new_tokens=1, stop_token_ids=(), temperature=1.0, top_k=3)
    draws = [o[0] for s in range(3) for o in generate(model, [prompt] * 4, seed=s, **kw)]
    assert set(draws) <= top3 and len(set(draws)) > 1
    again = [o[0] for s in range(3) for o in generate(model, [prompt] * 4, seed=s, **kw)]
    assert again == draws  # same seed, same draw


def test_repetition_penalty_processor_unit():
    logits = jnp.array([[2.0, -1.0, 0.5, -3.0]])
    seen = jnp.array([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    np.testing.assert_allclose(np.asarray(out), [[1.0, -2.0, 0.5, -3.0]])


def test_top_k_top_p_filter_unit():
    logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
    keep = lambda k, p: np.isfinite(np.asarray(filter_top_k_top_p(logits, k, p)))[0].tolist()  # noqa: E731
    assert keep(0, 1.0) == [True, True, True, True]
    assert keep(2, 1.0) == [True, False, True, False]
    assert keep(0, 0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert keep(0, 0.8) == [True, False, True, False]  # 0.5 + 0.3 reaches 0.8
    assert keep(0, 0.81) == [True, False, True, True]
    assert keep(3, 0.81) == [True, False, True, False]  # renormalised: 0.526 + 0.316 > 0.81
    assert keep(3, 0.85) == [True, False, True, True]
    assert keep(2, 0.9) == [True, False, True, False]  # top-p renormalises after top-k


@pytest.mark.torch
def test_processors_match_transformers():
    torch = pytest.importorskip("torch")
    gen_utils = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 50)).astype(np.float32)
    ids = rng.integers(0, 50, (3, 7))
    seen = np.zeros((3, 50), bool)
    np.put_along_axis(seen, ids, True, axis=1)
    ours = apply_repetition_penalty(jnp.asarray(scores), jnp.asarray(seen), 1.3)
    hf = gen_utils.RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor(ids), torch.tensor(scores))
    np.testing.assert_allclose(np.asarray(ours), hf.numpy(), rtol=1e-6)
    for k, p in [(5, 1.0), (0, 0.7), (10, 0.5), (50, 0.95)]:
        t = torch.tensor(scores)
        if k:
            t = gen_utils.TopKLogitsWarper(k)(torch.tensor(ids), t)
        if p < 1.0:
            t = gen_utils.TopPLogitsWarper(p)(torch.tensor(ids), t)
        ours = np.asarray(filter_top_k_top_p(jnp.asarray(scores), k, p))
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(t.numpy()))


def test_sliding_window_model_matches_full_forward(tmp_path):
    from jaxlora.io.tiny import make_tiny_model

    d = make_tiny_model(
        tmp_path / "mistral", family="mistral", hidden_size=32, intermediate_size=48
    )
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 5  # shorter than the prompts: the window changes the answers
    (d / "config.json").write_text(json.dumps(cfg))
    m = jaxlora.load_model(d, dtype="float32")
    assert m.config.sliding_window == 5
    prompts = _prompts((4, 11), seed=8)
    out = generate(m, prompts, max_new_tokens=5, stop_token_ids=())
    assert out == reference_greedy(m, prompts, 5)


def test_bfloat16_model_generates(tiny_model_dir):
    m = jaxlora.load_model(tiny_model_dir, dtype="bfloat16")
    out = generate(m, _prompts((4, 7)), max_new_tokens=3, stop_token_ids=())
    assert [len(o) for o in out] == [3, 3]
    assert all(0 <= t < m.config.vocab_size for o in out for t in o)


def test_buckets_and_validation(model):
    # The 2^k / 1.5 * 2^k ladder (padding <= 1/3 of a bucket), multiples of 512 past 1024.
    assert [bucket_length(n) for n in (1, 16, 17, 25, 33, 100, 719, 769, 1024, 1025, 3000)] == [
        16, 16, 24, 32, 48, 128, 768, 1024, 1024, 1536, 3072,
    ]  # fmt: skip
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 16)] == [
        1,
        2,
        3,
        4,
        6,
        8,
        12,
        16,
        16,
    ]
    with pytest.raises(UserError, match="temperature"):
        generate(model, [[5]], temperature=-1.0)
    with pytest.raises(UserError, match="prompt 2 is empty"):
        generate(model, [[5], []])
    with pytest.raises(UserError, match="top_p"):
        generate(model, [[5]], top_p=0.0)
    with pytest.raises(UserError, match="max_new_tokens"):
        generate(model, [[5]], max_new_tokens=0)
