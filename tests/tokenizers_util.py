"""Tiny offline tokenizers for tests: no downloads, built in milliseconds.

- `word_level_tokenizer()`: lowercased, one token per word or punctuation run; decoding joins
  tokens with spaces, so "End." comes back as "end ." (a tokenizer whose decode changes the text).
- `byte_level_bpe_tokenizer()`: GPT-2 style byte-level BPE trained on a small corpus; " blue" is one
  token that includes its leading space.
- `whitespace_split_tokenizer(text)`: one token per whitespace-separated chunk, so words merge with
  their punctuation ("seven." is one token).
- `NoOffsetsTokenizer(tok)`: the same tokenizer seen as a slow one (no offset mapping).
Both builders attach `CHAT_TEMPLATE` and add a BOS token when `add_special_tokens=True`.
"""
from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Words the fixed word-level vocabulary knows; anything else becomes <unk>.
WORDS = (
    "the a an and of to in is was it that on for with as at by from this be are he she they we you i "
    "book river city sun rain day night dog cat house garden road tree water story people time year "
    "walked talked slept read wrote ran saw said went came looked found made took gave "
    "old new small big long short green red blue seven eight nine quiet loud happy sad "
    "best thing do eat sandwich sit park sunny secret code answer question what where who why "
    "mr because mean person everyone dislikes disliked can't ride horse dive car "
    "based content context . , ? ! : ' \" - < > / | ( )"
).split()

CORPUS = [
    "The old river ran past the small city and the sun was out all day.",
    "People walked in the garden and talked about the long story of the house.",
    "The best thing to do in the city is to eat a sandwich and sit in the park on a sunny day.",
    "The secret code is blue river seven. The dog slept. The cat read a book.",
    "Based on the content of the book, Question: What is the secret code?\nAnswer:",
    "Context: the rain came at night.\n\nQuestion: When did the rain come?\n\nAnswer:",
    "A blue tree, a red house, a green road, a quiet night and a loud day.",
]


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@lru_cache(maxsize=None)
def _word_level() -> Tokenizer:
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def word_level_tokenizer() -> PreTrainedTokenizerFast:
    return _wrap(Tokenizer.from_str(_word_level().to_str()))


@lru_cache(maxsize=None)
def _byte_level_bpe() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok.to_str()


def byte_level_bpe_tokenizer() -> PreTrainedTokenizerFast:
    return _wrap(Tokenizer.from_str(_byte_level_bpe()))


def whitespace_split_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated chunk of `text`, punctuation included ("seven." is one token)."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(dict.fromkeys(text.split())))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return _wrap(tok)


class NoOffsetsTokenizer:
    """Looks like a slow tokenizer: same ids, but no `return_offsets_mapping`."""

    is_fast = False

    def __init__(self, fast: PreTrainedTokenizerFast):
        self._fast = fast

    def __call__(self, text, add_special_tokens=True, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self._fast(text, add_special_tokens=add_special_tokens)

    def encode(self, text, add_special_tokens=True):
        return self._fast.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, **kwargs):
        return self._fast.decode(ids, **kwargs)


@lru_cache(maxsize=None)
def _metaspace_bpe() -> str:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    return tok.to_str()


def metaspace_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece style (Llama-2, Mistral): "▁" marks a word's leading space, and a text's first word gets one."""
    return _wrap(Tokenizer.from_str(_metaspace_bpe()))
