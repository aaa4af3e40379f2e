"""Evaluation metrics: perplexity, ROUGE / BLEU on generated text, DPO reward statistics.

`jaxlora eval` / `predict` score generations against references with the numbers practitioners
already compare across trainers: ROUGE-1/2/L F1 and BLEU-4, each ×100 and averaged over samples,
as LLaMA-Factory's `ComputeSimilarity` reports them (keys `rouge-1`, `rouge-2`, `rouge-l`,
`bleu-4`). Chinese text has no spaces, so whitespace tokenisation would score a whole sentence as
one "word"; text containing CJK ideographs is therefore segmented first:

- ROUGE: a pair (prediction, reference) where either side contains CJK is segmented with jieba
  (as LLaMA-Factory does) and scored by `rouge_score` on those words; a pure non-CJK pair uses
  `rouge_score`'s default tokeniser (lower-case, alphanumeric runs, no stemming). Punctuation-only
  tokens are dropped in both cases so the two paths agree on mixed text.
- BLEU: `sacrebleu.sentence_bleu` with `tokenize="zh"` for CJK pairs (one token per ideograph,
  which is what LLaMA-Factory's `list(text)` character BLEU does for Chinese) and `"13a"` (the
  WMT standard) otherwise. sacrebleu's default sentence smoothing (`exp`) is Chen & Cherry's
  method 3 — the `SmoothingFunction().method3` LLaMA-Factory passes to nltk — so for hypotheses of
  four or more tokens the numbers equal nltk's `sentence_bleu(..., method3)` on the same tokens.
  For shorter hypotheses sacrebleu uses the effective n-gram order, so an exact one-token answer
  scores 100 rather than nltk's 35.4 (the choice that keeps "identical strings → 100" true).
  Deliberate difference: LLaMA-Factory also scores English BLEU per character; we use words.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from functools import cache

import numpy as np

from jaxlora.errors import UserError

# CJK Unified Ideographs (+ extension A, compatibility ideographs) and Japanese kana. Hangul is
# left out on purpose: Korean separates words with spaces, so the whitespace path is correct.
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_KEYS = {"rouge1": "rouge-1", "rouge2": "rouge-2", "rougeL": "rouge-l"}


def perplexity(mean_nll: float) -> float:
    """exp(mean token negative log-likelihood); +inf instead of an OverflowError past ~709 nats."""
    x = float(mean_nll)
    if math.isnan(x):
        return math.nan
    return math.exp(x) if x < 709.0 else math.inf  # exp(709.8) is the float64 limit


def has_cjk(text: str) -> bool:
    """True when `text` contains at least one CJK ideograph or Japanese kana."""
    return _CJK_RE.search(text) is not None


@cache
def _jieba():
    import jieba  # imported lazily: building its prefix dictionary costs ~0.5 s

    jieba.setLogLevel(logging.CRITICAL)  # silence "Building prefix dict..." on stderr
    return jieba


def cjk_words(text: str) -> list[str]:
    """jieba words of `text`, lower-cased, without whitespace/punctuation-only tokens."""
    # str.isalnum() is True for ideographs and kana, False for '，', '。', ' ' etc.
    return [w.lower() for w in _jieba().cut(text) if any(ch.isalnum() for ch in w)]


class _JiebaTokenizer:
    """`rouge_score` tokenizer interface (an object with `.tokenize(text) -> list[str]`)."""

    def tokenize(self, text: str) -> list[str]:
        return cjk_words(text)


@cache
def _scorer(cjk: bool):
    """(tokenizer, RougeScorer) for CJK or non-CJK pairs."""
    from rouge_score import rouge_scorer, tokenizers

    tok = _JiebaTokenizer() if cjk else tokenizers.DefaultTokenizer(use_stemmer=False)
    return tok, rouge_scorer.RougeScorer(list(_ROUGE_TYPES), tokenizer=tok)


def _pair_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 and BLEU-4 (all ×100) of one prediction against one reference."""
    import sacrebleu

    cjk = has_cjk(prediction) or has_cjk(reference)
    tokenizer, scorer = _scorer(cjk)
    pred_tokens = tokenizer.tokenize(prediction)
    ref_tokens = tokenizer.tokenize(reference)
    if pred_tokens == ref_tokens:
        # Exact match after tokenisation, including both empty: rouge_score would say 0 for
        # ROUGE-2 of a one-word answer (no bigrams) and for empty strings (0/0 recall).
        out = {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0}
    elif not pred_tokens or not ref_tokens:
        out = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        rouge = scorer.score(reference, prediction)  # rouge_score order: (target, prediction)
        out = {_KEYS[k]: 100.0 * rouge[k].fmeasure for k in _ROUGE_TYPES}

    # BLEU is case- and punctuation-sensitive, so only a verbatim match short-cuts to 100.
    if prediction.strip() == reference.strip():
        out["bleu-4"] = 100.0
    elif not prediction.strip() or not reference.strip():
        out["bleu-4"] = 0.0
    else:
        bleu = sacrebleu.sentence_bleu(prediction, [reference], tokenize="zh" if cjk else "13a")
        out["bleu-4"] = min(100.0, float(bleu.score))  # exp/log round-off gives 100.00000000000004
    return out


def rouge_bleu(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean per-sample ROUGE-1/2/L F1 and BLEU-4, ×100, with CJK-aware tokenisation.

    Returns `{"rouge-1", "rouge-2", "rouge-l", "bleu-4"}` (LLaMA-Factory's key names). Identical
    strings score 100; an empty prediction against a non-empty reference scores 0.
    """
    if len(predictions) != len(references):
        raise UserError(
            f"rouge_bleu: got {len(predictions)} predictions but {len(references)} references; "
            "expected one reference per prediction"
        )
    if not predictions:
        raise UserError("rouge_bleu: no predictions to score (expected at least one sample)")
    per_sample = [
        _pair_scores(str(p), str(r)) for p, r in zip(predictions, references, strict=True)
    ]
    return {k: float(np.mean([s[k] for s in per_sample])) for k in per_sample[0]}


def dpo_reward_metrics(chosen_rewards, rejected_rewards) -> dict[str, float]:
    """Batch means of DPO implicit rewards, keyed like TRL's `DPOTrainer` logs (under `train/`).

    Rewards are `beta * (log pi(y|x) - log pi_ref(y|x))` per pair (see `losses.dpo_loss`).
    Accuracy counts pairs whose chosen reward is strictly above the rejected one (ties lose).
    """
    chosen = np.asarray(chosen_rewards, dtype=np.float64).reshape(-1)  # [N]
    rejected = np.asarray(rejected_rewards, dtype=np.float64).reshape(-1)  # [N]
    if chosen.shape != rejected.shape or chosen.size == 0:
        raise ValueError(
            f"dpo_reward_metrics: chosen {chosen.shape} and rejected {rejected.shape} rewards "
            "must be non-empty and the same length"
        )
    return {
        "rewards/chosen": float(chosen.mean()),
        "rewards/rejected": float(rejected.mean()),
        "rewards/accuracies": float((chosen > rejected).mean()),
        "rewards/margins": float((chosen - rejected).mean()),
    }
