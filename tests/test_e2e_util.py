"""CPU: how the end-to-end tests report token differences against a reference run."""
from tests.e2e_util import Generation, token_mismatches


def test_identical_tokens_report_nothing():
    ref = Generation(tokens=[[1, 2, 3], [4, 5]], log="")
    assert token_mismatches([[1, 2, 3], [4, 5]], ref, [[0] * 10, [0] * 20]) == ""


def test_difference_names_prompt_position_and_reference_margin():
    top = [[[[1, -0.1], [7, -2.0]], [[2, -0.5], [9, -0.52]], [[3, -0.2], [8, -3.0]]]]
    ref = Generation(tokens=[[1, 2, 3], [4, 5]], log="", top=top + [[[[4, -0.1]], [[5, -0.1]]]])
    why = token_mismatches([[1, 9, 3], [4, 5]], ref, [[0] * 10, [0] * 20])
    assert why.startswith("1/2 identical")
    assert "prompt 0 (10 tokens): first difference at generated token 1" in why
    assert "reference margin 0.0200 (top-2 tokens 2, 9; got 9)" in why


def test_shorter_output_differs_at_its_end():
    ref = Generation(tokens=[[1, 2, 3]], log="")
    assert "first difference at generated token 2" in token_mismatches([[1, 2]], ref, [[0]])


def test_near_ties_pass_only_with_tie_margin_and_the_second_token():
    top = [[[[1, -0.1], [7, -0.1625]]], [[[4, -0.5], [8, -0.9]]]]  # margins 0.0625 and 0.4
    ref = Generation([[1, 2], [4, 5]], "", top)
    prompts = [[0] * 10, [0] * 20]
    assert token_mismatches([[7, 2], [4, 5]], ref, prompts)  # strict by default
    assert token_mismatches([[7, 2], [4, 5]], ref, prompts, tie_margin=0.125) == ""
    assert token_mismatches([[9, 2], [4, 5]], ref, prompts, tie_margin=0.125)  # not the runner-up
    assert token_mismatches([[7, 2], [8, 5]], ref, prompts, tie_margin=0.125)  # margin 0.4: a real change
