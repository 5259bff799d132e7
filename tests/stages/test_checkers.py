"""Answer checkers on GSM8K- and MATH-style rows written here: equivalent and non-equivalent pairs."""

from __future__ import annotations

import pytest

from wmss_ray.config.loading import config_from_dict
from wmss_ray.config.schema import ConfigError
from wmss_ray.stages.checkers import AnswerChecker, checker_from_config, extract_answer, normalise_exact
from wmss_ray.stages.evaluate import load_eval_rows

MATH = AnswerChecker("math")
EXACT = AnswerChecker("exact")

# GSM8K style: worked solution, "#### N" with thousands separators.
GSM8K_ROW = {
    "question": "A farm sells 1,000 eggs a day for 30 days. How many eggs is that?",
    "answer": "1,000 * 30 = 30,000 eggs.\n#### 30,000",
}
# MATH style: LaTeX solution ending in \boxed{} (nested braces).
MATH_ROW = {
    "problem": "What is $\\frac{3}{8} + \\frac{3}{8}$?",
    "solution": "We add: $\\frac{3}{8}+\\frac{3}{8} = \\frac{6}{8}$, which is $\\boxed{\\frac{3}{4}}$.",
}


def test_extract_answer_last_boxed_then_hashes_then_answer_is():
    assert extract_answer(MATH_ROW["solution"]) == "\\frac{3}{4}"
    assert extract_answer(GSM8K_ROW["answer"]) == "30,000"
    assert extract_answer("first \\boxed{1}, then \\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert extract_answer("So 5 + 20 = 25. The answer is 25.") == "25"
    assert extract_answer("#### 18 dollars") == "18" and extract_answer("The answer is 25 because 5*5.") == "25"
    assert extract_answer("The answer is $1,000 per week.") == "1,000"
    assert extract_answer("#### 2 x + 1") == "2 x + 1"  # a one-letter word is algebra, not a unit
    assert extract_answer("The answer is $\\frac{1}{2}$.") == "\\frac{1}{2}"
    assert extract_answer("#### 4\nrest\n#### 5") == "5"
    assert extract_answer("\\boxed{3} and later #### 9") == "3"  # \boxed wins over ####
    assert extract_answer("no final answer here") is None
    assert extract_answer("\\boxed{unclosed") is None
    assert extract_answer(None) is None


@pytest.mark.parametrize("predicted, reference", [
    ("\\boxed{3/4}", "0.75"),
    ("\\boxed{3/4}", "\\frac{3}{4}"),
    ("The answer is 0.75.", "\\frac{3}{4}"),
    ("#### 1,000", "1000"),
    ("The answer is 25.", "25"),
    ("\\boxed{\\{2, 1\\}}", "\\{1, 2\\}"),
    ("\\boxed{(0, 1]}", "(0,1]"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\sqrt{2}/2"),
    ("#### 30000", extract_answer(GSM8K_ROW["answer"])),
    (MATH_ROW["solution"], "0.75"),
])
def test_math_equivalent_pairs(predicted, reference):
    correct, got = MATH.check(predicted, reference)
    assert correct, (predicted, got, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("\\boxed{0.76}", "0.75"),
    ("\\boxed{3/5}", "\\frac{3}{4}"),
    ("#### 100", "1000"),
    ("The answer is 26.", "25"),
    ("\\boxed{[0, 1]}", "(0, 1]"),
    ("\\boxed{\\{1, 3\\}}", "\\{1, 2\\}"),
    ("I do not know.", "25"),  # no final answer: wrong
])
def test_math_non_equivalent_pairs(predicted, reference):
    assert MATH.check(predicted, reference)[0] is False


def test_exact_normalises_only_lightly():
    assert EXACT.check("#### 1,000", "1000")[0]
    assert EXACT.check("The answer is $25$.", "25")[0]
    assert EXACT.check("\\boxed{\\text{Paris}}", "Paris")[0]
    assert not EXACT.check("\\boxed{3/4}", "0.75")[0]  # no maths: that is what `math` is for
    assert not EXACT.check("#### 26", "25")[0]
    assert normalise_exact(" $1,234,567$. ") == "1234567" and normalise_exact("1,2") == "1,2"


def test_demo_checker_is_the_demo_worlds_first_hashes_integer():
    demo = AnswerChecker("demo")
    assert demo.check("1+2=3\n#### 3", "3") == (True, "3")
    assert demo.check("#### 0187", "187")[0] and not demo.check("\\boxed{187}", "187")[0]


def test_regex_checker_takes_group_answer_or_first_group():
    rx = AnswerChecker("regex", r"Final: (?P<answer>[A-E])")
    assert rx.check("thinking... Final: B", "B") == (True, "B")
    assert rx.check("Final: A then Final: C", "C")[0]  # the last match
    assert not rx.check("Final: A", "B")[0] and rx.check("no match", "B") == (False, None)
    assert AnswerChecker("regex", r"=\s*(\d+)").check("2+2 = 4", "4")[0]


def test_regex_pattern_is_validated_at_config_load():
    with pytest.raises(ConfigError, match="answer_pattern"):
        config_from_dict({"evaluation": {"checker": "regex"}})
    with pytest.raises(ConfigError, match="not a valid regex"):
        config_from_dict({"evaluation": {"checker": "regex", "answer_pattern": "(unclosed"}})
    with pytest.raises(ConfigError, match="no group"):
        config_from_dict({"evaluation": {"checker": "regex", "answer_pattern": "Final: [A-E]"}})
    with pytest.raises(ConfigError, match="checker: regex"):
        config_from_dict({"evaluation": {"checker": "math", "answer_pattern": "(x)"}})
    with pytest.raises(ConfigError, match="evaluation.checker"):
        config_from_dict({"evaluation": {"checker": "fuzzy"}})
    cfg = config_from_dict({"evaluation": {"checker": "regex", "answer_pattern": "Final: ([A-E])"}})
    assert checker_from_config(cfg) == AnswerChecker("regex", "Final: ([A-E])")


def test_auto_checker_is_demo_in_the_demo_world_and_math_otherwise(tmp_path):
    assert checker_from_config(config_from_dict({})).name == "demo"
    real = config_from_dict({"models": {"demo": False, "base": str(tmp_path)}, "data": {"train": "t.jsonl"}})
    assert checker_from_config(real).name == "math"


def test_reference_from_column_or_extracted_from_the_response(tmp_path):
    real = {"models": {"demo": False, "base": str(tmp_path)}, "data": {"train": "t.jsonl"}}
    cfg = config_from_dict(real, ["data.prompt_column=problem", "data.response_column=solution"])
    assert load_eval_rows([MATH_ROW], cfg)[0]["final_answer"] == "\\frac{3}{4}"
    cfg = config_from_dict(real, ["data.prompt_column=question", "data.response_column=answer"])
    assert load_eval_rows([GSM8K_ROW], cfg)[0]["final_answer"] == "30,000"
    cfg = config_from_dict(real, ["data.prompt_column=question", "data.response_column=answer",
                                  "data.reference_column=gold"])
    assert load_eval_rows([{**GSM8K_ROW, "gold": 30000}], cfg)[0]["final_answer"] == "30000"
    with pytest.raises(ValueError, match="data.reference_column 'gold' is missing"):
        load_eval_rows([GSM8K_ROW], cfg)
    # A response with no final answer gives no reference (the row is then counted wrong).
    cfg = config_from_dict(real, ["data.prompt_column=question", "data.response_column=answer"])
    assert load_eval_rows([{"question": "q", "answer": "no idea"}], cfg)[0]["final_answer"] is None
