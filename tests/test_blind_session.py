"""Blind sessions without a model or browser: API guards, unblinding, statistics, report text."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from live_server import live_server

from jaxlora.evaluate.blind_report import (
    cohen_kappa,
    mean_ci,
    unblind,
    wilson,
    write_blind_report,
)
from jaxlora.evaluate.blind_server import build_blind_app
from jaxlora.evaluate.blind_session import Session, create_session

DIMS = ("accuracy", "completeness", "logic", "fluency")


def _items(n):
    return [
        {
            "set": "task",
            "messages": [{"role": "user", "content": f"question {i} <b>|x"}],
            "reference": None,
            "answers": {"base": f"base answer {i}", "tuned": f"tuned answer {i}"},
        }
        for i in range(n)
    ]


def _scores(a, b):
    return {"1": dict.fromkeys(DIMS, a), "2": dict.fromkeys(DIMS, b)}


def _rating(item, rater="r", pref="1", a=4, b=2, comment=""):
    return {
        "item": item,
        "rater": rater,
        "scores": _scores(a, b),
        "preference": pref,
        "comment": comment,
    }


@pytest.fixture
def session(tmp_path):
    create_session(
        tmp_path / "s",
        _items(4),
        sides={"base": {"model": "m"}, "tuned": {"model": "m", "adapter": "a"}},
        generation={},
        datasets=["d"],
        seed=0,
    )
    return Session(tmp_path / "s")


def test_statistics_match_known_values():
    # Wikipedia's Cohen's kappa example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4.
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b, ["y", "n"]) == pytest.approx(0.4)
    five = [1, 2, 3, 4, 5]
    assert cohen_kappa(five, five, five, weights="quadratic") == pytest.approx(1.0)
    assert cohen_kappa(five, five[::-1], five, weights="quadratic") == pytest.approx(-1.0)
    assert np.isnan(cohen_kappa(["y", "y"], ["y", "y"], ["y", "n"]))
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    m, lo, hi = mean_ci([1, 2, 3])
    assert (m, hi - m) == pytest.approx((2.0, 4.302653 / np.sqrt(3)))
    assert np.isnan(mean_ci([3])[1])


def test_orders_are_counterbalanced_and_hidden(session):
    assert sorted(it["order"][0] for it in session.items) == ["base", "base", "tuned", "tuned"]
    for i, it in enumerate(session.items):
        view = session.public_item(i)
        assert set(view) == {"id", "n", "messages", "reference", "answers"}
        assert view["answers"] == [it["answers"][s] for s in it["order"]]


def test_unblinding_maps_positions_to_sides_and_last_rating_wins(session):
    session.append_rating(_rating(0, pref="2"))  # superseded below
    for i in range(4):
        session.append_rating(_rating(i, pref="1", a=5, b=1))  # always prefers Answer 1
    rows = unblind(session)
    assert len(rows) == 4
    for row, item in zip(rows, session.items, strict=True):
        first = item["order"][0]
        assert row["verdict"] == ("win" if first == "tuned" else "loss")
        assert row["scores"][first] == dict.fromkeys(DIMS, 5)
    path = write_blind_report(session)
    res = json.loads((session.path / "results.json").read_text())
    assert [res["verdicts"][v]["n"] for v in ("win", "tie", "loss")] == [2, 0, 2]
    assert res["dimensions"]["logic"]["diff"][0] == pytest.approx(0.0)  # +4 twice, -4 twice
    text = path.read_text()
    assert "| tuned better | 2 | 50% |" in text
    assert session.closed  # the report unblinds and closes the session


def test_api_guards_writes(session):
    path = session.path / "ratings.jsonl"
    with live_server(build_blind_app(session)) as url:
        page = httpx.get(f"{url}/")
        assert (
            page.status_code == 200
            and "script-src 'self'" in page.headers["content-security-policy"]
        )
        assert "<script>" not in page.text  # no inline script: the page's JS is a file
        assert httpx.get(f"{url}/static/..%2Fblind_session.py").status_code == 404
        assert httpx.get(f"{url}/api/items/0").status_code == 401
        assert httpx.get(f"{url}/api/items/0", headers={"X-Session-Token": "x"}).status_code == 401
        tok = {"X-Session-Token": session.token}
        assert httpx.get(f"{url}/api/items/9", headers=tok).status_code == 404
        item = httpx.get(f"{url}/api/items/1", headers=tok).json()
        assert item["answers"] == session.public_item(1)["answers"]
        assert httpx.post(f"{url}/api/ratings", json=_rating(0)).status_code == 401
        assert path.read_text() == ""
        good = _rating(0)
        bad = [
            {**good, "item": 4},
            {**good, "item": True},
            {**good, "rater": " "},
            {**good, "preference": "3"},
            {**good, "comment": "x" * 5000},
            {**good, "extra": 1},
            {k: v for k, v in good.items() if k != "scores"},
            {**good, "scores": _scores(6, 1)},
            {**good, "scores": _scores(True, 1)},
            {**good, "scores": {"1": dict.fromkeys(DIMS, 3)}},
            [good],
        ]
        for body in bad:
            r = httpx.post(f"{url}/api/ratings", json=body, headers=tok)
            assert r.status_code == 400, body
            assert r.json()["error"].startswith("malformed rating")
        r = httpx.post(
            f"{url}/api/ratings",
            content=b"{oops",
            headers={**tok, "Content-Type": "application/json"},
        )
        assert r.status_code == 400
        r = httpx.post(
            f"{url}/api/ratings",
            content=json.dumps(good),
            headers={**tok, "Content-Type": "text/plain"},
        )
        assert r.status_code == 400
        assert path.read_text() == ""  # nothing malformed was written
        assert httpx.post(f"{url}/api/ratings", json=good, headers=tok).status_code == 200
        assert [json.loads(x)["item"] for x in path.read_text().splitlines()] == [0]
        state = httpx.get(f"{url}/api/state", params={"rater": "r"}, headers=tok).json()
        assert state == {"n": 4, "rated": [0], "next": 1, "closed": False}


def test_report_text_is_escaped_and_needs_ratings(session, tmp_path):
    from jaxlora.errors import UserError

    with pytest.raises(UserError, match="no ratings yet"):
        write_blind_report(session)
    session.append_rating(_rating(0, rater="a", pref="1", comment="<img src=x> | odd"))
    session.append_rating(_rating(0, rater="b", pref="2"))
    session.append_rating(_rating(1, rater="a", pref="tie"))
    session.append_rating(_rating(1, rater="b", pref="tie", a=3, b=3))
    text = write_blind_report(session).read_text()
    assert "question 0 &lt;b&gt;\\|x" in text and "&lt;img src=x&gt; \\| odd" in text
    assert "<img" not in text and "<b>" not in text


def test_cli_bad_input_is_one_line_exit_2(session, tmp_path, capsys):
    from jaxlora.cli.app import main

    argv = ["blind", "prepare", "--out", str(tmp_path / "new"), "--adapter", str(tmp_path)]
    assert main(argv) == 2
    assert main(["blind", "report", str(tmp_path)]) == 2
    session.append_rating(_rating(0))
    assert main(["blind", "report", str(session.path)]) == 0
    assert main(["blind", "serve", str(session.path)]) == 2  # closed by the report
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: blind prepare: give --dataset")
    assert "not a blind session" in err[1] and "is closed" in err[2]
    assert not (tmp_path / "new").exists()
