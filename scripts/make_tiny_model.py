"""Write a tiny random-weight Hugging Face checkpoint (config, safetensors, tokenizer).

Used to try jaxlora without downloads and to build test fixtures:

    python scripts/make_tiny_model.py /tmp/tiny-qwen2 --family qwen2 --hidden-size 64
    python scripts/make_tiny_model.py --default     # build/print the cached demo model (`tiny`)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a source checkout without installing: make the repo root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxlora.io.tiny import default_model_dir, make_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out_dir", nargs="?", help="directory to write")
    p.add_argument("--default", action="store_true", help="build the cached demo model instead")
    p.add_argument("--family", default="llama", choices=["llama", "mistral", "qwen2", "qwen3"])
    p.add_argument("--template", default="chatml", choices=["chatml", "llama3"])
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--num-hidden-layers", type=int, default=2)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-key-value-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--tie-word-embeddings", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    if a.default:
        print(default_model_dir())
        return
    if not a.out_dir:
        p.error("OUT_DIR is required unless --default is given")
    out = make_tiny_model(
        a.out_dir,
        family=a.family,
        vocab_size=a.vocab_size,
        hidden_size=a.hidden_size,
        intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_hidden_layers,
        num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_key_value_heads,
        head_dim=a.head_dim,
        tie_word_embeddings=a.tie_word_embeddings,
        seed=a.seed,
        dtype=a.dtype,
        template=a.template,
    )
    print(out)


if __name__ == "__main__":
    main()
