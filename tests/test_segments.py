"""Think/answer segments and the reasoning_focus and receiver scores, with hand-computed answers."""
import pytest
import torch

from headscope.scorers import PromptBatch, ReasoningFocusScorer, ReceiverScorer, StepView
from headscope.scorers.segments import kurtosis, segment_spans
from headscope.toy import word_tokenizer

TOKENIZER = word_tokenizer(["red", "blue", "a", "b", "c", "so", "x"])
PROMPT_LEN = 3


def ids(*words):
    return [TOKENIZER.convert_tokens_to_ids(word) for word in words]


def drive(scorer, produced, rows):
    """Run `scorer` over decoding steps: at step s, rows[s] (heads, kv_len) is handed over, then token s."""
    batch = PromptBatch(torch.zeros(1, PROMPT_LEN, dtype=torch.long), PROMPT_LEN, torch.zeros(1, dtype=torch.long),
                        torch.zeros(1, dtype=torch.long), tokenizer=TOKENIZER)
    scorer.begin(batch, 1, rows[0].shape[0])
    for step, token in enumerate(produced):
        scorer.step_rows(0, rows[step][None], 0)
        scorer.step(StepView(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.long),
                             torch.tensor([token]), torch.tensor([True])))
    return scorer.result()[0, 0]


def row(length, masses):
    """(heads, length): each head's mass on the given positions, the rest on position 0."""
    out = torch.zeros(len(masses), length)
    for head, placed in enumerate(masses):
        for position, value in placed.items():
            out[head, position] = value
        out[head, 0] += 1 - out[head].sum()
    return out


def test_segment_spans_of_a_finished_sample():
    prompt = ids("a", "b", "c")
    spans = segment_spans(TOKENIZER, prompt, ids("red", "so", "blue", "x"), (None, "so"))
    assert spans == {"think_span": [3, 5], "answer_span": [5, 7]}
    assert segment_spans(TOKENIZER, prompt, ids("red", "blue"), (None, "so")) == {
        "think_span": [3, 5], "answer_span": None}  # the chain never closed


def test_reasoning_focus_is_the_answer_queries_mass_on_the_think_segment():
    # produced: red (pos 3), so (4: the think segment is [3, 4]), blue (5), x (6); answer queries: 5 and 6
    produced = ids("red", "so", "blue", "x", "x")
    rows = [row(3, [{}, {}]), row(4, [{}, {}]), row(5, [{3: 0.9}, {}]),  # queries 2, 3, 4: not answer
            row(6, [{3: 0.3, 4: 0.2}, {5: 1.0}]),  # query 5: head 0 puts 0.5 on the think segment, head 1 none
            row(7, [{3: 0.4}, {4: 0.5}])]  # query 6: 0.4 and 0.5
    scores = drive(ReasoningFocusScorer(think_end="so"), produced, rows)
    assert scores.tolist() == pytest.approx([(0.5 + 0.4) / 2, (0.0 + 0.5) / 2])


def test_receiver_is_the_kurtosis_of_the_attention_each_sentence_receives():
    # sentences: [3, 5) "a .", [5, 7) "b .", [7, 9) "c .", then "so" at 9 closes the think segment
    produced = ids("a", ".", "b", ".", "c", ".", "so", "x")
    rows = [row(3, [{}]), row(4, [{}]), row(5, [{}]),  # queries 2-4: no earlier closed sentence
            row(6, [{3: 0.6}]), row(7, [{3: 0.4}]),  # sentence 1's queries 5, 6: M[1, 0] = 0.5
            row(8, [{3: 0.2, 5: 0.5}]), row(9, [{3: 0.4, 5: 0.3}]),  # sentence 2: M[2, 0] = 0.3, M[2, 1] = 0.4
            row(10, [{3: 0.1, 5: 0.2, 7: 0.6}])]  # query 9 ("so"): M[3, 0..2] = 0.1, 0.2, 0.6
    score = drive(ReceiverScorer(think_end="so"), produced, rows)
    # v = [(0.5 + 0.3 + 0.1) / 3, (0.4 + 0.2) / 2, 0.6] = [0.3, 0.3, 0.6]: centred -0.1, -0.1, 0.2;
    # m2 = 0.06 / 3 = 0.02, m4 = 0.0018 / 3 = 0.0006, kurtosis = 0.0006 / 0.0004 - 3 = -1.5
    assert float(score) == pytest.approx(-1.5, abs=1e-5)


def test_kurtosis_of_known_values():
    # [1, 0, 0, 0]: mean 0.25, m2 = 0.75 / 4, m4 = 0.328125 / 4, kurtosis = 0.08203125 / 0.03515625 - 3 = -2/3
    assert float(kurtosis(torch.tensor([1.0, 0.0, 0.0, 0.0]))) == pytest.approx(-2 / 3, abs=1e-6)
    # [2, 4, 4, 4, 5, 5, 7, 9]: mean 5, m2 = 32 / 8 = 4, m4 = 356 / 8 = 44.5, kurtosis = 44.5 / 16 - 3
    assert float(kurtosis(torch.tensor([2.0, 4, 4, 4, 5, 5, 7, 9]))) == pytest.approx(-0.21875)
    assert float(kurtosis(torch.tensor([0.5, 0.5, 0.5]))) == 0.0  # constant: no kurtosis


THINKING_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
                     "{% if enable_thinking is defined and not enable_thinking %} <think> </think>"
                     "{% else %} <think>{% endif %}{% endif %}")


def test_a_thinking_model_decodes_2000_steps_end_to_end(tmp_path, data_dir):
    """A random model whose chat template opens a think block: 2,000 new tokens, no stop, through detect; the
    think segment starts at the first generated token (the template opened it) and the row records it."""
    import json

    import headscope
    from headscope.toy import tiny_model

    tokenizer = word_tokenizer(["red", "blue", "green", "key", "is", "the", "what"])
    tokenizer.add_tokens(["<think>", "</think>"])
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.eos_token = None  # nothing stops the decode but the budget
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=2, max_positions=4096)
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    model.save_pretrained(tmp_path / "thinker")
    tokenizer.save_pretrained(tmp_path / "thinker")
    result = headscope.detect("reasoning", model=str(tmp_path / "thinker"), out=str(tmp_path / "out"), quiet=True,
                              data=str(data_dir / "reasoning.json"), num_samples=1, max_new_tokens=2000,
                              stop_at_newline=False, success_threshold=-1, scorer="reasoning,reasoning_focus",
                              chat_template_kwargs={"enable_thinking": True})
    row = result.samples[0]
    assert row["think_span"][0] == row["prompt_tokens"]  # the template opened the think block
    closed = row["answer_span"] is not None
    assert row["think_span"][1] <= row["prompt_tokens"] + 2000 and (closed or
                                                                    row["think_span"][1] == row["prompt_tokens"] + 2000)
    manifest = json.loads((tmp_path / "out" / "thinker_reasoning_manifest.json").read_text())
    assert manifest["options"]["chat_template_kwargs"] == {"enable_thinking": True}
