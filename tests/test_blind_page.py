"""`jaxlora blind`: a real headless Chromium rates a session prepared by the CLI on the tiny model.

One session (3 prompts from demo:identity_sft, 8 new tokens, a random adapter in a run dir) is
rated by two raters with clicks and keys, reloaded mid-session, checked on disk, reported, and
its run report links the blind report. Before unblinding, neither the DOM nor any response the
browser receives may name a model, a path or the answer order. The tiny model cannot write
markup, so one answer is replaced by a `<script>` payload that must stay text.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import httpx
import jax
import pytest
from live_server import live_server

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture skips the tests
    expect = None

import jaxlora
from jaxlora.cli.app import main
from jaxlora.evaluate.blind_report import unblind
from jaxlora.evaluate.blind_server import build_blind_app
from jaxlora.evaluate.blind_session import Session
from jaxlora.io.peft import save_peft_adapter
from jaxlora.peft.lora import Adapter, LoraConfig, init_lora, parse_targets

CHROMIUM = os.environ.get("JAXLORA_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAYLOAD = '<script>window.__pwned = 1</script><img src="x" onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from playwright import sync_api

    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A training run as the trainer leaves it: config, metrics, adapter (random, non-zero B)."""
    run = tmp_path_factory.mktemp("run")
    model = jaxlora.load_model(tiny_model_dir, dtype="float32")
    lcfg = LoraConfig(rank=4, alpha=8, targets=parse_targets("all"))
    params = init_lora(jax.random.key(0), model.params, lcfg)
    noise = jax.random.key(1)
    params = jax.tree_util.tree_map(lambda x: x + 0.3 * jax.random.normal(noise, x.shape), params)
    save_peft_adapter(Adapter(params, lcfg), run / "adapter", base_model=str(tiny_model_dir))
    cfg = f"model_name_or_path: {tiny_model_dir}\ndataset: demo:identity_sft\noutput_dir: {run}\n"
    (run / "config.yaml").write_text(cfg)
    metrics = [{"step": s, "train/loss": 3.0 - 0.1 * s, "train/lr": 1e-4} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


@pytest.fixture(scope="module")
def session_dir(run_dir, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("blind") / "session"
    argv = ["blind", "prepare", "--out", str(out), "--adapter", str(run_dir)]
    argv += ["--model", str(tiny_model_dir), "--dataset", "demo:identity_sft"]
    argv += ["--max-samples", "3", "--max-new-tokens", "8", "--dtype", "float32", "--seed", "1"]
    assert main(argv) == 0
    items = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    items[0]["answers"][items[0]["order"][0]] = PAYLOAD  # shown as Answer 1 of the first item
    (out / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    return out


def _rate_with_clicks(page, scores1, scores2, pref, comment):
    for pos, scores in (("1", scores1), ("2", scores2)):
        for dim, v in zip(("accuracy", "completeness", "logic", "fluency"), scores, strict=True):
            page.check(f'input[name="s-{pos}-{dim}"][value="{v}"]')
    page.check(f'input[name="pref"][value="{pref}"]')
    page.fill("#comment", comment)
    page.click("#save")


def _rate_with_keys(page, keys, pref_key):
    for k in keys:
        page.keyboard.press(k)
    page.keyboard.press(pref_key)
    page.keyboard.press("Enter")


def _at_item(page, i):
    # expect() polls without eval (the page's CSP forbids it, so wait_for_function cannot).
    expect(page.locator("#item-no")).to_have_text(re.compile(rf"^{i} of 3$"))


def _ratings(session_dir):
    return [json.loads(x) for x in (session_dir / "ratings.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_rate_reload_report_without_leaks(browser, session_dir, run_dir, tiny_model_dir):
    session = Session(session_dir)
    orders = [it["order"][0] for it in session.items]
    assert sorted(orders) == ["base", "tuned", "tuned"]  # counterbalanced, shuffled
    leaks = [str(run_dir), str(tiny_model_dir), run_dir.name, "tuned", '"base"', '"order"']
    seen: list[str] = []  # every body the browser receives

    def record(route):
        resp = route.fetch()
        seen.append(resp.text())
        route.fulfill(response=resp)

    with live_server(build_blind_app(session)) as url:
        ctx = browser.new_context()
        page = ctx.new_page()
        page.route("**/*", record)
        page.goto(f"{url}/#token={session.token}")
        page.fill("#rater", "alice")
        page.click("#begin")
        page.wait_for_selector("#rate:not([hidden])")
        # Item 1 holds the payload: shown as text, never run.
        assert page.text_content("#answer-1") == PAYLOAD
        assert page.evaluate("document.querySelectorAll('.answer script, .answer img').length") == 0
        assert page.evaluate("window.__pwned") is None
        assert "1 of 3" in page.text_content("#item-no")
        _rate_with_clicks(page, [5, 4, 4, 5], [2, 3, 2, 3], "1", "first is better")
        _at_item(page, 2)
        _rate_with_keys(page, ["2", "2", "3", "3", "4", "4", "5", "5"], "b")
        _at_item(page, 3)
        page.reload()  # mid-session: back at the first unrated item, rater remembered
        _at_item(page, 3)
        assert page.text_content("#progress") == "2 of 3 rated"
        page.keyboard.press(
            "Enter"
        )  # incomplete: nothing is saved, the cursor shows what is missing
        assert "Score accuracy of Answer 1" in page.text_content("#status")
        _rate_with_keys(page, ["3", "3", "3", "3", "3", "3", "3", "3"], "t")
        page.wait_for_selector("#done:not([hidden])")
        assert page.text_content("#progress") == "3 of 3 rated"
        dom = page.content()
        # A second rater in a fresh browser profile, with the page's CSP switched off: the
        # payload must stay text through escaping alone. Disagrees on the first two items.
        ctx2 = browser.new_context(bypass_csp=True)
        page2 = ctx2.new_page()
        page2.route("**/*", record)
        page2.goto(f"{url}/#token={session.token}")
        page2.fill("#rater", "bob")
        page2.click("#begin")
        _at_item(page2, 1)
        assert page2.text_content("#answer-1") == PAYLOAD
        assert page2.evaluate("window.__pwned") is None
        for i, pref in enumerate(["b", "a", "t"], start=1):
            _at_item(page2, i)
            _rate_with_keys(page2, ["4", "4", "4", "4", "2", "2", "2", "2"], pref)
        page2.wait_for_selector("#done:not([hidden])")
        dom += page2.content()
        for text in [dom, *seen]:
            for marker in leaks:
                assert marker not in text, f"{marker!r} reached the browser before unblinding"

        ratings = _ratings(session_dir)
        assert [(r["rater"], r["item"], r["preference"]) for r in ratings] == [
            ("alice", 0, "1"),
            ("alice", 1, "2"),
            ("alice", 2, "tie"),
            ("bob", 0, "2"),
            ("bob", 1, "1"),
            ("bob", 2, "tie"),
        ]
        assert ratings[0]["scores"] == {
            "1": {"accuracy": 5, "completeness": 4, "logic": 4, "fluency": 5},
            "2": {"accuracy": 2, "completeness": 3, "logic": 2, "fluency": 3},
        }
        assert ratings[0]["comment"] == "first is better"
        assert ratings[1]["scores"]["2"] == {
            "accuracy": 4,
            "completeness": 4,
            "logic": 5,
            "fluency": 5,
        }

        assert main(["blind", "report", str(session_dir)]) == 0
        res = json.loads((session_dir / "results.json").read_text())
        # Each rater preferred a different position on items 1 and 2, and both tied item 3.
        assert {v: res["verdicts"][v]["n"] for v in ("win", "tie", "loss")} == {
            "win": 2,
            "tie": 2,
            "loss": 2,
        }
        rows = {(r["rater"], r["item"]): r for r in unblind(Session(session_dir))}
        first = session.items[0]["order"][0]  # the side alice preferred on item 1
        assert rows[("alice", 0)]["verdict"] == ("win" if first == "tuned" else "loss")
        assert rows[("alice", 0)]["scores"][first] == ratings[0]["scores"]["1"]
        assert [a["raters"] for a in res["agreement"]] == [["alice", "bob"]]
        assert res["agreement"][0]["kappa_verdict"] < 0.5
        assert {d["item"] for d in res["disagreed"][:2]} == {0, 1}
        report = (session_dir / "report.md").read_text()
        assert "## Tuned vs base" in report and "![blind evaluation](report.png)" in report
        assert (session_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        run_report = (run_dir / "report.md").read_text()
        assert (
            "## Blind evaluations" in run_report and "report.md" in run_report.split("## Blind")[1]
        )

        # Closed: the page says so and a rating is refused.
        page.reload()
        page.wait_for_selector("#closed:not([hidden])")
        headers = {"X-Session-Token": session.token}
        body = {
            "item": 0,
            "rater": "carol",
            "scores": ratings[0]["scores"],
            "preference": "tie",
            "comment": "",
        }
        r = httpx.post(f"{url}/api/ratings", json=body, headers=headers)
        assert r.status_code == 409
        assert len(_ratings(session_dir)) == 6
        ctx.close()
        ctx2.close()
