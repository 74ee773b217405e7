"""One rule for answer options: corrupt, misleading descriptions and the answer matcher see the same letters."""

import pytest

from engine.evaluate.metrics import first_letter, is_correct
from engine.options import alternatives, offered_letters, other_answers, question_options, reply_letter
from engine.perturb.variants import question_options as variant_options
from engine.perturb.variants import wrong_option


@pytest.mark.parametrize("question, options", [
    ("A.cat\nB.dog", {"A": "cat", "B": "dog"}),  # no space after the marker, at line starts
    ("Which is red?\nA. apple\nB. sky\nC. grass", {"A": "apple", "B": "sky", "C": "grass"}),
    ("Choose: (A) one (B) two", {"A": "one", "B": "two"}),
    ("Pick:\nA) up\nB) down\nC: sideways", {"A": "up", "B": "down", "C": "sideways"}),
    ("Vitamin C. is in oranges. Options:\nA. yes\nB. no", {"A": "yes", "B": "no"}),  # a stray letter before the choices
    ("A. Lincoln signed it in? A. 1862 B. 1863 C: 1864", {"A": "1862", "B": "1863", "C": "1864"}),
    ("Washington D.C. is a city\nA) true\nB) false", {"A": "true", "B": "false"}),
    ("Choices: A.cat B.dog", {}),  # mid-line, a marker needs a space after it
    ("the answer is A. done", {}),  # one letter is no choice
    ("What is shown?", {}),
    (None, {}),
])
def test_offered_options(question, options):
    assert question_options(question) == options
    assert offered_letters(question) == list(options)
    # every stage reads a question the same way
    assert variant_options(question) == options


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("The answer is (C).", "C"), ("answer: D", "D"),
    ("A or B", "A"), ("B's colour", None), ("CAT", None), ("A.M. it was", None), ("E", None), ("", None),
])
def test_reply_letter(reply, letter):
    assert reply_letter(reply, ["A", "B", "C", "D"]) == letter == first_letter(reply, ["A", "B", "C", "D"])


def test_the_matcher_uses_the_question_letters():
    question = "A.cat\nB.dog"
    assert is_correct("B", "B", offered_letters(question)) and not is_correct("A", "B", offered_letters(question))


def test_another_answer_differs_once_normalised():
    assert other_answers("Yes", ["yes", "Yes.", "no", "No", None, "the cat", "cat"]) == ["No", "cat", "no", "the cat"]
    assert other_answers("cat", ["the cat", "Cat!"]) == []


def test_alternatives_prefer_options_then_labels_then_answers():
    assert alternatives("A.cat\nB.dog\nC.cow", "B", None, [], []) == ("option", ["A", "C"])
    assert alternatives("what colour?", "red", "red", ["blue", "red"], []) == ("label", ["blue"])
    assert alternatives("what colour?", "Red", None, [], ["red", "RED.", "blue"]) == ("answer", ["blue"])
    assert alternatives("what colour?", "red", None, [], ["red"]) == ("answer", [])


def test_misleading_description_and_corruption_agree_on_the_same_question(tmp_path):
    from engine.stages.corrupt import corrupt
    from engine.store import Store

    question = "Which animal?\nA.cat\nB.dog"
    assert wrong_option(question, "A", None, [], [], "s:1") == "dog"  # names the other option's text
    store = Store(tmp_path / "store")
    store.append("samples", [{"sample_id": "x:s:train:0", "source": "x", "subset": "s", "split": "train",
                              "turns": [{"user": question, "assistant": "A", "source": "t"}]}])
    _, counts = corrupt(store, 1.0, where="true", progress=False)
    assert counts["option_swap"] == 1
    assert store.arrow("corruption").to_pylist()[0]["replaced"] == "B"


def test_a_pool_swap_never_picks_the_same_answer_in_other_case(tmp_path):
    from engine.stages.corrupt import corrupt
    from engine.store import Store

    store = Store(tmp_path / "store")
    answers = ["yes", "Yes", "yes.", "no"]
    store.append("samples", [{"sample_id": f"x:s:train:{i}", "source": "x", "subset": "s", "split": "train",
                              "turns": [{"user": "Is it red?", "assistant": a, "source": "t"}]} for i, a in enumerate(answers)])
    corrupt(store, 1.0, where="true", progress=False)
    replaced = {r["original"]: r["replaced"] for r in store.arrow("corruption").to_pylist()}
    assert {k: v for k, v in replaced.items() if k != "no"} == {"yes": "no", "Yes": "no", "yes.": "no"}
    assert replaced["no"] in {"yes", "Yes", "yes."}
