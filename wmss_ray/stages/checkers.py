"""Answer checkers: is a generated response's final answer the reference answer?

``evaluation.checker`` picks one (``auto``: ``demo`` in the demo world, ``math`` otherwise):

- ``demo``  the demo world's ``#### N`` integers (``data.synthetic.extract_final_answer``).
- ``exact`` the final answers compared as strings after light normalisation (surrounding ``$``,
  whitespace, a trailing period, ``\\text{}`` wrappers and thousands separators removed).
- ``math``  ``math-verify`` (Hugging Face): both answers are parsed as LaTeX / plain expressions
  and compared symbolically: ``\\frac{3}{4}`` = ``3/4`` = ``0.75``, ``1,000`` = ``1000``, sets
  ``\\{1, 2\\}`` = ``\\{2, 1\\}``, intervals ``(0, 1]``, ``x = 5`` = ``5``.
- ``regex`` ``evaluation.answer_pattern``: the last match's group ``answer`` (or group 1) in the
  text is its final answer; compared as ``exact`` does.

The final answer of a text (``extract_answer``; ``demo`` and ``regex`` have their own): the
content of the last ``\\boxed{...}`` (balanced braces), else the last ``#### X`` line, else the
last "The answer is X". The reference answer is ``data.reference_column`` of the row when set,
else the same extraction applied to the reference response. A row without a reference answer is
counted wrong and counted in ``eval_results.json`` (``n_no_reference``).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from wmss_ray.config.schema import compile_answer_pattern

CHECKERS = ("demo", "exact", "math", "regex")

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES_RE = re.compile(r"####[ \t]*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer is[:\s]*([^\n]+)", re.IGNORECASE)
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm)\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# "#### 18 dollars", "The answer is 25 because ...": a number followed by words is that number
_NUMBER_THEN_WORDS_RE = re.compile(r"^(-?\$?\s*[\d,]*\.?\d+)\s+[A-Za-z]{2,}")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` with balanced braces (None when absent/unclosed)."""
    found = None
    for m in _BOXED_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end():i - 1]
    return found


def _strip_sentence(s: str) -> str:
    """``" $25$. "`` -> ``"25"``: whitespace, one trailing period and surrounding ``$`` go."""
    s = s.strip()
    s = s[:-1].rstrip() if s.endswith(".") else s
    return s.strip("$").strip()


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response: last ``\\boxed{}``, else last ``####``, else last
    "The answer is X" (trailing period dropped; a number followed by words, "18 dollars", is the
    number); None when there is none."""
    text = text or ""
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    for pattern in (_HASHES_RE, _ANSWER_IS_RE):
        matches = [m.group(1) for m in pattern.finditer(text)]
        if matches and _strip_sentence(matches[-1]):
            answer = _strip_sentence(matches[-1])
            number = _NUMBER_THEN_WORDS_RE.match(answer)
            return number.group(1).replace("$", "").strip() if number else answer
    return None


def normalise_exact(answer: str) -> str:
    """Light normalisation for string comparison: ``"$1,000.$"`` -> ``"1000"``."""
    s = _TEXT_RE.sub(r"\1", _strip_sentence(answer))
    s = _THOUSANDS_RE.sub("", s)
    return re.sub(r"\s+", "", s)


@dataclass(frozen=True)
class AnswerChecker:
    """One checker: ``extract(text)`` -> final answer or None; ``check(generated, reference)``."""

    name: str
    pattern: str | None = None

    def __post_init__(self):
        if self.name not in CHECKERS:
            raise ValueError(f"unknown answer checker {self.name!r}; allowed: {', '.join(CHECKERS)}")
        if self.name == "regex":
            compile_answer_pattern(self.pattern)

    def extract(self, text: str | None) -> str | None:
        if self.name == "demo":
            from wmss_ray.data.synthetic import extract_final_answer

            return extract_final_answer(text or "")
        if self.name == "regex":
            rx = compile_answer_pattern(self.pattern)
            matches = list(rx.finditer(text or ""))
            if not matches:
                return None
            m = matches[-1]
            got = m.group("answer") if "answer" in rx.groupindex else m.group(1)
            return got.strip() if got and got.strip() else None
        return extract_answer(text)

    def equivalent(self, predicted: str, reference: str) -> bool:
        """Whether two extracted final answers are the same answer under this checker."""
        if self.name == "demo":
            from wmss_ray.data.synthetic import is_correct

            return is_correct(f"#### {predicted}", reference)
        if self.name == "math":
            return math_equivalent(predicted, reference)
        return normalise_exact(predicted) == normalise_exact(reference)

    def check(self, generated: str, reference: str | None) -> tuple[bool, str | None]:
        """``(correct, predicted final answer)``; no reference or no prediction is wrong."""
        predicted = self.extract(generated)
        if reference is None or predicted is None:
            return False, predicted
        return self.equivalent(predicted, str(reference)), predicted

    def reference(self, response: str | None, column_value: object = None) -> str | None:
        """The reference final answer: the reference column's value when given, else the one
        extracted from the reference response."""
        if column_value is not None:
            value = str(column_value).strip()
            return value or None
        return self.extract(response)


def _as_latex(answer: str) -> str:
    s = answer.strip()
    return s if s.startswith("$") or s.startswith("\\(") or s.startswith("\\[") else f"${s}$"


def math_equivalent(predicted: str, reference: str) -> bool:
    """Symbolic equivalence by math-verify; falls back to ``exact`` when either side does not parse.

    math-verify times parsing out with ``signal.alarm``, which only works in a main thread; in
    other threads it runs without that timeout.
    """
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_as_latex(reference), parsing_timeout=timeout)
    pred = parse(_as_latex(predicted), parsing_timeout=timeout)
    if not gold or not pred:
        return normalise_exact(predicted) == normalise_exact(reference)
    return bool(verify(gold, pred, timeout_seconds=timeout))


def checker_name(checker: str, demo: bool) -> str:
    """``evaluation.checker`` with ``auto`` resolved: ``demo`` in the demo world, else ``math``."""
    if checker == "auto":
        return "demo" if demo else "math"
    return checker


def checker_from_config(cfg) -> AnswerChecker:
    """The checker a ``WMSSConfig`` asks for."""
    e = cfg.evaluation
    return AnswerChecker(checker_name(e.checker, cfg.models.demo), e.answer_pattern)
