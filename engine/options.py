"""Answer options, one rule for the whole engine: which letters a multiple-choice question offers (and their
texts), which letter a model's reply names, and which answers count as "another answer" of a subset.
``engine corrupt``, perturbed variants (misleading descriptions), ``engine facts`` and the answer matcher of
``engine eval`` all use these functions, so a question's options are the same everywhere.

- **Offered options.** A marker is a capital letter A-H, optionally in parentheses, followed by ``.``, ``)``
  or ``:``: at the start of a line (``A. cat``, ``A.cat``, ``(B) dog``, ``C: fish``) or after a space
  when a space follows too (``Choose: (A) one (B) two``). Mid-line, the space keeps abbreviations such
  as ``D.C.`` out. The options are the last run of markers that reads A, B, C, ... in order, with at
  least two letters: context before the choices ("Vitamin C. is ...", "A. Lincoln wrote") is ignored.
  An option's text runs to the next marker or the end of its line.
- **A reply's letter.** The first letter of ``letters`` standing alone, not inside a word (``B's``,
  ``CAT``, ``A.M`` are no letters): "(B)", "B.", "The answer is C", "A or B" (A).
- **Another answer.** Answers of a subset that differ from the answer once normalised (case,
  punctuation, articles, spaces): "Yes." is not another answer than "yes".
"""

from __future__ import annotations

import re
import string

LETTERS = "ABCDEFGH"
_MARKER = re.compile(
    r"(?m)(?:^[ \t]*(?:\(([A-H])\)|([A-H])[.):])[ \t]*(?=\S)"  # at a line start: "A. x", "A.x", "(A) x"
    r"|(?<=[ \t])(?:\(([A-H])\)|([A-H])[.):])[ \t]+(?=\S))"  # mid-line: " (A) x", " A. x"
)
_REPLY_LETTER = re.compile(r"(?<![A-Za-z0-9'’.])([A-H])(?![A-Za-z0-9'’]|\.[A-Za-z])")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def question_options(question: str | None) -> dict[str, str]:
    """Letter -> option text of a multiple-choice question (empty when it offers fewer than two)."""
    question = question or ""
    markers = [(m.group(1) or m.group(2) or m.group(3) or m.group(4), m) for m in _MARKER.finditer(question)]
    runs, run = [], []
    for letter, match in markers:
        if letter == "A":
            run = [(letter, match)]
            runs.append(run)
        elif run and ord(letter) == ord(run[-1][0]) + 1:
            run.append((letter, match))
        else:
            run = []  # a letter out of sequence ends the run
    chosen = next((r for r in reversed(runs) if len(r) >= 2), [])
    options = {}
    for i, (letter, match) in enumerate(chosen):
        end = chosen[i + 1][1].start() if i + 1 < len(chosen) else len(question)
        options[letter] = question[match.end() : end].split("\n")[0].strip()
    return options


def offered_letters(question: str | None) -> list[str]:
    """The option letters a multiple-choice question offers, in order (see ``question_options``)."""
    return list(question_options(question))


def reply_letter(reply: str | None, letters: list[str]) -> str | None:
    """The first of ``letters`` a model's reply names as an option (None if it names none)."""
    reply = reply or ""
    for match in _REPLY_LETTER.finditer(reply):
        if match.group(1) in letters:
            return match.group(1)
    return None


def normalise(text: str | None) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = (text or "").lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def other_answers(answer: str | None, pool) -> list[str]:
    """The answers of ``pool`` (a subset's answers) that are another answer than ``answer``: different once
    normalised, sorted, without duplicates."""
    own = normalise(answer)
    return sorted({a for a in pool if a is not None and normalise(a) != own})


def alternatives(question: str | None, answer: str | None, label, labels, answers) -> tuple[str, list[str]]:
    """What a sample's answer could be swapped for, most specific first:

    - ``("option", letters)``: the other letters the question offers, when the answer is one of them;
    - ``("label", labels)``: the other labels of the subset, when the sample has a label;
    - ``("answer", answers)``: the other answers of the subset (``other_answers``).

    The list is empty when the sample has nothing to swap for.
    """
    letters = offered_letters(question)
    given = (answer or "").strip()
    if given in letters and len(letters) > 1:
        return "option", [letter for letter in letters if letter != given]
    if label is not None and len(set(labels)) > 1:
        return "label", sorted(set(labels) - {label})
    return "answer", other_answers(answer, answers)
