"""KV-cache text generation for the Llama-family decoder (chat, predict, eval).

Why this file exists: `jaxlora chat / predict / eval` need many short generations from the same
model without recompiling per prompt. One jitted function does the whole job for a batch:

1. **Prefill**: the LEFT-padded prompts [B, P] run through the decoder once, writing their keys
   and values into a cache of S = P + N slots ([L, B, S, K, Dh] for k and v, in the model's
   compute dtype). Positions count real tokens only (`cumsum(real) - 1`), so a padded prompt sees
   exactly the positions it would see alone.
2. **Decode**: a `lax.while_loop` feeds one token per step at slot P + i, until every row has
   emitted a stop token or `max_new_tokens` tokens (a traced scalar, not a shape).

The attention mask is built from the cache state: a query sees cached keys that are real tokens
(not left padding, not future slots) at or before its own slot, within the sliding window
(by position) when the model has one. Every query also sees its own slot, so the softmax of a
pad query is well defined (its output is never used).

Bucketing keeps the number of compilations small and bounded: the batch is padded (with dummy
rows) to the next step of the ladder 1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5x powers
of two), the prompt length P and the new-token budget N are rounded up by `bucket_length` (the same
ladder from 16 to 1024: 16, 24, 32, 48, ..., 768, 1024; then multiples of 512), and the stop-token
list is padded to a multiple of 8. The 1.5x steps bound the padding at 1/3 of a bucket instead of
1/2 (a 719-token prompt prefills 768 slots, not 1024; three prompts run as 3 rows, not 4) for at
most twice the distinct shapes. Sampling settings are traced values, except the static switch
between greedy (`temperature == 0`) and sampling. Compilations = distinct (batch, P, N) buckets x
{greedy, sampling}, per (architecture, dtype, adapter settings).

Sampling follows Hugging Face `generate` semantics and order: repetition penalty on the raw
logits of every token already in the sequence (prompt + generated; left padding excluded), then
temperature, top-k, top-p (nucleus). Greedy decoding takes the argmax of the penalised logits.

Known difference: with `rope_type: dynamic` (dynamic NTK) the decoder scales RoPE by the cache
length S (a bucket), where HF uses the current sequence length; the other RoPE types do not depend
on length, so this affects dynamic-NTK models only, and only past their trained context.

Returned sequences hold the NEW tokens only. Generation of a row stops at the first stop token;
that token is dropped from the result unless `include_stop_token=True`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import UserError
from jaxlora.io.model import adapter_variables
from jaxlora.losses.fused_ce import head_subscript
from jaxlora.models import gemma
from jaxlora.models.attention import AttentionSpec
from jaxlora.models.config import ModelConfig
from jaxlora.models.linear import AdapterSpec
from jaxlora.models.llama import Decoder, head_weight

MIN_BUCKET = 16  # smallest prompt / new-token bucket
LADDER_LIMIT = 1024  # the 2^k / 1.5 * 2^k ladder up to here, multiples of LONG_STEP beyond
LONG_STEP = 512
STOP_IDS_MULTIPLE = 8  # the stop-id array is padded (with -1) to a multiple of this


# ----------------------------------------------------------------------------- buckets


def _ladder(n: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (2^k and 1.5 * 2^k) that is >= n >= 1."""
    p = 1 << (n - 1).bit_length()  # next power of two
    return 3 * p // 4 if p >= 4 and n <= 3 * p // 4 else p


