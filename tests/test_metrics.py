"""Metrics equal their reference implementations (rouge_score, sacrebleu, nltk) on fixtures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jaxlora.errors import UserError
from jaxlora.evaluate.metrics import cjk_words, dpo_reward_metrics, has_cjk, perplexity, rouge_bleu

rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
sacrebleu = pytest.importorskip("sacrebleu")
pytest.importorskip("jieba")

EN_PRED = "The quick brown fox jumps over the lazy dog near the river bank."
EN_REF = "A quick brown fox jumped over the lazy dog by the river."
ZH_PRED = "今天天气很好，我们去公园散步吧。"
ZH_REF = "今天的天气非常好，我们一起去公园散步。"


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.e**2)
    assert perplexity(np.float32(1.5)) == pytest.approx(math.exp(1.5), rel=1e-6)
    assert perplexity(1e4) == math.inf
    assert math.isnan(perplexity(float("nan")))


def test_has_cjk():
    assert has_cjk("我用Python")
    assert has_cjk("日本語のテキスト")
    assert not has_cjk("plain English, with punctuation!")
    assert not has_cjk("한국어")  # Korean is space-separated: whitespace path


def test_english_equals_reference_implementations():
    got = rouge_bleu([EN_PRED], [EN_REF])
    ref = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"]).score(EN_REF, EN_PRED)
    assert got["rouge-1"] == pytest.approx(100 * ref["rouge1"].fmeasure)
    assert got["rouge-2"] == pytest.approx(100 * ref["rouge2"].fmeasure)
    assert got["rouge-l"] == pytest.approx(100 * ref["rougeL"].fmeasure)
    bleu = sacrebleu.sentence_bleu(EN_PRED, [EN_REF], tokenize="13a").score
    assert got["bleu-4"] == pytest.approx(bleu)
    assert 0.0 < got["bleu-4"] < 100.0 and 0.0 < got["rouge-2"] < got["rouge-1"] < 100.0


def test_chinese_equals_reference_implementations():
    import jieba

    got = rouge_bleu([ZH_PRED], [ZH_REF])
    # Reference: rouge_score on jieba words joined by spaces, split on whitespace.
    words = [[w for w in jieba.cut(t) if w.strip() and w not in "，。"] for t in (ZH_PRED, ZH_REF)]

    class Whitespace:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=Whitespace())
    ref = scorer.score(" ".join(words[1]), " ".join(words[0]))
    assert got["rouge-1"] == pytest.approx(100 * ref["rouge1"].fmeasure)
    assert got["rouge-2"] == pytest.approx(100 * ref["rouge2"].fmeasure)
    assert got["rouge-l"] == pytest.approx(100 * ref["rougeL"].fmeasure)
    bleu = sacrebleu.sentence_bleu(ZH_PRED, [ZH_REF], tokenize="zh").score
    assert got["bleu-4"] == pytest.approx(bleu)
    # Segmentation matters: without it rouge_score's default tokenizer drops every ideograph.
    assert got["rouge-1"] > 30.0


def test_chinese_bleu_equals_llamafactory_nltk_method3():
    """LLaMA-Factory: sentence_bleu([list(label)], list(pred), SmoothingFunction().method3)."""
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    want = bleu_score.sentence_bleu(
        [list(ZH_REF)], list(ZH_PRED), smoothing_function=bleu_score.SmoothingFunction().method3
    )
    assert rouge_bleu([ZH_PRED], [ZH_REF])["bleu-4"] == pytest.approx(100 * want)


def test_cjk_words_drop_punctuation_and_lowercase():
    assert cjk_words("我用Python写代码。") == ["我用", "python", "写", "代码"]


def test_mixed_pair_uses_cjk_path():
    got = rouge_bleu(["答案是 Python"], ["答案是 python 语言"])
    assert got["rouge-1"] == pytest.approx(100 * 2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4))


@pytest.mark.parametrize("text", [EN_REF, ZH_REF, "x", "是", "Hello, world!"])
def test_identical_strings_score_100(text):
    assert rouge_bleu([text], [text]) == {
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
        "bleu-4": 100.0,
    }


def test_empty_prediction_scores_zero():
    assert rouge_bleu(["", "   "], [EN_REF, ZH_REF]) == {
        "rouge-1": 0.0,
        "rouge-2": 0.0,
        "rouge-l": 0.0,
        "bleu-4": 0.0,
    }
    assert rouge_bleu([""], [""])["rouge-1"] == 100.0


def test_mean_over_samples():
    both = rouge_bleu([EN_PRED, ZH_PRED], [EN_REF, ZH_REF])
    en, zh = rouge_bleu([EN_PRED], [EN_REF]), rouge_bleu([ZH_PRED], [ZH_REF])
    for k in both:
        assert both[k] == pytest.approx((en[k] + zh[k]) / 2)


def test_length_mismatch_and_empty_input_raise():
    with pytest.raises(UserError, match="2 predictions but 1 references"):
        rouge_bleu(["a", "b"], ["a"])
    with pytest.raises(UserError, match="no predictions"):
        rouge_bleu([], [])


def test_dpo_reward_metrics():
    m = dpo_reward_metrics(np.array([0.5, 0.1, -0.2]), np.array([0.1, 0.1, -0.4]))
    assert m["rewards/chosen"] == pytest.approx(0.4 / 3)
    assert m["rewards/rejected"] == pytest.approx(-0.2 / 3)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)  # the tie counts as wrong
    assert m["rewards/margins"] == pytest.approx(0.2)
    with pytest.raises(ValueError):
        dpo_reward_metrics([1.0], [1.0, 2.0])
