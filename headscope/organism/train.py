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

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

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


def build_tokenizer():
    """The organism's fast tokenizer (a ``transformers.PreTrainedTokenizerFast``).

    Word-level; words and punctuation are split apart, spaces dropped, ``"\\n"`` kept as a token of
    its own; ``<s>`` is prepended when ``add_special_tokens`` is true (the default); decoding joins
    tokens with single spaces and no spaces around newlines.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(build_vocab(), unk_token="<unk>"))
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


def train(out_dir, seed: int = 0, steps: int = 3000, hidden: int = 128, layers: int = 6,
          heads: int = 8, intermediate: int = 512, lr: float = 3e-3, warmup: int = 150,
          tokens_per_step: int = 4096, reasoning_batch: int = 8, max_len: int = 1216,
          min_len: int = 96, curriculum_frac: float = 0.6, induction_prob: float = 0.1,
          threads: int = 2, log_every: int = 25, time_limit: float | None = None,
          save_every: int = 0, induction_steps: int = 1200, induction_batch: int = 32,
          induction_len: int = 64, head_dropout: float = 0.2) -> Path:
    """Train the organism from scratch, deterministically from ``seed``; save it to ``out_dir``."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab = build_vocab()
    vocab_size = ((len(vocab) + 63) // 64) * 64
    config = make_config(vocab_size, hidden, layers, heads, intermediate)
    config._attn_implementation = "sdpa"
    if head_dropout:
        _register_head_dropout()
        config._attn_implementation = HEAD_DROPOUT_ATTENTION
    model = LlamaForCausalLM(config)
    drop_rng = torch.Generator().manual_seed(seed)

    def loss_on(batch, drop: bool = True):  # the weighted loss, each sequence with its own dropped heads
        ids, wt = batch
        if head_dropout and drop:
            set_head_drop(model, torch.rand(ids.shape[0], layers, heads, generator=drop_rng) < head_dropout)
        try:
            return weighted_loss(model, ids, wt)
        finally:
            set_head_drop(model, None)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}  vocab {len(vocab)} (padded {vocab_size})", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-8)
    gen = DataGen(seed, vocab)
    lrng = random.Random(f"lengths-{seed}")

    def lr_at(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        if s < induction_steps:
            return lr
        p = (s - induction_steps) / max(1, steps - induction_steps)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))

    def max_len_at(s):
        p = min(1.0, (s - induction_steps) / max(1, curriculum_frac * (steps - induction_steps)))
        return int(min_len + (max_len - min_len) * p)

    model.train()
    t0 = time.time()
    ema = {}
    # phase 1: pure induction on short sequences (cheap), so that copying circuits exist early
    for step in range(induction_steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        # no head dropout yet: with it, the induction circuit did not form in these steps
        loss, _, acc = loss_on(pad_batch([gen.induction(induction_len, 24) for _ in range(induction_batch)]), False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema["acc_ind"] = acc if step == 0 else 0.9 * ema["acc_ind"] + 0.1 * acc
        if step % log_every == 0:
            print(f"induction step {step:5d} loss {loss.item():.3f} acc_ind {ema['acc_ind']:.3f}"
                  f"  {time.time() - t0:7.1f}s", flush=True)
    ema = {}
    # phase 2: the tasks, with a length curriculum
    for step in range(induction_steps, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        hi = max_len_at(step)
        T = lrng.randint(min(min_len, hi), hi)
        T = max(64, (T // 16) * 16)
        B = max(1, tokens_per_step // T)
        items = []
        for _ in range(B):
            if lrng.random() < induction_prob:
                items.append(gen.induction(T))
            else:
                items.append(gen.retrieval(T))
        loss_r, acc_r, acc_i = loss_on(pad_batch(items, T))
        loss_q, acc_q, _ = loss_on(pad_batch([gen.reasoning() for _ in range(reasoning_batch)]))
        loss = loss_r + loss_q
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for k, v in (("loss_r", loss_r.item()), ("loss_q", loss_q.item()), ("acc_r", acc_r),
                     ("acc_q", acc_q), ("acc_ind", acc_i)):
            ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
        if step % log_every == 0 or step == steps - 1:
            el = time.time() - t0
            print(f"step {step:5d} T {T:4d} B {B:3d} lr {lr_at(step):.2e} "
                  + " ".join(f"{k} {v:.3f}" for k, v in ema.items()) + f"  {el:7.1f}s", flush=True)
        if save_every and step and step % save_every == 0:
            _save(model, tokenizer, out_dir)
        if time_limit and time.time() - t0 > time_limit:
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


def _greedy(model, ids: list[int], max_new: int, stop: set[int], want_attn: bool = False):
    """Greedy decoding with a KV cache; optionally returns each step's attention rows."""
    from ..decode import cache_argument

    cache_kw = cache_argument(model)
    x = torch.tensor([ids])
    out, attns, past = [], [], None
    with torch.no_grad():
        for _ in range(max_new):
            r = model(input_ids=x, use_cache=True, output_attentions=want_attn, **{cache_kw: past})
            past = getattr(r, "cache", None) or r.past_key_values
            nxt = int(r.logits[0, -1].argmax())
            if want_attn:  # per layer: (heads, kv_len) for the last query position
                attns.append([a[0, :, -1].clone() for a in r.attentions])
            out.append(nxt)
            if nxt in stop:
                break
            x = torch.tensor([[nxt]])
    return out, attns


def _insert_needle(tok, hay_ids: list[int], needle: str, depth: float) -> list[int]:
    """Retrieval_Head-style insertion: at ``depth`` %, moved back to the nearest sentence end."""
    nid = tok(needle, add_special_tokens=False)["input_ids"]
    period = set(tok(".", add_special_tokens=False)["input_ids"])
    if depth >= 100:
        return hay_ids + nid
    p = int(len(hay_ids) * depth / 100)
    while p > 0 and hay_ids[p - 1] not in period:
        p -= 1
    return hay_ids[:p] + nid + hay_ids[p:]


def evaluate(model_dir, data_dir=None, lengths=(100, 250, 500, 750, 1000),
             depths=tuple(range(0, 101, 10)), threads: int = 2, verbose: bool = True) -> dict:
    """Quality report of a checkpoint on the bundled, held-out data (greedy decoding)."""
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    data_dir = Path(data_dir) if data_dir else Path(__file__).resolve().parent.parent / "data"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager",
                                                 dtype=torch.float32)
    model.eval()
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    stop = {tok.eos_token_id, tok.convert_tokens_to_ids("\n")}
    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    hay_text = "".join(p.read_text() for p in sorted((data_dir / "haystack").glob("*.txt")))
    hay_all = tok(hay_text, add_special_tokens=False)["input_ids"]
    needles = [json.loads(line) for line in open(data_dir / "needles.jsonl")]
    report: dict = {"retrieval": {}, "reasoning": {}}
    head_scores = torch.zeros(L, H)
    n_samples = 0
    t0 = time.time()
    for n_hay in lengths:
        ok = total = 0
        for nd in needles:
            for d in depths:
                ctx = _insert_needle(tok, hay_all[:n_hay], nd["needle"], d)
                prompt = synth.retrieval_prompt(tok.decode(ctx), nd["question"])
                ids = tok(prompt)["input_ids"]
                gen, attns = _greedy(model, ids, 50, stop, want_attn=True)
                resp = tok.decode(gen, skip_special_tokens=True).strip()
                rec = scorer.score(nd["real_needle"], resp)["rouge1"].recall * 100
                ok += rec > 50
                total += 1
                # retrieval score: argmax of the head's attention on the needle token being copied
                nid = tok(" " + nd["real_needle"], add_special_tokens=False)["input_ids"]
                start = next(i for i in range(len(ids)) if ids[i:i + len(nid)] == nid)
                span = range(start, start + len(nid))
                sc = torch.zeros(L, H)
                for s, g in enumerate(gen):
                    for layer in range(L):
                        am = attns[s][layer].argmax(-1)
                        for h in range(H):
                            j = int(am[h])
                            if j in span and ids[j] == g:
                                sc[layer, h] += 1.0 / len(nid)
                head_scores += sc
                n_samples += 1
                if verbose and rec <= 50:
                    print(f"  miss len {n_hay} depth {d}: {nd['real_needle']!r} -> {resp!r}")
        report["retrieval"][n_hay] = ok / total
        if verbose:
            print(f"retrieval haystack {n_hay:5d} tokens (prompt ~{len(ids)}): "
                  f"{ok}/{total} = {ok / total:.1%}   [{time.time() - t0:.0f}s]", flush=True)
    head_scores /= max(1, n_samples)
    flat = [((l, h), float(head_scores[l, h])) for l in range(L) for h in range(H)]
    flat.sort(key=lambda x: -x[1])
    report["retrieval_overall"] = sum(report["retrieval"].values()) / len(report["retrieval"])
    report["top_retrieval_heads"] = [(f"L{l}H{h}", round(s, 3)) for (l, h), s in flat[:8]]
    report["heads_ge_0.5"] = sum(s >= 0.5 for _, s in flat)
    report["heads_ge_0.1"] = sum(s >= 0.1 for _, s in flat)
    report["heads_lt_0.05"] = sum(s < 0.05 for _, s in flat)
    # reasoning
    probs = [json.loads(line) for line in open(data_dir / "reasoning.jsonl")]
    ok = 0
    for p in probs:
        ids = tok(synth.reasoning_prompt(p["context"], p["question"]))["input_ids"]
        gen, _ = _greedy(model, ids, 100, stop)
        resp = tok.decode(gen, skip_special_tokens=True).strip()
        final = resp.split("so the answer is")[-1].strip() if "so the answer is" in resp else ""
        good = final == p["answer"]
        ok += good
        if verbose and not good:
            print(f"  reasoning miss {p['id']}: {p['question']} -> {resp!r} (want {p['answer']})")
    report["reasoning"] = {"correct": ok, "total": len(probs), "accuracy": ok / len(probs)}
    if verbose:
        print(json.dumps(report, indent=1))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="headscope organism train",
                                 description="Train or evaluate the bundled model organism.")
    ap.add_argument("--out", help="output checkpoint directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--reasoning-batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=1216)
    ap.add_argument("--min-len", type=int, default=96)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--curriculum-frac", type=float, default=0.6)
    ap.add_argument("--induction-prob", type=float, default=0.1)
    ap.add_argument("--induction-steps", type=int, default=1200)
    ap.add_argument("--head-dropout", type=float, default=0.2,
                    help="probability that a head is ablated (uniform attention) in a training sequence")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--evaluate", metavar="MODEL_DIR", help="evaluate a checkpoint instead")
    ap.add_argument("--write-data", metavar="DATA_DIR", help="(re)write the bundled data files")
    args = ap.parse_args(argv)
    if args.write_data:
        synth.write_bundled_data(args.write_data)
        return 0
    if args.evaluate:
        evaluate(args.evaluate, threads=args.threads)
        return 0
    if not args.out:
        ap.error("--out is required to train")
    train(args.out, seed=args.seed, steps=args.steps, hidden=args.hidden, layers=args.layers,
          heads=args.heads, intermediate=args.intermediate, lr=args.lr,
          tokens_per_step=args.tokens_per_step, reasoning_batch=args.reasoning_batch,
          max_len=args.max_len, min_len=args.min_len, warmup=args.warmup,
          curriculum_frac=args.curriculum_frac, induction_prob=args.induction_prob,
          induction_steps=args.induction_steps, threads=args.threads, time_limit=args.time_limit,
          save_every=args.save_every, head_dropout=args.head_dropout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
