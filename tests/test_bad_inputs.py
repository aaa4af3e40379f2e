"""The bad-input matrix: every mistake ends in one clear `error:` line, a non-zero exit code,
no traceback, and nothing half-written.

Each case goes through the CLI in-process (`jaxlora.cli.main`) and checks: exit code != 0, exactly
one stderr line starting with `error:` that names the file / row / field / key, no "Traceback",
and that no output directory appeared (or the previous export is byte-for-byte untouched).
Security cases (paths escaping the dataset dir, sandboxed templates, remote code, pickles) are
here too: they are bad inputs of the hostile kind. Everything fails before any step is compiled,
so the whole file runs in well under a minute.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxlora.cli import main

# ------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from jaxlora.io.tiny import MICRO_MODEL, make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("bad-model"),
        **MICRO_MODEL,
    )


def _copy_model(src: Path, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


class Marker:
    """A pickle whose unpickling creates `path` (proof that something unpickled it)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _write_pickle_bomb(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps({"model.embed_tokens.weight": Marker(marker)}))


def _cfg(tmp_path: Path, model: Path | str, **kw) -> Path:
    """A config that would train for 2 steps if nothing were wrong."""
    base = {
        "model_name_or_path": str(model),
        "dataset": "demo:identity_sft",
        "cutoff_len": 64,
        "max_samples": 8,
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "bf16": False,
        "output_dir": str(tmp_path / "out"),
    }
    base.update(kw)
    path = tmp_path / "cfg.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in base.items()))
    return path


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    except BaseException as e:  # noqa: BLE001 - the point is that nothing escapes
        pytest.fail(f"the CLI raised {type(e).__name__}: {e} instead of printing one error line")
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_refused(rc, out: str, err: str, *needles: str, no_dir: Path | None = None) -> str:
    assert rc not in (0, None), (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    if no_dir is not None:
        assert not no_dir.exists(), f"{no_dir} was created: {sorted(os.listdir(no_dir))}"
    return errors[0]


def _train_refused(tmp_path, capsys, model, *needles, **cfg_kw) -> str:
    cfg = _cfg(tmp_path, model, **cfg_kw)
    rc, out, err = _cli(["train", cfg, "--no-progress"], capsys)
    return _assert_refused(rc, out, err, *needles, no_dir=tmp_path / "out")


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _no_leftovers(parent: Path) -> None:
    junk = [p.name for p in parent.iterdir() if ".tmp" in p.name or ".old-" in p.name]
    assert not junk, f"temporary export dirs left behind: {junk}"


# ------------------------------------------------------------------------------- data files
ROWS = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three")]

DATA_CASES = {
    "malformed_json": (
        "data.json",
        '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
        ("data.json line 2 column", "invalid JSON"),
    ),
    "malformed_jsonl_line": (
        "data.jsonl",
        "\n".join(json.dumps(r) for r in ROWS[:2]) + '\n{"instruction": "x", "output": \n',
        ("data.jsonl line 3", "invalid JSON"),
    ),
    "wrong_type": (
        "data.json",
        json.dumps([ROWS[0], {"instruction": "Count.", "output": 5}]),
        ("data.json row 2", 'field "output"', "string", "int"),
    ),
    "wrong_type_conversations": (
        "data.json",
        json.dumps([{"conversations": {"from": "human", "value": "hi"}}]),
        ("data.json row 1", '"conversations"'),
    ),
    "missing_field": (
        "data.json",
        json.dumps([*ROWS[:2], {"instruction": "No answer here."}]),
        ("data.json row 3", 'missing field "output"'),
    ),
    "row_not_object": ("data.json", "[1, 2]", ("data.json row 1", "object")),
    "empty_array": ("data.json", "[]", ("data.json", "empty")),
    "empty_jsonl": ("data.jsonl", "\n\n", ("data.jsonl", "empty")),
    "unknown_format": (
        "data.json",
        json.dumps([{"question": "q", "answer": "a"}]),
        ("data.json row 1", "format", "question"),
    ),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_dataset_file(case, model_dir, tmp_path, capsys):
    name, text, needles = DATA_CASES[case]
    (tmp_path / name).write_text(text)
    _train_refused(tmp_path, capsys, model_dir, *needles, dataset=str(tmp_path / name))


def test_dataset_not_found_suggests(model_dir, tmp_path, capsys):
    (tmp_path / "train_data.json").write_text(json.dumps(ROWS))
    _train_refused(
        tmp_path,
        capsys,
        model_dir,
        "train_dta.json",
        "not found",
        "train_data.json",
        dataset="train_dta.json",
        dataset_dir=str(tmp_path),
    )


def test_tiny_cutoff_truncates_but_never_empties_the_dataset(tmp_path):
    """ "All samples truncated away" cannot happen for SFT: truncation keeps at least
    cutoff_len // 2 answer tokens (the prompt gives way), so a tiny cutoff_len yields short
    samples that all still train on their answer, and the data report counts them."""
    from jaxlora.data import load_sft_dataset
    from jaxlora.io.tiny import build_tokenizer

    long = [{"instruction": "word " * 40, "output": "answer " * 20} for _ in range(4)]
    (tmp_path / "long.json").write_text(json.dumps(long))
    tok = build_tokenizer(None, template="chatml")
    train, _, report = load_sft_dataset(tok, dataset=str(tmp_path / "long.json"), cutoff_len=8)
    assert len(train) == 4 and report.n_truncated == 4 and report.n_answer_truncated == 4
    for ex in train:
        assert len(ex.input_ids) == 8 and ex.loss_mask[1:].sum() >= 4


# ------------------------------------------------------------------------------- templates
@pytest.fixture(scope="module")
def no_template_model(model_dir, tmp_path_factory) -> Path:
    """The tiny model with its tokenizer's chat template removed (a base model)."""
    d = _copy_model(
        model_dir, tmp_path_factory.mktemp("nochat") / "m", drop=("chat_template.jinja",)
    )
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    from jaxlora.io.model import load_tokenizer

    assert not load_tokenizer(d).chat_template
    return d


def test_tokenizer_without_chat_template_and_none_given(no_template_model, tmp_path, capsys):
    _train_refused(tmp_path, capsys, no_template_model, "no chat template", "`template`")


def test_unknown_template_name(no_template_model, tmp_path, capsys):
    _train_refused(
        tmp_path,
        capsys,
        no_template_model,
        "`template`",
        "'chatmll'",
        "did you mean `chatml`",
        template="chatmll",
    )


def test_chat_template_that_is_not_jinja(model_dir, tmp_path, capsys):
    _train_refused(tmp_path, capsys, model_dir, "`chat_template`", chat_template="my_template_name")


# ------------------------------------------------------------------------------- model dirs
# The run directory is claimed before the model is loaded (cheap checks first), so these cases
# also check that a model that fails to load leaves no output_dir behind.


def test_model_dir_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    _train_refused(tmp_path, capsys, missing, str(missing), "does not exist")


def test_model_dir_without_config(model_dir, tmp_path, capsys):
    m = _copy_model(model_dir, tmp_path / "m", drop=("config.json",))
    _train_refused(tmp_path, capsys, m, "no config.json")


def test_model_dir_without_weights(model_dir, tmp_path, capsys):
    m = _copy_model(model_dir, tmp_path / "m", drop=("model.safetensors",))
    _train_refused(tmp_path, capsys, m, str(m), "safetensors")


def test_unsupported_architecture(model_dir, tmp_path, capsys):
    m = _copy_model(model_dir, tmp_path / "m")
    raw = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    _train_refused(tmp_path, capsys, m, "config.json", "model_type 'gpt2' is not supported")


def test_bin_only_weights_are_refused_and_never_unpickled(model_dir, tmp_path, capsys):
    m = _copy_model(model_dir, tmp_path / "m", drop=("model.safetensors",))
    marker = tmp_path / "UNPICKLED"
    _write_pickle_bomb(m / "pytorch_model.bin", marker)
    _train_refused(tmp_path, capsys, m, "pytorch_model.bin", "safetensors")
    assert not marker.exists()


def test_bin_next_to_safetensors_is_never_read(model_dir, tmp_path):
    import jaxlora

    m = _copy_model(model_dir, tmp_path / "m")
    marker = tmp_path / "UNPICKLED"
    _write_pickle_bomb(m / "pytorch_model.bin", marker)
    _write_pickle_bomb(m / "training_args.bin", marker)
    model = jaxlora.load_model(m, dtype="float32")
    assert model.params["embed_tokens"]["embedding"].shape[1] == 32
    assert not marker.exists()


# ------------------------------------------------------------------------------- adapters
def _write_adapter(d: Path, *, d_in: int, d_out: int, layers: int = 1, base: str = "x") -> Path:
    from jaxlora.io.peft import save_peft_adapter
    from jaxlora.peft.lora import Adapter, LoraConfig

    rng = np.random.default_rng(0)
    node = {
        "lora_a": rng.normal(size=(layers, d_in, 4)).astype(np.float32),
        "lora_b": rng.normal(size=(layers, 4, d_out)).astype(np.float32) * 0.01,
    }
    adapter = Adapter({"layers": {"self_attn": {"q_proj": node}}}, LoraConfig(rank=4, alpha=8.0))
    save_peft_adapter(adapter, d, base_model=base)
    return d


def test_adapter_for_another_base_model(model_dir, tmp_path, capsys):
    ad = _write_adapter(tmp_path / "other-adapter", d_in=48, d_out=48, base="other-model")
    err = _train_refused(
        tmp_path, capsys, model_dir, str(ad), "q_proj", adapter_name_or_path=str(ad)
    )
    assert "different base model" in err


def test_adapter_bin_only_refused_and_never_unpickled(model_dir, tmp_path, capsys):
    ad = _write_adapter(tmp_path / "ad", d_in=32, d_out=32)
    (ad / "adapter_model.safetensors").unlink()
    marker = tmp_path / "UNPICKLED"
    _write_pickle_bomb(ad / "adapter_model.bin", marker)
    _train_refused(tmp_path, capsys, model_dir, "adapter_model.bin", adapter_name_or_path=str(ad))
    assert not marker.exists()
    rc, out, err = _cli(["export", ad, "--out", tmp_path / "exp"], capsys)
    _assert_refused(rc, out, err, "adapter_model.bin", no_dir=tmp_path / "exp")
    assert not marker.exists()


def test_adapter_dir_without_config(model_dir, tmp_path, capsys):
    (tmp_path / "ad").mkdir()
    _train_refused(
        tmp_path,
        capsys,
        model_dir,
        "adapter_config.json",
        adapter_name_or_path=str(tmp_path / "ad"),
    )


# ------------------------------------------------------------------------------- config
CONFIG_CASES = {
    "typo": ({"lora_rnak": 8}, ("lora_rnak", "did you mean `lora_rank`")),
    "typo_choice": ({"lr_scheduler_type": "cosin"}, ("lr_scheduler_type", "`cosine`")),
    "wrong_type": ({"lora_rank": "eight"}, ("lora_rank", "integer", "eight")),
    "out_of_range": ({"lora_dropout": 1.5}, ("lora_dropout", "1.5")),
    "warmup_both": ({"warmup_ratio": 0.1, "warmup_steps": 5}, ("warmup_ratio", "warmup_steps")),
    "quant_full": (
        {"quantization_bit": 4, "finetuning_type": "full"},
        ("quantization_bit", "finetuning_type"),
    ),
    "template_and_chat_template": (
        {"template": "chatml", "chat_template": "{{ messages }}"},
        ("template", "chat_template"),
    ),
    "val_size_and_eval_dataset": (
        {"val_size": 0.1, "eval_dataset": "demo:identity_sft"},
        ("val_size", "eval_dataset"),
    ),
    "unsupported_feature": ({"use_galore": True}, ("use_galore", "not supported")),
    "nested_group": ({"train": {"learning_rate": 1e-4}}, ("flat",)),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case, model_dir, tmp_path, capsys):
    kw, needles = CONFIG_CASES[case]
    _train_refused(tmp_path, capsys, model_dir, "cfg.yaml", *needles, **kw)


def test_bad_override_on_command_line(model_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path, model_dir)
    rc, out, err = _cli(["train", cfg, "--no-progress", "learnig_rate=1e-4"], capsys)
    _assert_refused(
        rc, out, err, "command line", "did you mean `learning_rate`", no_dir=tmp_path / "out"
    )


def test_duplicate_yaml_key_and_missing_config_file(tmp_path, capsys):
    dup = tmp_path / "dup.yaml"
    dup.write_text("lora_rank: 8\nlora_rank: 16\n")
    rc, out, err = _cli(["train", dup], capsys)
    _assert_refused(rc, out, err, "dup.yaml", "line 2", "lora_rank")
    rc, out, err = _cli(["train", tmp_path / "nope.yaml"], capsys)
    _assert_refused(rc, out, err, "nope.yaml", "not found")


# ------------------------------------------------------------------------------- output dir
def test_output_dir_under_a_file(model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    cfg = _cfg(tmp_path, model_dir, output_dir=str(out))
    rc, o, err = _cli(["train", cfg, "--no-progress"], capsys)
    _assert_refused(rc, o, err, "output_dir", str(out), "not writable")
    assert (tmp_path / "afile").read_text() == "x"


def test_output_dir_parent_read_only(model_dir, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as root: chmod 555 does not make a directory read-only")
        out = parent / "run"
        cfg = _cfg(tmp_path, model_dir, output_dir=str(out))
        rc, o, err = _cli(["train", cfg, "--no-progress"], capsys)
        _assert_refused(rc, o, err, "output_dir", "not writable", no_dir=out)
    finally:
        parent.chmod(0o755)


def test_existing_unrelated_output_dir_is_not_touched(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    cfg = _cfg(tmp_path, model_dir)
    rc, o, err = _cli(["train", cfg, "--no-progress"], capsys)
    _assert_refused(rc, o, err, "output_dir", "overwrite_output_dir")
    assert sorted(os.listdir(out)) == ["precious.txt"]


def test_finished_run_without_checkpoints_is_not_wiped(model_dir, tmp_path, capsys):
    """A finished run whose checkpoints/ the user deleted to save space still holds the
    adapter and report: rerunning the command must refuse, not restart over it."""
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, model_dir)
    _write_adapter(out / "adapter", d_in=32, d_out=32, base=str(model_dir))
    (out / "config.yaml").write_text(cfg.read_text())
    (out / "metrics.jsonl").write_text('{"step": 2, "train/loss": 1.0}\n')
    (out / "report.md").write_text("# report\n")
    before = _snapshot(out)
    rc, o, err = _cli(["train", cfg, "--no-progress"], capsys)
    _assert_refused(rc, o, err, "output_dir", str(out), "overwrite_output_dir")
    assert _snapshot(out) == before


# ------------------------------------------------------------------------------- export
@pytest.fixture
def adapter_dir(model_dir, tmp_path) -> Path:
    return _write_adapter(tmp_path / "adapter-src", d_in=32, d_out=32, base=str(model_dir))


def test_export_never_clobbers_without_overwrite(adapter_dir, tmp_path, capsys):
    dest = tmp_path / "exp"
    rc, out, err = _cli(["export", adapter_dir, "--out", dest], capsys)
    assert rc == 0, err
    before = _snapshot(dest)
    assert "adapter_model.safetensors" in before and "tokenizer_config.json" in before
    rc, out, err = _cli(["export", adapter_dir, "--out", dest, "--merged"], capsys)
    _assert_refused(rc, out, err, str(dest), "--overwrite")
    assert _snapshot(dest) == before
    rc, out, err = _cli(["export", adapter_dir, "--out", dest, "--overwrite"], capsys)
    assert rc == 0, err
    _no_leftovers(tmp_path)


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_at(point: str, monkeypatch, dest: Path) -> None:
    """Simulate a full disk at one point of an export to `dest`."""
    if point == "weights":
        import safetensors.numpy

        monkeypatch.setattr(safetensors.numpy, "save_file", _enospc)  # adapter files
        real_open = builtins.open

        def full_open(file, mode="r", *a, **k):  # merged shards (hf.write_safetensors)
            if any(c in mode for c in "wax") and str(file).endswith(".safetensors"):
                _enospc()
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr(builtins, "open", full_open)
    elif point == "tokenizer":
        real_open = builtins.open

        def full_open(file, mode="r", *a, **k):
            if any(c in mode for c in "wax") and Path(str(file)).name == "tokenizer_config.json":
                _enospc()
            return real_open(file, mode, *a, **k)

        monkeypatch.setattr(builtins, "open", full_open)
    elif point == "final_rename":
        real_rename = os.rename

        def rename(src, dst, *a, **k):
            if Path(src).name.startswith(f".{dest.name}.tmp"):
                _enospc()
            return real_rename(src, dst, *a, **k)

        monkeypatch.setattr(os, "rename", rename)
    else:
        raise AssertionError(point)


@pytest.mark.parametrize("merged", [False, True], ids=["adapter", "merged"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
@pytest.mark.parametrize("point", ["weights", "tokenizer", "final_rename"])
def test_disk_full_during_export(
    point, existing, merged, adapter_dir, tmp_path, capsys, monkeypatch
):
    dest = tmp_path / "exp"
    before = None
    if existing:
        rc, out, err = _cli(["export", adapter_dir, "--out", dest], capsys)
        assert rc == 0, err
        before = _snapshot(dest)
    _fail_at(point, monkeypatch, dest)
    argv = ["export", adapter_dir, "--out", dest, *(["--merged"] if merged else [])]
    rc, out, err = _cli([*argv, *(["--overwrite"] if existing else [])], capsys)
    monkeypatch.undo()
    line = _assert_refused(rc, out, err, str(dest), no_dir=None if existing else dest)
    assert "No space left on device" in line, line
    if existing:
        assert _snapshot(dest) == before, "the previous export was changed"
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------- security
@pytest.fixture
def registry_dir(tmp_path) -> Path:
    """A LLaMA-Factory data dir next to a 'secret' file outside it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = [{"instruction": "SECRET-INSTRUCTION", "output": "SECRET-ANSWER"}]
    (outside / "secret.json").write_text(json.dumps(secret))
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.json").write_text(json.dumps(ROWS))
    (data / "link.json").symlink_to(outside / "secret.json")
    return data


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_dataset_info_file_name_cannot_escape_dataset_dir(
    kind, registry_dir, model_dir, tmp_path, capsys
):
    secret = tmp_path / "outside" / "secret.json"
    file_name = {
        "dotdot": "../outside/secret.json",
        "absolute": str(secret),
        "symlink": "link.json",
    }
    info = {"ok": {"file_name": "ok.json"}, "evil": {"file_name": file_name[kind]}}
    (registry_dir / "dataset_info.json").write_text(json.dumps(info))

    from jaxlora.data import load_sft_dataset
    from jaxlora.errors import UserError
    from jaxlora.io.tiny import build_tokenizer

    tok = build_tokenizer(None, template="chatml")
    train, _, _ = load_sft_dataset(tok, dataset="ok", dataset_dir=str(registry_dir))
    assert len(train) == 3  # a registry entry inside the dir works
    with pytest.raises(UserError, match="dataset_info.json") as exc:
        load_sft_dataset(tok, dataset="evil", dataset_dir=str(registry_dir))
    assert "evil" in str(exc.value) and "outside" in str(exc.value).lower()

    # Same through the CLI (`data stats` reads the data and nothing else).
    cfg = _cfg(tmp_path, model_dir, dataset="evil", dataset_dir=str(registry_dir))
    rc, out, err = _cli(["data", "stats", cfg, "--out", tmp_path / "stats"], capsys)
    _assert_refused(rc, out, err, "evil", no_dir=tmp_path / "out")
    assert "SECRET" not in out + err


PAYLOADS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch MARKER') }}",
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=["mro", "cycler_globals", "self_globals"])
def test_chat_template_is_sandboxed(payload, model_dir, tmp_path, capsys, monkeypatch):
    from jaxlora.data.templates import CHATML_TEMPLATE

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    evil = CHATML_TEMPLATE + payload.replace("MARKER", str(marker))
    err = _train_refused(tmp_path, capsys, model_dir, "chat template", chat_template=evil)
    assert "unsafe" in err or "undefined" in err, err
    assert not marker.exists()


def test_trust_remote_code_is_ignored_with_a_note(model_dir, tmp_path, capsys):
    cfg = _cfg(tmp_path, model_dir, trust_remote_code=True, dataset=str(tmp_path / "none.json"))
    rc, out, err = _cli(["train", cfg, "--no-progress"], capsys)
    _assert_refused(rc, out, err, "none.json", no_dir=tmp_path / "out")
    notes = [x for x in (out + err).splitlines() if "trust_remote_code" in x]
    assert notes and "never runs remote code" in notes[0], out + err


def test_tokenizer_with_custom_code_is_never_run(model_dir, tmp_path, capsys):
    m = _copy_model(model_dir, tmp_path / "m")
    marker = tmp_path / "REMOTE_CODE_RAN"
    (m / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    tc["tokenizer_class"] = "EvilTokenizer"
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    cfg = _cfg(tmp_path, m, trust_remote_code=True)
    rc, out, err = _cli(["train", cfg, "--no-progress"], capsys)
    assert not marker.exists()
    _assert_refused(rc, out, err, str(m), "remote code", no_dir=tmp_path / "out")
