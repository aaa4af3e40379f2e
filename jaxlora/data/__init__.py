"""Data pipeline: files → normalised samples → token ids + loss masks → fixed-shape batches.

Entry points (plain keyword arguments named like the config keys; no config import):

``load_sft_dataset(tokenizer, *, dataset, dataset_dir=None, formatting="auto", cutoff_len=1024,
max_samples=None, val_size=0.0, packing=False, train_on_prompt=False, template=None,
chat_template=None, system=None, seed=0, eval_dataset=None) -> (train, eval, DataReport)``
    ``train``/``eval`` are sequences of :class:`Example` (packed rows when ``packing``).

Every loader also takes ``cache_dir=None`` (tokenised datasets are kept there, memory-mapped,
keyed by all their inputs; None = a temporary directory), ``num_workers=1`` (tokenising
processes; scripts using > 1 need the ``if __name__ == "__main__":`` guard of Python's spawn
start method), ``mix_strategy="concat"`` / ``interleave_probs=None`` (see ``views.py``),
``hosts=None`` (P > 1 hosts sharing ``cache_dir`` tokenise 1/P of each dataset each, see
``shard.py``). The
sequences returned read samples from the memory-mapped files when indexed (``views.py``), so
host memory does not grow with the dataset; ``report.cache_hits`` / ``cache_misses`` count the
datasets read from / written to the cache.

``load_preference_dataset(tokenizer, *, dataset, ..., cutoff_len=1024, max_prompt_length=None,
packing=False, ...) -> (train, eval, DataReport)``
    lists of :class:`PreferenceExample` (or packed two-segments-per-pair rows of length
    ``2*cutoff_len`` when ``packing``: segment 2k-1 = chosen, 2k = rejected of pair k).

``load_feedback_dataset(tokenizer, *, dataset, ..., cutoff_len=1024, max_prompt_length=None,
...) -> (train, eval, DataReport)``
    KTO: lists of :class:`FeedbackExample` (prompt, one answer, desirable/undesirable label);
    batches add the mismatched ``kl_*`` rows and ``kto_label`` (see ``feedback.py``).

``load_text_dataset(tokenizer, *, dataset, dataset_dir=None, cutoff_len=1024, max_samples=None,
val_size=0.0, seed=0, eval_dataset=None) -> (train, eval, DataReport)``
    pretraining (``stage: pt``): always packed rows of ``cutoff_len``.

``make_batches(samples, *, batch_size, pad_id, cutoff_len=None, seed=0, shuffle=True,
drop_last=False, process_index=0, process_count=1, bucket_multiple=64) -> Batcher``
    ``batcher.iterate(start_epoch, start_step)`` yields ``(epoch, step, batch)``; ``len(batcher)``
    = steps per epoch; ``batcher.get(epoch, step)`` is a pure function of (seed, epoch, step).
    Batch = dict of int32 [B_local, T]: ``input_ids``, ``loss_mask``, ``segment_ids``,
    ``positions`` (DPO: ``chosen_*``/``rejected_*``; ``concat_preference_batch`` → [2B, T]).
    Loss convention: logits[:, :-1] predict input_ids[:, 1:], weighted by loss_mask[:, 1:] AND
    by ``segment_ids[:, 1:] == segment_ids[:, :-1]`` (see packing.py).

``data_stats(tokenizer, *, dataset, stage="sft", cutoff_len=..., ...) -> dict``,
``format_stats(stats) -> str``, ``plot_length_histogram(stats, path)``.

``fingerprint(train, eval)`` (hash of encoded samples, also ``DataReport.fingerprint``),
``pad_id(tokenizer)``, ``template_for(tokenizer, template, chat_template, system)`` (the
:class:`ChatTemplate` training uses; ``.source`` is saved with the adapter) and
``render(tokenizer, template, messages, tools, add_generation_prompt=...)`` for inference.
"""

from jaxlora.data.batching import Batcher, bucket_length, collate, concat_preference_batch
from jaxlora.data.encode import EncodeCounts, Example, PreferenceExample
from jaxlora.data.feedback import FeedbackExample, FeedbackSample
from jaxlora.data.formats import Conversation, PreferencePair
from jaxlora.data.packing import pack_examples, pack_preferences, pack_stream
from jaxlora.data.pipeline import (
    DataReport,
    fingerprint,
    load_feedback_dataset,
    load_preference_dataset,
    load_sft_dataset,
    load_text_dataset,
    pad_id,
    template_for,
)
from jaxlora.data.stats import data_stats, format_stats, plot_length_histogram
from jaxlora.data.templates import BUILTIN_TEMPLATES, ChatTemplate, render, resolve_template


def make_batches(
    samples: list,
    *,
    batch_size: int,
    pad_id: int,
    cutoff_len: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    bucket_multiple: int = 64,
) -> Batcher:
    """A :class:`Batcher` over encoded samples (see module docstring for the batch layout)."""
    return Batcher(
        samples,
        batch_size=batch_size,
        pad_id=pad_id,
        cutoff_len=cutoff_len,
        seed=seed,
        shuffle=shuffle,
        drop_last=drop_last,
        process_index=process_index,
        process_count=process_count,
        bucket_multiple=bucket_multiple,
    )


__all__ = [
    "BUILTIN_TEMPLATES",
    "Batcher",
    "ChatTemplate",
    "Conversation",
    "DataReport",
    "EncodeCounts",
    "Example",
    "FeedbackExample",
    "FeedbackSample",
    "PreferenceExample",
    "PreferencePair",
    "bucket_length",
    "collate",
    "concat_preference_batch",
    "data_stats",
    "fingerprint",
    "load_feedback_dataset",
    "format_stats",
    "load_preference_dataset",
    "load_sft_dataset",
    "load_text_dataset",
    "make_batches",
    "pack_examples",
    "pack_preferences",
    "pack_stream",
    "pad_id",
    "plot_length_histogram",
    "render",
    "resolve_template",
    "template_for",
]
