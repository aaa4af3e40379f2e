"""Fingerprints of the demo datasets as the data pipeline encodes them, to prove that a speed
change to tokenising, rendering or masking altered no token, mask or count.

Why this exists: issue 17's throughput work must keep every sample bit-identical. Run it with
``PYTHONPATH`` at the old and at the new checkout and compare the two outputs (``diff``). Each
line is one (tokenizer, template, cutoff_len, dataset, options) load through the real loaders
with a fresh cache directory; the value hashes the cache's sample digest (ids, masks, ...), its
per-row columns (prompt/answer lengths, row -> sample) and its truncation counts. The cache
keys themselves change with the code (they include its source), so they are not compared.

    PYTHONPATH=<checkout> python3 benchmarks/data_fingerprints.py > <checkout>.json

Tokenizers: the built-in tiny ChatML and Llama-3 ones, plus any local HF tokenizer directories
given with ``--tokenizer DIR`` (e.g. SmolLM2-135M's). Data: LLaMA-Factory's demo sets from
``--data`` (default /work/shared/data/llamafactory; never copied into the repo).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

SFT_SETS = ("alpaca_en_demo", "alpaca_zh_demo", "identity", "glaive_toolcall_en_demo")


def digest(cache: str) -> str:
    """Hash of every store in a cache directory: sample digest, per-row columns, counts."""
    h = hashlib.sha256()
    for d in sorted(Path(cache).iterdir()):
        if d.name.startswith("."):
            continue
        meta = json.loads((d / "meta.json").read_text())
        h.update(meta["digest"].encode())
        for k in ("n", "n_rows", "n_truncated", "n_answer_truncated", "n_dropped"):
            h.update(str(meta.get(k)).encode())
        for p in sorted(d.glob("*.npy")):
            h.update(p.name.encode() + np.load(p).tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/llamafactory")
    ap.add_argument("--tokenizer", action="append", default=[], help="local HF tokenizer dir")
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    from jaxlora.data import (
        load_feedback_dataset,
        load_preference_dataset,
        load_sft_dataset,
        load_text_dataset,
    )
    from jaxlora.io.tiny import build_tokenizer

    toks = {"tiny-chatml": build_tokenizer(None, template="chatml")}
    toks["tiny-llama3"] = build_tokenizer(None, template="llama3")
    for d in args.tokenizer:
        toks[Path(d).name] = AutoTokenizer.from_pretrained(d)
    out = {}

    def load(key: str, loader, tok, **kw) -> None:
        with tempfile.TemporaryDirectory() as c:
            loader(tok, dataset_dir=args.data, cache_dir=c, **kw)
            out[key] = digest(c)

    for name, tok in toks.items():
        for tmpl in (None, "qwen", "llama3"):
            for cut in (1024, 96):
                kw = {"template": tmpl, "cutoff_len": cut}
                for ds in SFT_SETS:
                    for top in (False, True):
                        key = f"{name}/{tmpl}/{cut}/{ds}/train_on_prompt={top}"
                        load(key, load_sft_dataset, tok, dataset=ds, train_on_prompt=top, **kw)
                load(
                    f"{name}/{tmpl}/{cut}/dpo",
                    load_preference_dataset,
                    tok,
                    dataset="dpo_en_demo",
                    **kw,
                )  # noqa: E501
                load(
                    f"{name}/{tmpl}/{cut}/kto",
                    load_feedback_dataset,
                    tok,
                    dataset="kto_en_demo",
                    **kw,
                )  # noqa: E501
        load(f"{name}/pt", load_text_dataset, tok, dataset="c4_demo", cutoff_len=256)
    print(json.dumps(out, indent=0, sort_keys=True))


if __name__ == "__main__":
    main()
