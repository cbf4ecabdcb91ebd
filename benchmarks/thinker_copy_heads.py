"""Which heads of the bundled thinker copy each room out of its anchor (docs/thinker.md, "Why, measured").

    python benchmarks/thinker_copy_heads.py              # the first 20 bundled questions
    python benchmarks/thinker_copy_heads.py --questions 40

Teacher-forced on the reference think blocks (the thinker writes them exactly), eager attention with
`output_attentions`: for every recap sentence ("first whistle ends in study ."), the attention its "in" -- the
token that must write the room -- puts on the room of the anchor it restates ("so first whistle ends in study ."),
averaged over the recap sentences; the heads are printed by that mean, with the receiver's rank beside each when
a receiver summary is given (`--receiver M/thinker_reasoning_receiver_summary.json`).
"""
from __future__ import annotations

import argparse
import json

import torch


def copy_attention(questions: int) -> torch.Tensor:
    """(layers, heads): the mean attention of the recap's "in" on its anchor's room."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from headscope.organism import THINKER_DIR, synth, thinker

    tokenizer = AutoTokenizer.from_pretrained(THINKER_DIR)
    model = LlamaForCausalLM.from_pretrained(THINKER_DIR, attn_implementation="eager").eval()
    total, reads = 0.0, 0
    for problem in thinker.read_bundled()[:questions]:
        prompt = thinker.chat_prompt(tokenizer, synth.reasoning_prompt(problem["context"], problem["question"]))
        ids = tokenizer(prompt + thinker.completion(problem), add_special_tokens=False)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        recap_start = tokens.index("follows")  # "now the recap follows ."
        ends = [i for i, token in enumerate(tokens) if token == "ends"]  # "X ends in ROOM": anchors, then recaps
        anchors, recaps = [i for i in ends if i < recap_start], [i for i in ends if i > recap_start]
        with torch.no_grad():
            attentions = torch.stack([a[0] for a in model(torch.tensor([ids]), output_attentions=True).attentions])
        for anchor, recap in zip(anchors, recaps):
            assert tokens[anchor + 2] == tokens[recap + 2]  # the recap restates the anchor's room
            total = total + attentions[:, :, recap + 1, anchor + 2]
            reads += 1
    return total / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--receiver", help="a receiver summary: print each head's rank there")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    means = copy_attention(args.questions)
    rank = {}
    if args.receiver:
        from headscope.runs.outputs import ranked

        rank = {key: index + 1 for index, (key, _) in enumerate(ranked(json.load(open(args.receiver))))}
    heads = means.shape[1]
    values, order = means.flatten().topk(args.top)
    print("head   attention on the anchor's room" + ("   receiver rank" if rank else ""))
    for value, flat in zip(values.tolist(), order.tolist()):
        key = f"{flat // heads}-{flat % heads}"
        print(f"{key:<6} {value:8.3f}" + (f"{rank.get(key, '-'):>26}" if rank else ""))


if __name__ == "__main__":
    main()
