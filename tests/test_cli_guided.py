"""`python -m dmd2 sample/evaluate --guidance W` with a guidance-conditioned student: the w it sampled at is
recorded, and a w outside its range is one error line naming the range (issue 19)."""

from __future__ import annotations

import json

import pytest

from guided_student import make_tiny_guided_student
from test_cli import run


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    return make_tiny_guided_student(tmp_path_factory.mktemp("models") / "tiny-guided")


def evaluate(model, out, *args):
    r = run("evaluate", "--model", model, "--num", "20", "--json", str(out), *args)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def test_evaluate_records_the_w_a_guided_student_sampled_at(guided, tmp_path):
    at_1 = evaluate(guided, tmp_path / "w1.json", "--guidance", "1")
    at_3 = evaluate(guided, tmp_path / "w3.json", "--guidance", "3")
    default = evaluate(guided, tmp_path / "default.json")
    assert (at_1["guidance"], at_3["guidance"], default["guidance"]) == (1.0, 3.0, 1.0)  # default: its own
    assert at_1["nfe"] == at_3["nfe"] == 1                   # w is an input, no CFG pass
    assert at_1["fid"] != at_3["fid"]          # the w reached the network: other images, other scores
    assert default["fid"] == at_1["fid"]


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_a_w_outside_the_range_exits_with_one_line_naming_it(guided, tmp_path, command):
    extra = ["--num", "4"] + (["--out", str(tmp_path / "x.npz")] if command == "sample" else [])
    r = run(command, "--model", guided, "--guidance", "5", *extra)
    assert r.returncode == 1
    assert "error: guidance 5 is outside student" in r.stderr and "range [1, 3]" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.npz").exists()


def test_the_help_says_what_guidance_means_for_each_kind_of_model():
    for command in ("sample", "evaluate", "grid"):
        r = run(command, "--help")
        text = " ".join(r.stdout.split())
        assert "a teacher's CFG scale" in text and "a guidance-conditioned student's w" in text, text


def test_evaluate_refuses_a_w_for_a_plain_student(tmp_path):
    from conftest import make_tiny_students

    plain = make_tiny_students(tmp_path)[0]
    r = run("evaluate", "--model", plain, "--num", "4", "--guidance", "2", "--json", str(tmp_path / "x.json"))
    assert r.returncode != 0 and "plain student, whose guidance was fixed" in r.stderr, r.stderr
    assert not (tmp_path / "x.json").exists()
