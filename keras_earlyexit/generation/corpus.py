"""A generated text corpus with easy and hard next tokens (no download).

Documents are sentences from a small probabilistic grammar. Some tokens
follow from the word before (fixed phrases, counting, the full stop), some
need a word further back (an animal's sound after an adverb, a copied
food, the next kind of sentence), and some need the document's earlier
sentences: a document keeps its cast (its animal, names, food and first
number), re-used with probability 0.8.

Free choices are skewed the way word choices in text are (Zipf weights
1/rank), so that greedy decoding has a clear most likely token. With
uniform choices the most likely token is often a near tie that any
rounding difference flips, and greedy decoding stops being a reference an
approximation can agree with.
"""

import numpy as np

PAD, BOS = 0, 1
_ANIMALS = {"cat": "meows", "dog": "barks", "cow": "moos", "owl": "hoots"}
_NAMES = ("ann", "bob", "eve", "max")
_FOODS = ("bread", "rice", "soup", "cake")
_ADVERBS = ("loudly", "softly", "often")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven")
_WORDS = (
    "the", "likes", "and", "too", "count", "once", "upon", "a", "time",
    "there", "was", ".",
)  # fmt: skip

VOCABULARY: tuple[str, ...] = (
    "<pad>",
    "<bos>",
    *_WORDS,
    *_ANIMALS,
    *_ANIMALS.values(),
    *_NAMES,
    *_FOODS,
    *_ADVERBS,
    *_NUMBERS,
)
_ID = {word: i for i, word in enumerate(VOCABULARY)}


_KINDS = 4
_NEXT_KIND = 0.6  # chance that a sentence of kind k is followed by kind k + 1


def _zipf(rng: np.random.Generator, options, exclude=()) -> str:
    """One of `options`, with weights 1/rank (those in `exclude` left out)."""
    options = [o for o in options if o not in exclude]
    weights = 1.0 / np.arange(1, len(options) + 1)
    return str(options[rng.choice(len(options), p=weights / weights.sum())])


def _next_kind(rng: np.random.Generator, kind: int | None) -> int:
    if kind is None:
        return int(rng.integers(_KINDS))
    if rng.random() < _NEXT_KIND:
        return (kind + 1) % _KINDS
    return int(rng.choice([k for k in range(_KINDS) if k != (kind + 1) % _KINDS]))


_KEEP = 0.8  # chance that a sentence re-uses the document's cast


def _cast(rng: np.random.Generator, cast: dict, role: str, options, exclude=()):
    """The document's choice for `role` (kept with probability `_KEEP`),
    else a fresh Zipf choice; the first choice joins the cast."""
    if role in cast and cast[role] not in exclude and rng.random() < _KEEP:
        return cast[role]
    return cast.setdefault(role, _zipf(rng, options, exclude))


def _sentence(rng: np.random.Generator, kind: int, cast: dict) -> list[str]:
    if kind == 0:
        animal = _cast(rng, cast, "animal", list(_ANIMALS))
        adverb = [_zipf(rng, _ADVERBS)] if rng.random() < 0.3 else []
        return ["the", animal, *adverb, _ANIMALS[animal], "."]
    if kind == 1:
        first = _cast(rng, cast, "number", _NUMBERS[: len(_NUMBERS) - 3])
        first = _NUMBERS.index(first)
        return ["count", *_NUMBERS[first : first + 4], "."]
    if kind == 2:
        name_1 = _cast(rng, cast, "name_1", _NAMES)
        name_2 = _cast(rng, cast, "name_2", _NAMES, exclude=(name_1,))
        food = _cast(rng, cast, "food", _FOODS)
        return [name_1, "likes", food, "and", name_2, "likes", food, "too", "."]
    animal = _cast(rng, cast, "animal", list(_ANIMALS))
    return ["once", "upon", "a", "time", "there", "was", "a", animal, "."]


def encode(words) -> np.ndarray:
    """Word list or space-separated string -> token ids."""
    if isinstance(words, str):
        words = words.split()
    return np.asarray([_ID[w] for w in words], np.int32)


def decode(token_ids) -> str:
    """Token ids -> space-separated words."""
    return " ".join(VOCABULARY[int(t)] for t in token_ids)


def grammar_corpus(
    num_documents: int, max_length: int, seed: int = 0, min_length: int | None = None
) -> list[np.ndarray]:
    """Documents of `<bos>` and whole sentences, each of a random length in
    `[min_length, max_length]` tokens (default `min_length = max_length //
    2`), cut at the end if a sentence does not fit.

    Returns:
        List of int32 arrays of token ids (vocabulary: `VOCABULARY`).
    """
    rng = np.random.default_rng(seed)
    min_length = min_length or max(2, max_length // 2)
    documents = []
    for _ in range(num_documents):
        length = int(rng.integers(min_length, max_length + 1))
        words, kind, cast = ["<bos>"], None, {}
        while len(words) < length:
            kind = _next_kind(rng, kind)
            words += _sentence(rng, kind, cast)
        documents.append(encode(words[:length]))
    return documents
