"""Train (and evaluate) the bundled model organism.

    python -m headscope.organism.train --out DIR --seed 0          # train from scratch
    python -m headscope.organism.train --evaluate DIR               # quality report of a checkpoint

The recipe: a word-level tokenizer over the synthetic world's vocabulary and a small Llama trained
on CPU with dense supervision -- every retrieval sequence hides several needles in a haystack and asks
about several of them, in the exact prompt format of the retrieval detector; every reasoning sequence
asks one to three multi-hop questions about one context in the exact format of the reasoning detector.
The haystack length follows a curriculum up to the longest context evaluated (~1,200 tokens).
Once the induction phase has grown copying heads, every head of every training sequence is ablated with
probability 0.2 (head dropout, below), so that no single head is critical.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import add_arguments, option
from . import synth

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]
UNK, PAD, BOS, EOS = 0, 1, 2, 3
NEWLINE = "\n"
NEWLINE_ID = 4


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def build_vocab() -> dict[str, int]:
    vocab: dict[str, int] = {}
    for tok in SPECIAL_TOKENS + [NEWLINE] + synth.PUNCTUATION + synth.all_words():
        vocab.setdefault(tok, len(vocab))
    assert vocab[NEWLINE] == NEWLINE_ID
    return vocab


def build_tokenizer(vocab: dict[str, int] | None = None):
    """The organism's fast tokenizer (a ``transformers.PreTrainedTokenizerFast``), over ``vocab`` (default: the
    organism's; the thinker passes its own).

    Word-level; words and punctuation are split apart, spaces dropped, ``"\\n"`` kept as a token of
    its own; ``<s>`` is prepended when ``add_special_tokens`` is true (the default); decoding joins
    tokens with single spaces and no spaces around newlines.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab or build_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Punctuation("isolated"),
    ])
    tok.decoder = decoders.Sequence([
        decoders.WordPiece(prefix="##", cleanup=False),
        decoders.Fuse(),
        decoders.Replace(Regex(r" ?\n ?"), "\n"),
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=2048, padding_side="left", clean_up_tokenization_spaces=False)
    return fast


# --------------------------------------------------------------------------------------------
# Training data (token level: every word of the synthetic world is exactly one token)
# --------------------------------------------------------------------------------------------


class DataGen:
    def __init__(self, seed: int, vocab: dict[str, int]):
        self.rng = random.Random(f"train-{seed}")
        self.vocab = vocab
        self.held = synth.held_out()
        self.ret_prefix = self._toks(synth.RETRIEVAL_PREFIX)
        self.ret_suffix = self._toks(synth.RETRIEVAL_SUFFIX)

    @staticmethod
    def _toks(text: str) -> list[str]:
        out = []
        for piece in text.replace("\n", " \n ").replace(",", " ,").replace(":", " :").split(" "):
            if piece:
                out.append(piece)
        return out

    def ids(self, toks: list[str]) -> list[int]:
        return [self.vocab[t] for t in toks]

    # retrieval ---------------------------------------------------------------------------------
    def retrieval(self, T: int):
        """A retrieval sequence of exactly T tokens: (ids, weights)."""
        rng = self.rng
        max_needles = max(1, min(8, T // 90))
        k = rng.randint(1, max_needles)
        needles, keys, values = [], set(self.held["keys"]), set(self.held["values"])
        for _ in range(k):
            n = synth.make_needle(rng, exclude_keys=keys, exclude_values=values)
            keys.add(tuple(n["key"]))
            values.add(tuple(n["value"]))
            needles.append(n)
        asked = rng.sample(needles, rng.randint(max(1, (k + 1) // 2), k))
        blocks_t, blocks_w = [], []
        for n in asked:
            q = self.ret_prefix + n["question"].split() + self.ret_suffix
            blocks_t += q + n["value"]
            blocks_w += [0.1] * len(q) + [1.0] * len(n["value"])
        blocks_t.append(NEWLINE)
        blocks_w.append(1.0)
        needle_toks = [n["needle"].split() for n in needles]
        bos = rng.random() < 0.9
        H = T - int(bos) - sum(map(len, needle_toks)) - len(blocks_t)
        if H < 0:  # too many needles for this length: drop some
            return self.retrieval(T)
        hay = synth.filler_tokens(rng, H, paragraph_prob=0.03)[:H]
        # insertion points: sentence ends, the very beginning, or the very end
        ends = [0] + [i + 1 for i, t in enumerate(hay) if t in (".", NEWLINE)] + [H]
        points = sorted(rng.choice(ends) for _ in needles)
        toks, w, prev = [], [], 0
        if bos:
            toks.append("<s>")
            w.append(0.0)
        for p, nt in zip(points, needle_toks):
            toks += hay[prev:p] + nt
            w += [0.05] * (p - prev) + [0.1] * len(nt)
            prev = p
        toks += hay[prev:]
        w += [0.05] * (H - prev)
        toks += blocks_t
        w += blocks_w
        assert len(toks) == T, (len(toks), T)
        return self.ids(toks), w

    # reasoning ---------------------------------------------------------------------------------
    def reasoning(self):
        rng = self.rng
        nq = rng.choice([1, 2, 3])
        while True:
            p = synth.make_reasoning(rng, n_questions=nq, min_hops=rng.choice([1, 2, 2, 2]))
            if (p["context"], p["question"]) not in self.held["reasoning"]:
                break
        qas = [p] + p.get("more", [])
        toks = ["<s>"] + self._toks(synth.reasoning_prompt(p["context"], p["question"]))
        w = [0.0] + [0.1] * (len(toks) - 1)
        for i, qa in enumerate(qas):
            if i > 0:
                q = self._toks("\nQuestion: " + qa["question"] + "\n\nAnswer:")
                toks += q
                w += [0.1] * len(q)
            tgt = qa["target"].split() + [NEWLINE]
            toks += tgt
            w += [1.0] * len(tgt)
        return self.ids(toks), w

    # induction: a random word sequence repeated ---------------------------------------------------
    def induction(self, T: int, max_seg: int | None = None):
        """A random word segment repeated until T tokens (grows induction heads)."""
        rng = self.rng
        n = rng.randint(8, max(8, min(max_seg or T, (T - 1) // 2)))
        seg = [rng.randrange(NEWLINE_ID + 1, len(self.vocab)) for _ in range(n)]
        ids = [BOS] + (seg * (T // n + 1))[: T - 1]
        w = [0.0] + [0.02] * n + [0.99] * (T - 1 - n)
        return ids, w


def pad_batch(items, length=None):
    L = length or max(len(i) for i, _ in items)
    ids = torch.full((len(items), L), PAD, dtype=torch.long)
    wt = torch.zeros((len(items), L), dtype=torch.float32)
    for b, (i, w) in enumerate(items):
        ids[b, : len(i)] = torch.tensor(i[:L])
        wt[b, : len(w)] = torch.tensor(w[:L])
    return ids, wt


def weighted_loss(model, ids, wt):
    logits = model(input_ids=ids).logits[:, :-1].float()
    tgt = ids[:, 1:]
    w = wt[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                                           reduction="none").view_as(tgt)
    loss = (ce * w).sum() / w.sum().clamp_min(1.0)
    with torch.no_grad():
        ans = w >= 1.0  # answer tokens (the induction copies have weight 0.99)
        acc = ((logits.argmax(-1) == tgt) & ans).sum().item() / max(1, ans.sum().item())
        ind = (w > 0.9) & (w < 1.0)
        acc_ind = ((logits.argmax(-1) == tgt) & ind).sum().item() / max(1, ind.sum().item())
    return loss, acc, acc_ind


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def make_config(vocab_size: int, hidden=128, layers=4, heads=8, intermediate=512):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        attention_dropout=0.0, hidden_act="silu", initializer_range=0.02)


# --------------------------------------------------------------------------------------------
# Head dropout: during training each head is ablated (uniform attention, as `headscope ablate` does)
# with probability p per sequence, so no single head becomes critical -- the redundancy that real
# LLMs get from having a thousand heads, and without which random-head ablation of a 32-head model
# breaks it (DropHead, Zhou et al. 2020).
# --------------------------------------------------------------------------------------------

HEAD_DROPOUT_ATTENTION = "organism-head-dropout"


def _head_dropout_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA, then the dropped heads' outputs replaced by the running mean of their values."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    output, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = getattr(module, "head_drop_mask", None)  # set on the model's attention modules by set_head_drop
    if mask is None or query.shape[2] != key.shape[2]:  # only full causal training passes
        return output, weights
    dropped = mask[: output.shape[0], module.layer_idx]  # (batch, heads)
    values = repeat_kv(value, query.shape[1] // value.shape[1]).float()  # (batch, heads, T, dim)
    counts = torch.arange(1, values.shape[2] + 1, device=values.device, dtype=values.dtype)
    uniform = (values.cumsum(2) / counts[:, None]).transpose(1, 2)  # (batch, T, heads, dim)
    return torch.where(dropped[:, None, :, None], uniform.to(output.dtype), output), weights


def set_head_drop(model, mask: torch.Tensor | None) -> None:
    """The heads each sequence drops in the next forward passes: (batch, layers, heads) bool, True = dropped."""
    for module in model.modules():
        if hasattr(module, "layer_idx"):
            module.head_drop_mask = mask


def _register_head_dropout():
    from transformers import AttentionInterface

    AttentionInterface.register(HEAD_DROPOUT_ATTENTION, _head_dropout_attention)


@dataclass
class Recipe:
    """The organism's training recipe; the defaults are the bundled checkpoint's (`headscope organism train`'s
    flags are generated from these fields)."""

    seed: int = option(0, "seed of every random choice: the same seed gives byte-identical files")
    steps: int = option(3000, "optimizer steps in all (induction phase included)", minimum=1)
    hidden: int = option(128, "hidden size", group="model")
    layers: int = option(6, "decoder layers", group="model")
    heads: int = option(8, "attention heads per layer", group="model")
    intermediate: int = option(512, "MLP size", group="model")
    lr: float = option(3e-3, "peak AdamW learning rate")
    warmup: int = option(150, "linear warm-up steps")
    tokens_per_step: int = option(4096, "retrieval/induction tokens per multi-task step")
    reasoning_batch: int = option(8, "reasoning sequences per multi-task step")
    max_len: int = option(1216, "longest training sequence (end of the length curriculum)")
    min_len: int = option(96, "shortest training sequence (start of the length curriculum)")
    curriculum_frac: float = option(0.6, "share of the multi-task steps over which the length grows")
    induction_prob: float = option(0.1, "share of induction sequences in the multi-task batches")
    induction_steps: int = option(1200, "steps of the first phase: repeated random segments only")
    induction_batch: int = option(32, "sequences per induction-phase step")
    induction_len: int = option(64, "length of an induction-phase sequence")
    head_dropout: float = option(0.2, "probability that a head is ablated (uniform attention) in a training "
                                      "sequence, after the induction phase")
    threads: int = option(2, "torch threads")
    log_every: int = option(25, "steps between log lines")
    time_limit: float | None = option(None, "stop after this many seconds")
    save_every: int = option(0, "save a checkpoint every N steps (0: only at the end)")


def training_setup(r, vocab_len: int):
    """What every organism's training shares, from its recipe `r`: torch's threads and seed, the Llama (its
    embedding padded to a multiple of 64 rows past `vocab_len` words; head-dropout attention when r.head_dropout),
    the weighted loss with each sequence's own dropped heads, AdamW, and the learning rate (linear warm-up, flat
    through the induction phase, then cosine to 5%). Returns (model, loss_on, opt, lr_at)."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    vocab_size = ((vocab_len + 63) // 64) * 64
    config = make_config(vocab_size, r.hidden, r.layers, r.heads, r.intermediate)
    config._attn_implementation = "sdpa"
    if r.head_dropout:
        _register_head_dropout()
        config._attn_implementation = HEAD_DROPOUT_ATTENTION
    model = LlamaForCausalLM(config)
    print(f"params {sum(p.numel() for p in model.parameters()):,}  vocab {vocab_len} (padded {vocab_size})", flush=True)
    drop_rng = torch.Generator().manual_seed(r.seed)

    def loss_on(batch, drop: bool = True):
        ids, weights = batch
        if r.head_dropout and drop:
            set_head_drop(model, torch.rand(ids.shape[0], r.layers, r.heads, generator=drop_rng) < r.head_dropout)
        try:
            return weighted_loss(model, ids, weights)
        finally:
            set_head_drop(model, None)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=r.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step):
        if step < r.warmup:
            return r.lr * (step + 1) / r.warmup
        if step < r.induction_steps:
            return r.lr
        progress = (step - r.induction_steps) / max(1, r.steps - r.induction_steps)
        return r.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    return model, loss_on, opt, lr_at


def train(out_dir, recipe: Recipe | None = None) -> Path:
    """Train the organism from scratch, deterministically from the recipe's seed; save it to ``out_dir``."""
    r = recipe or Recipe()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = build_vocab()
    model, loss_on, opt, lr_at = training_setup(r, len(vocab))
    gen = DataGen(r.seed, vocab)
    lrng = random.Random(f"lengths-{r.seed}")

    def max_len_at(s):
        p = min(1.0, (s - r.induction_steps) / max(1, r.curriculum_frac * (r.steps - r.induction_steps)))
        return int(r.min_len + (r.max_len - r.min_len) * p)

    model.train()
    t0 = time.time()
    ema = {}
    # phase 1: pure induction on short sequences (cheap), so that copying circuits exist early
    for step in range(r.induction_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # no head dropout yet: with it, the induction circuit did not form in these steps
        loss, _, acc = loss_on(pad_batch([gen.induction(r.induction_len, 24) for _ in range(r.induction_batch)]), False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema["acc_ind"] = acc if step == 0 else 0.9 * ema["acc_ind"] + 0.1 * acc
        if step % r.log_every == 0:
            print(f"induction step {step:5d} loss {loss.item():.3f} acc_ind {ema['acc_ind']:.3f}"
                  f"  {time.time() - t0:7.1f}s", flush=True)
    ema = {}
    # phase 2: the tasks, with a length curriculum
    for step in range(r.induction_steps, r.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        hi = max_len_at(step)
        T = lrng.randint(min(r.min_len, hi), hi)
        T = max(64, (T // 16) * 16)
        B = max(1, r.tokens_per_step // T)
        items = []
        for _ in range(B):
            if lrng.random() < r.induction_prob:
                items.append(gen.induction(T))
            else:
                items.append(gen.retrieval(T))
        loss_r, acc_r, acc_i = loss_on(pad_batch(items, T))
        loss_q, acc_q, _ = loss_on(pad_batch([gen.reasoning() for _ in range(r.reasoning_batch)]))
        loss = loss_r + loss_q
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in (("loss_r", loss_r.item()), ("loss_q", loss_q.item()), ("acc_r", acc_r),
                     ("acc_q", acc_q), ("acc_ind", acc_i)):
            ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
        if step % r.log_every == 0 or step == r.steps - 1:
            el = time.time() - t0
            print(f"step {step:5d} T {T:4d} B {B:3d} lr {lr_at(step):.2e} "
                  + " ".join(f"{k} {v:.3f}" for k, v in ema.items()) + f"  {el:7.1f}s", flush=True)
        if r.save_every and step and step % r.save_every == 0:
            _save(model, tokenizer, out_dir)
        if r.time_limit and time.time() - t0 > r.time_limit:
            print(f"time limit reached at step {step}", flush=True)
            break
    print(f"training wall time {time.time() - t0:.1f}s", flush=True)
    _save(model, tokenizer, out_dir)
    return out_dir


def _save(model, tokenizer, out_dir):
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=BOS, eos_token_id=[EOS, NEWLINE_ID], pad_token_id=PAD, do_sample=False,
        max_new_tokens=50)
    training_attention = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"  # the saved model needs nothing of the training code
    model.save_pretrained(out_dir, safe_serialization=True)
    model.config._attn_implementation = training_attention
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


EVAL_CONTEXT_LENGTHS = (300, 450, 700, 950, 1200)  # haystack + needle of 100 ... 1,000 tokens (200 left free)
ANSWER_MARKER = "so the answer is"


def evaluate(model_dir, threads: int = 2, verbose: bool = True) -> dict:
    """Quality report of a checkpoint on the bundled, held-out data, through headscope's own engine (the
    same decode loop, prompts and metric as `headscope detect`): needle retrieval over 5 context lengths x
    11 depths x 5 needles (ROUGE-1 recall > 50), and the 40 reasoning questions (right when the words
    after "so the answer is" are the answer)."""
    import tempfile

    from ..detection import loading
    from ..detection.engine import detect
    from ..runs.outputs import ranked

    torch.set_num_threads(threads)
    loaded = loading.load(str(model_dir))
    with tempfile.TemporaryDirectory() as out:
        retrieval = detect("retrieval", loaded=loaded, out=out, quiet=True,
                           context_lengths=list(EVAL_CONTEXT_LENGTHS), num_depths=11)
        reasoning = detect("reasoning", loaded=loaded, out=out, quiet=True, success_threshold=-1)
    report: dict = {"retrieval": {}}
    for length in EVAL_CONTEXT_LENGTHS:
        rows = [row for row in retrieval.samples if row["context_length"] == length]
        report["retrieval"][length] = sum(row["passed"] for row in rows) / len(rows)
        for row in rows:
            if verbose and not row["passed"]:
                print(f"  miss: context {length}, depth {row['depth_percent']}: {row['response']!r}")
    report["retrieval_overall"] = retrieval.counts["passed"] / retrieval.counts["run"]
    means = ranked(retrieval.summary)
    report["top_retrieval_heads"] = [(key, round(stats["mean"], 3)) for key, stats in means[:8]]
    for cut in (0.5, 0.1):
        report[f"heads_ge_{cut}"] = sum(stats["mean"] >= cut for _, stats in means)
    answers = {sample["id"]: sample["answer"] for sample in _reasoning_records()}
    right = [row for row in reasoning.samples
             if row["response"].split(ANSWER_MARKER)[-1].strip() == answers[row["id"]]
             and ANSWER_MARKER in row["response"]]
    report["reasoning"] = {"correct": len(right), "total": len(reasoning.samples),
                           "accuracy": len(right) / len(reasoning.samples)}
    if verbose:
        print("retrieval: " + ", ".join(f"context {n} {rate:.1%}" for n, rate in report["retrieval"].items())
              + f"; overall {retrieval.counts['passed']}/{retrieval.counts['run']}")
        print("top retrieval heads: " + ", ".join(f"{key} {mean}" for key, mean in report["top_retrieval_heads"]))
        print(f"reasoning: {len(right)}/{len(reasoning.samples)} right")
    return report


def _reasoning_records() -> list[dict]:
    from ..tasks import DATA_DIR

    return [json.loads(line) for line in (DATA_DIR / "reasoning.jsonl").read_text().splitlines() if line.strip()]


WHICH = ("organism", "thinker")
WHICH_HELP = ("which organism: the organism (retrieval, one-line reasoning; default) or the thinker (think blocks with "
              "planted anchors, organism/thinker.py); the flags below are its recipe's")


def main(argv=None) -> int:
    from ..parser import HeadscopeParser  # a mistake is one line, as in every other command

    ap = HeadscopeParser(prog="headscope organism train", description="Train or evaluate the bundled model organism.")
    ap.add_argument("--which", choices=WHICH, default="organism", help=WHICH_HELP)
    ap.add_argument("--out", help="output checkpoint directory")
    add_arguments(ap, Recipe)
    ap.add_argument("--evaluate", metavar="MODEL_DIR", help="evaluate a checkpoint instead")
    ap.add_argument("--write-data", metavar="DATA_DIR", help="(re)write the bundled data files")
    args = ap.parse_args(argv)
    names = {spec.name for spec in dataclasses.fields(Recipe)}
    recipe = Recipe(**{name: value for name, value in vars(args).items() if name in names})
    if args.write_data:
        synth.write_bundled_data(args.write_data)
        return 0
    if args.evaluate:
        evaluate(args.evaluate, threads=recipe.threads)
        return 0
    if not args.out:
        ap.error("--out is required to train")
    train(args.out, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
