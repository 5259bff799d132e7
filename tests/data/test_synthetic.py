"""The demo world: reproducible, non-overlapping splits with correct worked answers."""

from __future__ import annotations

import ast
import json
import operator
import re

import pytest

from wmss_ray.config.schema import DemoDataConfig
from wmss_ray.data.synthetic import (
    extract_final_answer,
    generate_split,
    is_correct,
    pretrain_texts,
    split_of,
    write_demo_corpus,
)

CFG = DemoDataConfig()
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _eval(node):
    """Evaluate + - * over integers independently of the generator (no eval())."""
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    raise AssertionError(f"unexpected node {ast.dump(node)}")


def _expression(question: str) -> str:
    m = re.fullmatch(r"(?:Compute|What is|Evaluate|Calculate) (.*)[.?]", question)
    assert m, question
    return m.group(1)


def test_splits_reproducible_and_disjoint():
    a = {s: generate_split(s, 300, 7, CFG) for s in ("pretrain", "train", "eval")}
    assert generate_split("train", 300, 7, CFG) == a["train"]
    assert generate_split("train", 300, 8, CFG) != a["train"]
    exprs = {s: {_expression(r["messages"][0]["content"]) for r in rows} for s, rows in a.items()}
    for s, rows in a.items():
        assert len(exprs[s]) == len(rows) == 300  # unique within the split
        assert [r["sample_id"] for r in rows] == [f"{s}-{k}" for k in range(300)]
        assert all(split_of(e) == s for e in exprs[s])
    assert not exprs["train"] & exprs["eval"]
    assert not exprs["pretrain"] & exprs["eval"]
    assert not exprs["pretrain"] & exprs["train"]


@pytest.mark.parametrize("cfg", [CFG, DemoDataConfig(min_steps=1, max_steps=4, max_operand=20, max_multiplier=3)])
def test_final_answers_are_correct(cfg):
    for row in generate_split("train", 200, 1, cfg):
        q, a = row["messages"][0]["content"], row["messages"][1]["content"]
        value = _eval(ast.parse(_expression(q), mode="eval"))
        assert value >= 0
        assert row["final_answer"] == str(value)
        assert extract_final_answer(a) == str(value)
        assert is_correct(a, row["final_answer"])
        lines = a.split("\n")
        assert cfg.min_steps <= len(lines) - 1 <= cfg.max_steps
        for line in lines[:-1]:  # every worked step is a true equation
            lhs, rhs = line.split("=")
            assert _eval(ast.parse(lhs, mode="eval")) == int(rhs)
        assert lines[0].split("=")[0].replace("*", " * ") in q.replace(" + ", "+").replace(" - ", "-").replace("(", "")


def test_answers_are_short():
    rows = generate_split("eval", 500, 0, CFG)
    assert max(len(r["messages"][1]["content"]) for r in rows) < 64


def test_extract_final_answer_and_is_correct():
    assert extract_final_answer("1+2=3\n#### 3") == "3"
    assert extract_final_answer("#### 1,187 and more") == "1187"
    assert extract_final_answer("####-4") == "-4"
    assert extract_final_answer("#### 5\n#### 6") == "5"
    assert extract_final_answer("no answer here") is None
    assert extract_final_answer("") is None
    assert extract_final_answer("#### ,") is None
    assert is_correct("x\n#### 0187", "187")
    assert not is_correct("#### 18", "187")
    assert not is_correct("187", "187")


def test_pretrain_texts_plain_format():
    texts = pretrain_texts(200, 0, CFG)
    assert texts == pretrain_texts(200, 0, CFG)
    assert len(texts) == 200
    assert not any("<|im_start|>" in t for t in texts)
    problems = [t for t in texts if t.startswith("Q: ")]
    equations = [t for t in texts if not t.startswith("Q: ")]
    assert len(equations) == 100 and len(problems) == 100
    for e in equations:
        lhs, rhs = e.split("=")
        assert _eval(ast.parse(lhs, mode="eval")) == int(rhs)
    for p in problems:
        q = p.split("\n")[0].removeprefix("Q: ")
        assert split_of(_expression(q)) == "pretrain"
        assert "\nA: " in p and extract_final_answer(p) is not None


def test_write_demo_corpus(tmp_path):
    cfg = DemoDataConfig(n_train=30, n_eval=10)
    paths = write_demo_corpus(cfg, 0, tmp_path)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert set(rows) == {"train", "validation", "eval"}
    assert len(rows["train"]) == 30 and len(rows["eval"]) == 10 and len(rows["validation"]) == cfg.n_validation
    assert rows["eval"] == generate_split("eval", 10, 0, cfg)
    # Training rows do not depend on the validation size; validation never repeats a train problem.
    assert rows["train"] == generate_split("train", 30, 0, cfg)
    questions = lambda split: {r["messages"][0]["content"] for r in rows[split]}  # noqa: E731
    assert not questions("train") & questions("validation")
    assert all(r["sample_id"].startswith("validation-") for r in rows["validation"])
    assert [m["role"] for m in rows["train"][0]["messages"]] == ["user", "assistant"]


def test_impossible_request_fails_clearly():
    with pytest.raises(ValueError, match="max_operand"):
        generate_split("eval", 50, 0, DemoDataConfig(max_operand=2, max_multiplier=2, min_steps=1, max_steps=1))


def test_pretrain_texts_chat_share():
    cfg = DemoDataConfig(pretrain_chat_fraction=0.5, pretrain_equation_fraction=0.0)
    render = lambda msgs: "".join(f"<{m['role']}>{m['content']}" for m in msgs)  # noqa: E731
    texts = pretrain_texts(200, 0, cfg, render_chat=render)
    chat = [t for t in texts if t.startswith("<user>")]
    assert 60 < len(chat) < 140 and len(chat) + sum(t.startswith("Q: ") for t in texts) == 200
    assert all("<assistant>" in t and extract_final_answer(t) for t in chat)
    assert not any(t.startswith("<user>") for t in pretrain_texts(200, 0, cfg))  # no renderer: all plain
