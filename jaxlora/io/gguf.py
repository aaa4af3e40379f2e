"""GGUF in: a llama.cpp `.gguf` file as a cached Hugging Face checkpoint directory.

Why convert instead of loading GGUF tensors directly: everything else in jaxlora (sharded
streaming loads, QLoRA, merged exports, PEFT adapters whose `base_model_name_or_path` transformers
can open) speaks HF directories. So a GGUF is converted once — tensors dequantised with the `gguf`
package, llama.cpp's Q/K row permutation undone, config and tokenizer rebuilt from the metadata —
into `$JAXLORA_CACHE/gguf/<sha256 of the file>/`, and from then on it is an ordinary HF directory
(`transformers` loads it too). The cost is disk: the dequantised copy is float32 for models under
1B parameters (exact: a dequantised Q4/Q8 value is an fp16 scale times a small integer, which
bf16 cannot hold) and bfloat16 above (what training keeps a frozen base in anyway).

The directory also keeps the file's `tokenizer.*` metadata verbatim (`gguf_source.json`), so a GGUF
export of a model fine-tuned from a GGUF writes back exactly the tokenizer llama.cpp read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxlora.errors import UserError
from jaxlora.io.no_torch import transformers_without_torch

SOURCE_FILE = "gguf_source.json"
CONVERT_VERSION = "1"  # bump when the conversion's output changes; part of the cache key
# GGUF general.architecture -> HF model_type / architectures entry.
ARCHS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
}
DEQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
# llama.cpp pre-tokenizer names -> how the text is split before byte-level BPE (the same splits
# llama.cpp's llama-vocab.cpp uses for these names).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_SPLITS = {
    "gpt2": None,  # GPT-2's own regex inside ByteLevel
    "default": None,
    "smollm": "digits",  # single digits, then GPT-2's regex
    "llama-bpe": LLAMA3_SPLIT,
    "llama3": LLAMA3_SPLIT,
    "smaug-bpe": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT,
    "deepseek-r1-qwen": QWEN2_SPLIT,
}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp token types


def cache_root() -> Path:
    return Path(os.environ.get("JAXLORA_CACHE", Path.home() / ".cache" / "jaxlora"))


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: a `.gguf` file, or a directory with one and no config.json."""
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").is_file():
        files = sorted(p.glob("*.gguf"))
        if len(files) > 1:
            raise UserError(
                f"{p}: holds {len(files)} .gguf files ({', '.join(f.name for f in files[:4])}); "
                "name one in model_name_or_path"
            )
        return files[0] if files else None
    return None


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_cached_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` in a temporary sibling and rename it to `final` (first writer wins).

    A crash leaves no half-written cache entry; two processes building at once both succeed.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def hf_dir_for_gguf(path: str | Path, *, sha256: str | None = None) -> Path:
    """The cached HF directory for a GGUF file, converted on first use."""
    src = Path(path)
    digest = sha256 or file_sha256(src)
    final = cache_root() / "gguf" / f"{digest[:24]}-v{CONVERT_VERSION}"
    if final.is_dir():
        return final
    print(f"jaxlora: converting {src.name} to a cached HF directory ({final})", file=sys.stderr)
    return build_cached_dir(final, lambda tmp: convert_gguf(src, tmp, sha256=digest))


@functools.cache
def _reader_class():
    # The class from its module, not `gguf.GGUFReader`: that name may be rebound (a test
    # memoises transformers' use of it), and a subclass needs the class itself.
    from gguf.gguf_reader import GGUFReader

    class ArrayViewReader(GGUFReader):
        """gguf's reader over a plain-ndarray view of its memory map (see `open_gguf`)."""

        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return ArrayViewReader


def open_gguf(path: str | Path):
    """A `gguf.GGUFReader` of `path` that parses the header ~2.6x faster, same bytes out.

    The reader slices its `np.memmap` once per value it parses (a 49k-token vocabulary is ~250k
    slices), and every slice of a memmap builds a memmap instance (`__array_finalize__`): most
    of the parse time (SmolLM2-135M: 4.4 s). Over a plain ndarray view of the same mapping the
    slices are plain views: 1.7 s. Nothing is copied; tensor data stays mapped from the file.
    """
    return _reader_class()(str(path))


def read_metadata(reader) -> dict[str, Any]:
    """All key/value fields of a GGUFReader as Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def hf_config(meta: dict[str, Any], tensor_names: set[str], dtype: str) -> dict[str, Any]:
    """HF config.json for a llama / qwen2 / qwen3 GGUF."""
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise UserError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHS)}"
        )
    if "rope_freqs.weight" in tensor_names:
        raise UserError(
            "this GGUF bakes Llama-3.1-style rope scaling into a rope_freqs tensor, which jaxlora "
            "cannot map back to an HF rope_scaling; load the model's HF directory instead"
        )
    model_type, cls = ARCHS[arch]

    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else None
    cfg = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_act": "silu",
        "vocab_size": int(key("vocab_size") or vocab),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv") or heads),
        "head_dim": int(key("attention.key_length") or hidden // heads),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "dtype": dtype,
        "torch_dtype": dtype,
    }
    scaling = key("rope.scaling.type")
    if scaling in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(key("rope.scaling.factor"))}
        if scaling == "yarn":
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(
                key("rope.scaling.original_context_length")
            )
    elif scaling not in (None, "none"):
        raise UserError(f"GGUF rope scaling {scaling!r} is not supported")
    for name, gname in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        tid = meta.get(f"tokenizer.ggml.{gname}_token_id")
        if tid is not None:
            cfg[f"{name}_token_id"] = int(tid)
    return cfg


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf `permute` of a q/k projection's output rows.

    llama.cpp's rope rotates adjacent pairs (x0, x1), (x2, x3)...; HF's rotates halves
    (x_i, x_{i+d/2}). The converter reorders each head's rows [half0 | half1] -> interleaved;
    this puts them back. w: [n_head * head_dim, ...] (HF [out, in] layout, or a bias [out]).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `permute` (the inverse of `unpermute_qk`), for writing GGUF files."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_names(cfg: dict[str, Any]) -> list[str]:
    """HF tensor names the jaxlora model of this config reads, in file order."""
    from jaxlora.io.hf import abstract_params, hf_names
    from jaxlora.models.config import config_from_hf

    mcfg = config_from_hf(cfg, "GGUF metadata")
    abstract, _ = abstract_params(mcfg)
    import jax

    out = []
    for kp, _leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        out.extend(hf_names(tuple(k.key for k in kp), mcfg.num_hidden_layers))
    return out


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: str, n_layers: int):
    """gguf's HF -> GGUF name table for one architecture and depth. Building it formats every
    known name for every block (~30 ms for 30 layers), so a per-tensor rebuild cost 8 s of a
    135M model's 12 s export: built once per (arch, depth)."""
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    return gguf.get_tensor_name_map(arch_enum, n_layers)


def gguf_name(hf_name: str, arch: str, n_layers: int) -> str:
    """GGUF tensor name for an HF tensor name, from the gguf package's own mapping table."""
    base, _, suffix = hf_name.rpartition(".")
    name = _tensor_name_map(arch, n_layers).get_name(base)
    if name is None:
        raise UserError(f"no GGUF name for tensor {hf_name} in architecture {arch}")
    return f"{name}.{suffix}"


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in HF layout ([out, in]; GGUF lists shapes innermost first)."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in DEQUANT_TYPES:
        raise UserError(
            f"GGUF tensor {tensor.name} has type {kind}; supported: {', '.join(DEQUANT_TYPES)}"
        )
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(values, np.float32).reshape(tuple(int(d) for d in reversed(tensor.shape)))


def _convert_tensors(reader, cfg: dict[str, Any], arch: str, out: Path, np_dtype) -> None:
    from safetensors.numpy import save_file

    by_name = {t.name: t for t in reader.tensors}
    n_layers = cfg["num_hidden_layers"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shard: dict[str, np.ndarray] = {}
    shards: list[dict[str, np.ndarray]] = [shard]
    size, limit = 0, 2 * 1024**3
    from tqdm.auto import tqdm

    names = hf_tensor_names(cfg)
    for name in tqdm(names, desc="dequantising", unit="tensor", disable=not sys.stderr.isatty()):
        gname = gguf_name(name, arch, n_layers)
        if gname not in by_name:
            raise UserError(f"GGUF file lacks tensor {gname} (HF {name})")
        w = dequantize(by_name[gname])
        if arch == "llama" and ".self_attn.q_proj." in name:
            w = unpermute_qk(w, heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            w = unpermute_qk(w, kv_heads)
        w = np.ascontiguousarray(w.astype(np_dtype))
        if size + w.nbytes > limit and shard:
            shard, size = {}, 0
            shards.append(shard)
        shard[name] = w
        size += w.nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in tensors})
    if len(shards) > 1:
        index = {"metadata": {}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def build_tokenizer(meta: dict[str, Any]):
    """A transformers fast tokenizer from GGUF `tokenizer.*` metadata (byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pt

    transformers_without_torch()
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(
            f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2', as in "
            "Llama 3, Qwen2/3 and SmolLM); load the model's HF directory instead"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_SPLITS:
        raise UserError(
            f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(PRE_SPLITS)}"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    split = PRE_SPLITS[pre]
    if split is None:
        tok.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tok.pre_tokenizer = pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pt.Sequence(
            [
                pt.Split(Regex(split), behavior="isolated"),
                pt.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if split == QWEN2_SPLIT:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>...) stay whole and special; user-defined ones stay whole.
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    kinds = list(zip(tokens, types, strict=True))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in kinds if k == TOKEN_CONTROL]
    )
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in kinds if k == TOKEN_USER_DEFINED])

    def token(name):
        tid = meta.get(f"tokenizer.ggml.{name}_token_id")
        return tokens[int(tid)] if tid is not None and int(tid) < len(tokens) else None

    bos = token("bos")
    post = [processors.ByteLevel(trim_offsets=False)]
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        post.append(
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, tokens.index(bos))],
            )
        )
    tok.post_processor = processors.Sequence(post)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def convert_gguf(src: str | Path, out: str | Path, *, sha256: str | None = None) -> Path:
    """Write an HF checkpoint directory (config, safetensors, tokenizer) for a GGUF file."""
    src, out = Path(src), Path(out)
    try:
        reader = open_gguf(src)
    except (ValueError, OSError) as e:
        raise UserError(f"{src}: not a readable GGUF file ({e})") from None
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    arch = meta.get("general.architecture")
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    dtype = "float32" if n_params < 1e9 else "bfloat16"
    cfg = hf_config(meta, names, dtype)
    tokenizer = build_tokenizer(meta)  # before the tensors: an unsupported vocab fails fast
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.float32 if dtype == "float32" else _bf16()
    _convert_tensors(reader, cfg, arch, out, np_dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    tokenizer.save_pretrained(str(out))
    kept = {k: v for k, v in meta.items() if k.startswith(("tokenizer.", "general."))}
    source = {"file": src.name, "sha256": sha256, "architecture": arch, "metadata": kept}
    (out / SOURCE_FILE).write_text(json.dumps(source, ensure_ascii=False))
    return out


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16