def bucket_length(n: int) -> int:
    """Padded length for n tokens: the next step of the ladder 16, 24, 32, 48, ..., 768, 1024
    (at most 1/3 of it padding), then the next multiple of 512 (a 1025-token prompt costs 1536
    slots, a 3000-token one 3072)."""
    n = max(int(n), MIN_BUCKET)
    if n <= LADDER_LIMIT:
        return _ladder(n)
    return -(-n // LONG_STEP) * LONG_STEP


def batch_bucket(n: int) -> int:
    """Rows per compiled batch: the next step of the ladder 1, 2, 3, 4, 6, 8, 12, 16, ..."""
    return _ladder(max(int(n), 1))


# ----------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: Any) -> jax.Array:
    """HF `RepetitionPenaltyLogitsProcessor`: for tokens already in the sequence, positive logits
    are divided by `penalty` and negative ones multiplied by it. logits [B, V], seen [B, V] bool."""
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def filter_top_k_top_p(logits: jax.Array, top_k: Any, top_p: Any) -> jax.Array:
    """HF `TopKLogitsWarper` then `TopPLogitsWarper` (min_tokens_to_keep=1): removed tokens get
    -inf. `top_k` <= 0 and `top_p` >= 1 disable the respective filter; both may be traced.

    top-k keeps logits >= the k-th largest (ties at the threshold survive, as in HF). top-p keeps,
    in descending order, every token whose preceding probability mass is < top_p, i.e. the
    smallest set whose mass reaches top_p (HF removes tokens whose ascending cumulative mass is
    <= 1 - top_p, the same set).
    """
    v = logits.shape[-1]
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    sorted_desc = -jnp.sort(-logits, axis=-1)  # [B, V]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
    kth = jax.lax.dynamic_index_in_dim(sorted_desc, k - 1, axis=-1, keepdims=True)  # [B, 1]
    logits = jnp.where(logits < kth, neg_inf, logits)
    rank = jnp.arange(v)
    sorted_k = jnp.where(rank < k, sorted_desc, neg_inf)  # sorted, top-k applied
    probs = jax.nn.softmax(sorted_k, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [B, V]
    keep = (mass_before < top_p) | (rank == 0) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(keep, sorted_k, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits < threshold, neg_inf, logits)


def next_token(
    logits: jax.Array,
    seen: jax.Array,
    key: jax.Array,
    *,
    do_sample: bool,
    temperature: Any = 1.0,
    top_k: Any = 0,
    top_p: Any = 1.0,
    repetition_penalty: Any = 1.0,
) -> jax.Array:
    """Pick one token per row from fp32 logits [B, V] -> [B] int32 (greedy or sampled)."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, repetition_penalty)
    if not do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_top_k_top_p(logits / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- the jitted decoder


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype: Any) -> tuple[jax.Array, ...]:
    """Zero KV cache: (k, v), each [L, B, S, K, Dh] in the compute dtype."""
    shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def cache_mask(
    key_valid: jax.Array,  # [B, S] bool: slot holds a real token
    key_pos: jax.Array,  # [B, S] int: position of the token in each slot
    q_slot: jax.Array,  # [T] int: cache slot of each query
    q_pos: jax.Array,  # [B, T] int: position of each query
    sliding_window: int | None,
) -> jax.Array:
    """Boolean attention mask [B, 1, T, S] over the cache (see the module docstring)."""
    k_slot = jnp.arange(key_valid.shape[1])
    causal = k_slot[None, :] <= q_slot[:, None]  # [T, S]
    mask = causal[None] & key_valid[:, None, :]  # [B, T, S]
    if sliding_window is not None:
        mask = mask & ((q_pos[:, :, None] - key_pos[:, None, :]) < sliding_window)
    mask = mask | (k_slot[None, :] == q_slot[:, None])[None]
    return mask[:, None]


def _head_logits(params: dict, cfg: ModelConfig, dtype: Any, h: jax.Array) -> jax.Array:
    """fp32 logits [B, V] from final hidden states [B, D], as the decoder's LM head computes them
    (only the last position is projected: prefill never builds [B, P, V] logits)."""
    head, vocab_major = head_weight(params, cfg)  # [V, D] tied embedding or [D, V] kernel
    spec = f"bd,{head_subscript(vocab_major)}->bv"
    logits = jnp.einsum(spec, h.astype(dtype), head.astype(dtype)).astype(jnp.float32)
    if cfg.final_logit_softcap is not None:  # Gemma 2
        logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
    return logits


@functools.lru_cache(maxsize=32)
def _decode_fn(cfg: ModelConfig, dtype: Any, spec: AdapterSpec | None, attention: AttentionSpec):
    """The jitted prefill + decode loop for one (architecture, dtype, adapter settings, attention
    kernel). Prefill runs the selected kernel over the prompt block; decode steps run dense."""
    module = Decoder(cfg, dtype=dtype, param_dtype=dtype, adapter=spec, attention=attention)
    window = gemma.static_window(cfg)

    def masks(*args):  # [B, 1, T, S]; Gemma with mixed layers: one per layer kind
        if gemma.mixed_layers(cfg):
            return gemma.PerKind(cache_mask(*args, None), cache_mask(*args, cfg.sliding_window))
        return cache_mask(*args, window)

    def decode_batch(
        params,
        lora,
        tokens,  # [B, P] int32, left padded
        lengths,  # [B] int32 real prompt tokens (0 = dummy row)
        max_new,  # [] int32 <= new_bucket
        temperature,  # [] f32
        top_k,  # [] int32
        top_p,  # [] f32
        penalty,  # [] f32
        stop_ids,  # [NS] int32, -1 = unused
        pad_id,  # [] int32
        key,
        *,
        new_bucket: int,
        do_sample: bool,
    ):
        b, p = tokens.shape
        s = p + new_bucket
        variables = {"params": params, **lora}  # lora: adapter_variables(adapter)
        rows = jnp.arange(b)
        pick = functools.partial(
            next_token,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=penalty,
        )

        def is_stop(tok):  # [B] -> [B] bool
            return jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

        # ---- prefill
        real = jnp.arange(p)[None, :] >= (p - lengths)[:, None]  # [B, P]
        positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
        key_valid = jnp.zeros((b, s), bool).at[:, :p].set(real)  # [B, S]
        key_pos = jnp.zeros((b, s), jnp.int32).at[:, :p].set(positions)  # [B, S]
        mask = masks(key_valid, key_pos, jnp.arange(p), positions)
        hidden, cache = module.apply(
            variables,
            tokens,
            positions,
            real.astype(jnp.int32),  # segment ids: 1 = prompt token, 0 = left padding
            kv_cache=init_cache(cfg, b, s, dtype),
            cache_index=jnp.int32(0),
            attn_mask=mask,
            return_hidden=True,
        )  # [B, P, D]
        logits = _head_logits(params, cfg, dtype, hidden[:, -1])  # [B, V]: last slot is real
        seen = (
            jnp.zeros(logits.shape, jnp.int32).at[rows[:, None], tokens].add(real.astype(jnp.int32))
            > 0
        )
        key, sub = jax.random.split(key)
        tok = pick(logits, seen, sub)  # [B]
        dummy = lengths == 0
        out = jnp.full((b, new_bucket), pad_id, jnp.int32).at[:, 0].set(tok)
        n_out = jnp.where(dummy, 0, 1).astype(jnp.int32)
        done = dummy | is_stop(tok)
        seen = seen.at[rows, tok].set(True)

        # ---- decode: carry i = index of the last sampled token
        def cond(c):
            i, done = c[0], c[6]
            return (i + 1 < max_new) & ~jnp.all(done)

        def body(c):
            i, cache, tok, key_valid, key_pos, seen, done, out, n_out, key = c
            slot = p + i
            pos = lengths + i  # [B]: the fed token's position
            key_valid = jax.lax.dynamic_update_index_in_dim(
                key_valid, jnp.ones((b,), bool), slot, axis=1
            )
            key_pos = jax.lax.dynamic_update_index_in_dim(key_pos, pos, slot, axis=1)
            mask = masks(key_valid, key_pos, slot[None], pos[:, None])
            hidden, cache = module.apply(
                variables,
                tok[:, None],
                pos[:, None],
                None,
                kv_cache=cache,
                cache_index=slot,
                attn_mask=mask,
                return_hidden=True,
            )  # [B, 1, D]
            logits = _head_logits(params, cfg, dtype, hidden[:, 0])
            key, sub = jax.random.split(key)
            new = jnp.where(done, pad_id, pick(logits, seen, sub))
            out = jax.lax.dynamic_update_index_in_dim(out, new, i + 1, axis=1)
            n_out = n_out + (~done).astype(jnp.int32)
            seen = seen.at[rows, new].set(True)  # finished rows never read it again
            done = done | is_stop(new)
            return (i + 1, cache, new, key_valid, key_pos, seen, done, out, n_out, key)

        carry = (jnp.int32(0), cache, tok, key_valid, key_pos, seen, done, out, n_out, key)
        carry = jax.lax.while_loop(cond, body, carry)
        return carry[7], carry[8]  # [B, N] tokens, [B] counts (stop token included)

    return jax.jit(decode_batch, static_argnames=("new_bucket", "do_sample"))


def decode_fn(model, adapter=None):
    """The jitted function `generate` uses for this model (and adapter settings); exposed so
    callers and tests can inspect its compilation cache (`decode_fn(m)._cache_size()`)."""
    spec = None if adapter is None else adapter.spec
    return _decode_fn(model.config, model.dtype, spec, model.attention)


# ----------------------------------------------------------------------------- host side


def _as_ids(x: Any) -> list[int]:
    if isinstance(x, int | np.integer):
        return [int(x)]
    return [int(i) for i in x]


def default_stop_ids(model) -> list[int]:
    """EOS ids from the model's config.json, its generation_config.json and its tokenizer."""
    ids: set[int] = set()
    if model.config.eos_token_id is not None:
        ids.update(_as_ids(model.config.eos_token_id))
    path = getattr(model, "path", None)
    gen_cfg = None if path is None else path / "generation_config.json"
    if gen_cfg is not None and gen_cfg.is_file():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update(_as_ids(eos))
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def _default_pad_id(model) -> int:
    for cand in (model.config.pad_token_id, getattr(model.tokenizer, "pad_token_id", None)):
        if cand is not None:
            return int(cand)
    return 0


def _check_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, batch_size):
    if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if repetition_penalty <= 0:
        raise UserError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")


def generate(
    model,
    prompts_token_ids: Sequence[Sequence[int]],
    *,
    adapter=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] | None = None,
    include_stop_token: bool = False,
    pad_token_id: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
) -> list[list[int]]:
    """Generate up to `max_new_tokens` new tokens for each prompt; returns new tokens only.

    `model`: a `jaxlora.Model`; `adapter`: an `Adapter`, `PromptAdapter` or None.
    `temperature == 0` is greedy (top-k/top-p ignored). `stop_token_ids=None` uses the model's
    EOS ids (`default_stop_ids`); pass `()` to never stop early. Each row stops at its first stop
    token, which is excluded from the result unless `include_stop_token`. Prompts are sorted by
    length and run `batch_size` at a time; results come back in input order. With sampling,
    results depend on `seed` and on how prompts are grouped into batches.
    """
    _check_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, batch_size)
    prompts = [_as_ids(p) for p in prompts_token_ids]
    for i, p in enumerate(prompts):
        if not p:
            raise UserError(f"prompt {i + 1} is empty; generation needs at least one prompt token")
    stops = default_stop_ids(model) if stop_token_ids is None else _as_ids(stop_token_ids)
    n_stop = max(STOP_IDS_MULTIPLE, -(-len(stops) // STOP_IDS_MULTIPLE) * STOP_IDS_MULTIPLE)
    stop_arr = np.full(n_stop, -1, np.int32)
    stop_arr[: len(stops)] = stops
    pad = _default_pad_id(model) if pad_token_id is None else int(pad_token_id)
    fn = decode_fn(model, adapter)
    lora = adapter_variables(adapter)
    new_bucket = bucket_length(max_new_tokens)
    do_sample = temperature > 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for chunk_no, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        b, p = batch_bucket(len(idx)), bucket_length(max(len(prompts[i]) for i in idx))
        tokens = np.full((b, p), pad, np.int32)  # left padded; dummy rows all padding
        lengths = np.zeros(b, np.int32)
        for row, i in enumerate(idx):
            tokens[row, p - len(prompts[i]) :] = prompts[i]
            lengths[row] = len(prompts[i])
        out, counts = fn(
            model.params,
            lora,
            tokens,
            lengths,
            np.int32(max_new_tokens),
            np.float32(temperature if do_sample else 1.0),
            np.int32(top_k),
            np.float32(top_p),
            np.float32(repetition_penalty),
            stop_arr,
            np.int32(pad),
            jax.random.fold_in(jax.random.key(seed), chunk_no),
            new_bucket=new_bucket,
            do_sample=do_sample,
        )
        out, counts = np.asarray(out), np.asarray(counts)
        stop_set = set(stops)
        for row, i in enumerate(idx):
            seq = out[row, : counts[row]].tolist()
            if seq and seq[-1] in stop_set and not include_stop_token:
                seq = seq[:-1]
            results[i] = seq
    return results
