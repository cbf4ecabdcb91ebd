"""`check` proves what it says (issue 27): every scorer of the run is checked on prompts where it has something to
score -- the think/answer segment scorers on a scripted think block in the run's markers, replayed as `detect`
replays a finished sequence, the replay's rows compared with eager's -- and a scorer with no value is "not checked",
never a NaN failure nor a pass by `max()`; the tokens figure judges each sample on its own; a row is judged by the
attention mass it moves, so a wrong diffuse row fails at any length."""
import re

import pytest
import torch

from headscope.detection import check, decode
from headscope.attention import recorder
from headscope.cli.commands import main
from headscope.families.toy import tiny_model

THINK = ["--think-end", "so the answer is"]  # the organism's end marker (docs/reasoning-models.md)


def detect_reasoning(tmp_path, scorers: str, *extra: str) -> list[str]:
    return ["detect", "reasoning", "--scorer", scorers, *THINK, "--out", str(tmp_path / "out"), "--quiet",
            "--no-plots", "--num-samples", "1", "--max-new-tokens", "2", "--success-threshold", "-1", *extra]


@pytest.mark.parametrize("scorers", ["receiver", "reasoning_focus", "receiver,reasoning", "reasoning,reasoning_focus"])
def test_segment_scorers_pass_the_check_alone_first_and_last(scorers, tmp_path, capsys):
    """Before: an 8-step decode never closes the think block, both scores are NaN and `NaN <= limit` refused
    `receiver` and `reasoning_focus` alone or first."""
    assert main(detect_reasoning(tmp_path, scorers)) == 0, capsys.readouterr().err


def test_check_compares_the_segment_scorers_on_a_scripted_think_block():
    from headscope.detection import engine, loading
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
    from headscope.detection import engine, loading
    from headscope.tasks import TASKS

    loaded = loading.load(None, "float32", "cpu", "sdpa", False)
    options = TASKS["reasoning"].options(**(TASKS["reasoning"].organism_defaults | {
        "scorer": "reasoning,receiver", "think_end": "so the answer is", "receiver_proximity": 40}))
    case = engine.scorer_case(engine.start_run("reasoning", options, loaded, check_it=False))
    receiver = check.scorer_figures(loaded, case, steps=4)[1]
    assert receiver.ok and not receiver.checked
    assert re.search(r"not checked: the chain has \d+ sentences; receiver needs at least 42", receiver.value)
    assert check.verdict(receiver) == "--"


def test_detect_says_which_scorer_the_check_could_not_compare(tmp_path, capsys):
    assert main(detect_reasoning(tmp_path, "reasoning,receiver", "--receiver-proximity", "40")) == 0
    error = capsys.readouterr().err
    assert "headscope: note: the exactness check could not compare reasoning receiver: not checked: the chain " \
           "has" in error, error


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


def test_a_wrong_row_of_a_diffuse_head_fails_at_thousands_of_tokens(monkeypatch):
    """Queries scaled by 0.02: every head diffuse, a 3,000-token row's entries near 3e-4. Logits 5% too large
    move 9e-4 of each decoding row's mass, while no entry moves by 1e-5: the old limit (max abs diff <= 1e-5)
    passed these rows, the mass moved fails them. The same model with its attention right passes."""
    from transformers import AutoTokenizer

    import headscope
    from headscope.detection.loading import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=2)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "q_proj"):
                module.q_proj.weight.mul_(0.02)
    loaded = headscope.prepare(model, tokenizer, path="diffuse")
    right = check.run_check(loaded, prompt_tokens=3000, steps=2, need_ablation=False)
    assert right.figures[0].ok, right.table()
    monkeypatch.setattr(recorder, "attention_logits", lambda q, k, scaling: torch.matmul(
        q.float(), k.float().transpose(-1, -2)) * scaling * 1.05)
    wrong = check.run_check(loaded, prompt_tokens=3000, steps=2, need_ablation=False)
    rows = wrong.figures[0]
    assert rows.name == "rows" and not rows.ok and wrong.prompt_tokens >= 3000, wrong.table()
    assert float(rows.value.split()[2]) > 1e-4  # the mass moved: ten times the limit and more


def test_a_correct_row_at_128k_keys_moves_no_mass():
    """One diffuse row over 131,072 keys (entries near 8e-6), headscope's maths against the eager code's: the
    mass moved stays far below the limit; the same row 3% off in every entry moves 100 times the limit while
    no entry moves by 1e-5, where the old limit looked."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from headscope.attention.recorder import Rule, query_probs
    from headscope.attention.rowcheck import ROW_LIMIT, mass_moved

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 1, 64, generator=generator) * 0.05
    key = torch.randn(1, 4, 131072, 64, generator=generator)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 1, False
    _, eager = eager_attention_forward(module, query, key, key, None, scaling=64 ** -0.5)
    ours = query_probs(query, key, None, Rule(64 ** -0.5))[:, :, 0]
    eager = eager[:, :, 0]
    assert float(mass_moved(ours, eager).max()) < ROW_LIMIT / 10
    wrong = eager * (1 + 0.03 * torch.sign(torch.randn(eager.shape, generator=generator)))
    assert float((wrong - eager).abs().max()) < 1e-5 < ROW_LIMIT * 100 < float(mass_moved(wrong, eager).max())
