"""Normalised exact match: how a free-form answer is compared with a short gold answer.

The rule (one place; every eval task uses it through `exact_match`):

1. Keep the first non-empty line of the prediction and drop a leading "answer:" label.
2. Cut it at the first clause boundary: one of `, . ! ? ;` followed by a space or the end
   ("Red." -> "Red"; "No, there is none" -> "No"; "2.5" stays whole).
3. Normalise it (the gold answer and the choices get the same treatment): lower case; "'s" -> " is";
   punctuation and hyphens -> spaces; number words zero..twenty -> digits; "grey" -> "gray"; the
   articles a / an / the dropped; whitespace collapsed.
4. Extract an answer, the first rule that yields one wins:
   a. the longest option the clause *starts with*, as whole words;
   b. otherwise, for each copula in the clause in order (is, are, was, were, says, reads, shows), the
      longest option that starts the text right after it (after the filler words located / positioned /
      placed / in / at / on), e.g. "The shape is a circle" -> "circle", "There are two shapes" -> "2".
   The options are the item's closed answer set (`choices`) plus the gold answer itself.
5. The prediction is correct (1.0) when the extracted answer equals the normalised gold, else 0.0.

Consequences, on purpose: "Red." / "red" / "The colour is red" / "It's red" match "red"; "top left"
does not match "top" when "top left" is one of the choices (longest option wins; without choices a
prefix match would accept it, so tasks always pass their choices); a hedge such as "red or blue" is
scored on its first option only; "not red" and "There is a red circle" (to a yes/no question) match
nothing; a copula is only trusted when the text after it *starts* with an option.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty")  # fmt: skip
_NUMBERS = {w: str(i) for i, w in enumerate(NUMBER_WORDS)}
_SYNONYMS = {"grey": "gray"}
ARTICLES = frozenset({"a", "an", "the"})
COPULAS = ("is", "are", "was", "were", "says", "reads", "shows")
FILLERS = frozenset({"located", "positioned", "placed", "in", "at", "on"})

_LABEL = re.compile(r"^\s*(?:final\s+)?answer\s*:\s*", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[,.!?;](?:\s|$)")
_CONTRACTION = re.compile(r"['\u2019]s\b")
_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lower case, "'s" -> " is", punctuation -> spaces, number words -> digits, articles dropped."""
    text = _CONTRACTION.sub(" is", text.lower())
    words = [_SYNONYMS.get(w, _NUMBERS.get(w, w)) for w in _NON_WORD.sub(" ", text).split()]
    return " ".join(w for w in words if w not in ARTICLES)


def first_clause(prediction: str) -> str:
    """Steps 1-2 of the rule: first non-empty line, label dropped, cut at the first clause boundary."""
    line = next((ln for ln in prediction.splitlines() if ln.strip()), "")
    line = _LABEL.sub("", line)
    m = _CLAUSE_END.search(line)
    return (line[: m.start()] if m else line).strip()


def _longest_prefix(words: Sequence[str], options: Iterable[tuple[str, ...]]) -> tuple[str, ...] | None:
    best = None
    for opt in options:
        if opt and tuple(words[: len(opt)]) == opt and (best is None or len(opt) > len(best)):
            best = opt
    return best


def extract_answer(prediction: str, options: Iterable[str]) -> str:
    """The normalised option the prediction gives (steps 1-4), or "" when it gives none."""
    opts = {tuple(normalize(o).split()) for o in options}
    words = normalize(first_clause(prediction)).split()
    found = _longest_prefix(words, opts)
    if found is None:
        for i, w in enumerate(words):
            if w in COPULAS:
                rest = words[i + 1:]
                while rest and rest[0] in FILLERS:
                    rest = rest[1:]
                found = _longest_prefix(rest, opts)
                if found is not None:
                    break
    return " ".join(found) if found else ""


def exact_match(prediction: str, answer: str, choices: Sequence[str] = ()) -> float:
    """1.0 when `prediction` gives `answer` under the rule above (options: `choices` + `answer`), else 0.0."""
    gold = normalize(answer)
    if not gold:
        return 0.0
    return float(extract_answer(prediction, [*choices, answer]) == gold)
