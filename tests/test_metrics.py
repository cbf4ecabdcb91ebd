import pytest

from headscope.errors import HeadscopeError
from headscope.metrics import LEXICAL, normalize_answer, passes, score_response


def test_rouge1_is_recall_of_the_reference():
    assert score_response("rouge1", "blue river seven", "the answer is blue river") == pytest.approx(200 / 3)
    # recall: a long response that contains the whole reference scores 100
    assert score_response("rouge1", "blue river", "well, the answer is blue river, I think") == pytest.approx(100)


def test_rouge_uses_the_stemmer():
    assert score_response("rouge1", "rivers", "the river") == pytest.approx(100)


def test_rougeL_rewards_order():
    assert score_response("rougeL", "blue river seven", "seven blue river") == pytest.approx(200 / 3)
    assert score_response("rougeL", "blue river seven", "blue river seven") == pytest.approx(100)


def test_f1_squad_style():
    # "the" is dropped: response tokens [blue, river], reference [blue, river, seven] -> p=1, r=2/3
    assert score_response("f1", "blue river seven", "The blue river!") == pytest.approx(80)
    assert score_response("f1", "blue river", "green tree") == 0
    assert score_response("f1", "the", "a") == 100  # both normalise to nothing


def test_exact_and_contains():
    assert normalize_answer("The  Blue River.") == "blue river"
    assert score_response("exact", "blue river", "The Blue River.") == 100
    assert score_response("exact", "blue river", "a blue river seven") == 0
    assert score_response("contains", "blue river", "It is the blue river!") == 100
    assert score_response("contains", "blue", "a blueberry") == 0  # whole words only
    assert score_response("contains", "blue river", "river blue") == 0


def test_scores_stay_on_0_to_100():
    for metric in LEXICAL:  # the model-based ones: tests/test_rescore.py
        for response in ("", "blue river seven", "nothing alike"):
            assert 0 <= score_response(metric, "blue river seven", response) <= 100


def test_passes_is_strict():
    assert not passes(50.0, 50)
    assert passes(50.01, 50)
    assert passes(100, 99.9)


def test_unknown_metric():
    with pytest.raises(HeadscopeError, match="unknown metric 'meteor'"):
        score_response("meteor", "a", "b")
