"""Caption text ↔ token ids, with a `tokenizers` word-level vocabulary trained on the training captions.

The builders train it when they write captioning shards and store it beside the manifest as
`tokenizer.json` (the manifest's `tokenizer` key names it), so the shards and their vocabulary travel
together; a config may name another file (`task.tokenizer`). Ids: 0 [PAD], 1 [UNK], 2 [BOS], 3 [EOS].
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

from lamscale import storage

SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD, UNK, BOS, EOS = range(len(SPECIALS))
TOKENIZER_FILE = "tokenizer.json"
STATS_FILE = "caption_stats.json"  # the most frequent training caption: the baseline every eval is compared to


def train_tokenizer(texts: Iterable[str], min_frequency: int = 1, vocab_size: int = 30_000) -> Tokenizer:
    """Lower-cased words and punctuation (BERT's pre-tokenizer) of `texts`, specials first."""
    tokenizer = Tokenizer(WordLevel(unk_token=SPECIALS[UNK]))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordLevelTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIALS),
                               show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def caption_problem(tokenizer: Tokenizer, text: object) -> str:
    """Why `text` cannot be a training target ("" when it can): not text, empty, or every word unknown."""
    if not isinstance(text, str) or not text.strip():
        return f"caption {text!r} is empty"
    ids = tokenizer.encode(text).ids
    if not ids:
        return f"caption {text!r} has no tokens"
    if all(i == UNK for i in ids):
        return f"caption {text!r} is all unknown tokens (none of its words is in the vocabulary)"
    return ""


def encode(tokenizer: Tokenizer, text: str, max_len: int) -> list[int]:
    """[BOS] ids… [EOS], the words cut to fit `max_len` ids in all."""
    return [BOS, *tokenizer.encode(text).ids[: max_len - 2], EOS]


def decode(tokenizer: Tokenizer, ids: Iterable[int]) -> str:
    """Generated ids up to the first [EOS] → text (words joined by spaces; specials left out)."""
    words = []
    for i in ids:
        if i == EOS:
            break
        words.append(int(i))
    return tokenizer.decode(words, skip_special_tokens=True)


def most_frequent(texts: Iterable[str]) -> str:
    """The most frequent caption (normalised by case and spaces; ties: the first seen)."""
    counts = Counter(" ".join(t.lower().split()) for t in texts)
    return counts.most_common(1)[0][0] if counts else ""


def tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    return tokenizer.to_str().encode()


def load_tokenizer(url: str) -> Tokenizer:
    """A tokenizer.json from any storage URL; one line naming it when it is not one."""
    if not storage.exists(url):
        raise FileNotFoundError(f"{url}: no tokenizer (captioning shards are built with one beside manifest.json)")
    try:
        return Tokenizer.from_str(storage.read_bytes(url).decode())
    except Exception as e:  # not JSON, or not a tokenizer
        raise ValueError(f"{url}: not a tokenizers JSON file ({type(e).__name__}: {e})") from None
