"""`check` runs every scorer of the run on prompts where it has something to score (issue 27): the think/answer
segment scorers read a scripted think block in the run's markers, replayed as `detect` replays a finished
sequence, and the replay's rows are compared with eager's; a scorer with no value is "not checked", never a
NaN failure nor a pass by `max()`."""
import re

import pytest
import torch

from headscope import check, decode, recorder
from headscope.cli import main
from headscope.toy import tiny_model

THINK = ["--think-end", "so the answer is"]  # the organism's end marker (README: Reasoning models)


def detect_reasoning(tmp_path, scorers: str, *extra: str) -> list[str]:
    return ["detect", "reasoning", "--scorer", scorers, *THINK, "--out", str(tmp_path / "out"), "--quiet",
            "--no-plots", "--num-samples", "1", "--max-new-tokens", "2", "--success-threshold", "-1", *extra]


@pytest.mark.parametrize("scorers", ["receiver", "reasoning_focus", "receiver,reasoning", "reasoning,reasoning_focus"])
def test_segment_scorers_pass_the_check_alone_first_and_last(scorers, tmp_path, capsys):
    """Before: an 8-step decode never closes the think block, both scores are NaN and `NaN <= limit` refused
    `receiver` and `reasoning_focus` alone or first."""
    assert main(detect_reasoning(tmp_path, scorers)) == 0, capsys.readouterr().err


def test_check_compares_the_segment_scorers_on_a_scripted_think_block():
    from headscope import engine, loading
    from headscope.tasks import TASKS

    loaded = loading.load(None, "float32", "cpu", "sdpa", False)
    options = TASKS["reasoning"].options(**(TASKS["reasoning"].organism_defaults | {
        "scorer": "reasoning,receiver,reasoning_focus", "think_end": "so the answer is"}))
    case = engine.scorer_case(engine.start_run("reasoning", options, loaded, check_it=False))
    figures = check.scorer_figures(loaded, case, steps=4)
    assert [f.value.split(":")[0] for f in figures] == ["reasoning", "reasoning receiver", "reasoning reasoning_focus"]
    for figure in figures:  # each one compared (values and the rows of its pass), none "not checked"
        assert figure.ok and figure.checked and ", rows " in figure.value, figure


def test_a_scorer_with_no_value_is_not_checked_and_says_why():
    from headscope import engine, loading
    from headscope.tasks import TASKS

    loaded = loading.load(None, "float32", "cpu", "sdpa", False)
    options = TASKS["reasoning"].options(**(TASKS["reasoning"].organism_defaults | {
        "scorer": "reasoning,receiver", "think_end": "so the answer is", "receiver_proximity": 40}))
    case = engine.scorer_case(engine.start_run("reasoning", options, loaded, check_it=False))
    receiver = check.scorer_figures(loaded, case, steps=4)[1]
    assert receiver.ok and not receiver.checked
    assert re.search(r"not checked: the chain has \d+ sentences; receiver needs at least 42", receiver.value)
    assert check.verdict(receiver) == "--"


def sharper_rows(query, key, attention_mask, rule, query_index=None, real=recorder.query_probs):
    """Rows 5% too sharp: what the replay computes when made wrong on purpose."""
    return real(query, key, attention_mask, type(rule)(rule.scaling * 1.05, rule.softcap, rule.sliding_window,
                                                      rule.sinks), query_index)


@pytest.fixture
def wrong_replay(monkeypatch):
    """decode.replay with wrong rows; every other pass (prefill, decoding steps) untouched."""
    real = decode.replay

    def replay(*args, **kwargs):
        with monkeypatch.context() as inside:
            inside.setattr(recorder, "query_probs", sharper_rows)
            return real(*args, **kwargs)

    monkeypatch.setattr(decode, "replay", replay)
    monkeypatch.setattr(check, "replay", replay, raising=False)


@pytest.mark.parametrize("scorers", ["reasoning,receiver", "reasoning,reasoning_focus"])
def test_check_fails_when_the_replay_is_wrong(scorers, tmp_path, wrong_replay, capsys):
    """Before: the replay's rows were never compared and the scorers figure skipped the NaN of the segment scorer
    listed last: the check passed."""
    assert main(detect_reasoning(tmp_path, scorers)) == 2
    error = capsys.readouterr().err
    assert "fails headscope's exactness check (scorers: reasoning " in error, error
    assert not (tmp_path / "out").exists()


def scripted_logits(best: int, runner_up: int, gap: float, vocab: int = 32) -> torch.Tensor:
    logits = torch.zeros(1, vocab)
    logits[0, best], logits[0, runner_up] = 30.0, 30.0 - gap
    return logits


def test_tokens_judge_each_sample_on_its_own(monkeypatch):
    """Sample 0 splits from eager at step 1 on a near tie (gap 0.05 at a largest logit of 30: bf16's tolerance is
    4 x 2^-7 x 30 = 0.94), sample 1 at step 2 on a real difference (gap 2). Before, only the earliest split of the
    batch was judged: a tie, so the figure passed."""
    eager = [5, 6, 7]
    ours = [[5, 9, 7], [5, 6, 9]]
    split = {1: (1, 0.05), 2: (2, 2.0)}  # prompt (its first id) -> (step, gap) where ours writes 9 instead

    def generate_alone(model, input_ids, steps):
        at, gap = split[int(input_ids[0, 0])]
        logits = [scripted_logits(token, 9 if s == at else 0, gap if s == at else 10.0) for s, token in
                  enumerate(eager)]
        return eager, logits, []

    monkeypatch.setattr(check, "generate_alone", generate_alone)
    model = tiny_model("llama", vocab_size=32, num_layers=2).to(torch.bfloat16)
    input_ids = torch.tensor([[1, 1, 1], [2, 2, 2]])
    figure = check.token_figure(model, input_ids, torch.ones_like(input_ids), ours, [])
    assert not figure.ok, figure
    assert "sample 0 from step 1: logit gap 5.0e-02 (tie)" in figure.value
    assert "sample 1 from step 2: logit gap 2.0e+00" in figure.value
    split[2] = (2, 0.5)  # both near ties: passes
    assert check.token_figure(model, input_ids, torch.ones_like(input_ids), ours, []).ok
