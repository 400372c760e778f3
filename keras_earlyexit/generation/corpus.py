"""A generated text corpus with easy and hard next tokens (no download).

Documents are sentences from a small probabilistic grammar. Some tokens
follow from the word before (fixed phrases, counting, the full stop), some
need a word further back (an animal's sound after an adverb, a copied
food, the next kind of sentence), and some need the document's earlier
sentences: a document keeps its cast (its animal, names, food and first
number), and its sentences mostly follow a story order.

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


def _zipf(rng: np.random.Generator, options, exclude=()) -> str:
    """One of `options`, with weights 1/rank (those in `exclude` left out)."""
    options = [o for o in options if o not in exclude]
    weights = 1.0 / np.arange(1, len(options) + 1)
    return str(options[rng.choice(len(options), p=weights / weights.sum())])


class _Document:
    """Draws one document's sentences: the kinds in story order (kind k,
    then k + 1) with probability `follow`, and the document's cast re-used
    with probability `keep`."""

    def __init__(self, rng: np.random.Generator, follow: float, keep: float):
        self.rng, self.follow, self.keep = rng, follow, keep
        self.kind, self.cast = None, {}

    def _next_kind(self) -> int:
        rng = self.rng
        if self.kind is None:
            return int(rng.integers(_KINDS))
        following = (self.kind + 1) % _KINDS
        if rng.random() < self.follow:
            return following
        return int(rng.choice([k for k in range(_KINDS) if k != following]))

    def _cast(self, role: str, options, exclude=()) -> str:
        """The cast's choice for `role`, else a fresh Zipf choice; the first
        choice joins the cast."""
        chosen = self.cast.get(role)
        if chosen is not None and chosen not in exclude:
            if self.rng.random() < self.keep:
                return chosen
        fresh = _zipf(self.rng, options, exclude)
        self.cast.setdefault(role, fresh)
        return fresh

    def sentence(self) -> list[str]:
        self.kind = kind = self._next_kind()
        if kind == 0:
            animal = self._cast("animal", list(_ANIMALS))
            adverb = [_zipf(self.rng, _ADVERBS)] if self.rng.random() < 0.3 else []
            return ["the", animal, *adverb, _ANIMALS[animal], "."]
        if kind == 1:
            first = _NUMBERS.index(self._cast("number", _NUMBERS[:-3]))
            return ["count", *_NUMBERS[first : first + 4], "."]
        if kind == 2:
            name_1 = self._cast("name_1", _NAMES)
            name_2 = self._cast("name_2", _NAMES, exclude=(name_1,))
            food = self._cast("food", _FOODS)
            return [name_1, "likes", food, "and", name_2, "likes", food, "too", "."]
        animal = self._cast("animal", list(_ANIMALS))
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
    num_documents: int,
    max_length: int,
    seed: int = 0,
    min_length: int | None = None,
    follow: float = 0.8,
    keep: float = 0.9,
) -> list[np.ndarray]:
    """Documents of `<bos>` and whole sentences, each of a random length in
    `[min_length, max_length]` tokens (default `min_length = max_length //
    2`), cut at the end if a sentence does not fit.

    Args:
        num_documents: documents to draw.
        max_length: longest document, in tokens.
        seed: seed of the draw.
        min_length: shortest document (default `max_length // 2`).
        follow: chance that a sentence of kind k is followed by kind k + 1
            (the story order); lower values make the next sentence harder
            to predict.
        keep: chance that a sentence re-uses the document's cast (its
            animal, names, food, first number) rather than a fresh choice.

    Returns:
        List of int32 arrays of token ids (vocabulary: `VOCABULARY`).
    """
    for name, value in (("follow", follow), ("keep", keep)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]. Received: {value!r}")
    rng = np.random.default_rng(seed)
    min_length = min_length or max(2, max_length // 2)
    documents = []
    for _ in range(num_documents):
        length = int(rng.integers(min_length, max_length + 1))
        document, words = _Document(rng, follow, keep), ["<bos>"]
        while len(words) < length:
            words += document.sentence()
        documents.append(encode(words[:length]))
    return documents
