"""A generated text corpus with easy and hard next tokens (no download).

Documents are sentences from a small probabilistic grammar. Some tokens
follow from the word before (fixed phrases, counting, the full stop), some
need a word further back (an animal's sound after an adverb, a copied
food), and some are free choices that no model can predict (which
sentence, which animal).
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


def _sentence(rng: np.random.Generator) -> list[str]:
    kind = rng.integers(4)
    if kind == 0:
        animal = str(rng.choice(list(_ANIMALS)))
        adverb = [str(rng.choice(_ADVERBS))] if rng.random() < 0.5 else []
        return ["the", animal, *adverb, _ANIMALS[animal], "."]
    if kind == 1:
        first = int(rng.integers(len(_NUMBERS) - 3))
        return ["count", *_NUMBERS[first : first + 4], "."]
    if kind == 2:
        name_1, name_2 = rng.choice(_NAMES, 2, replace=False)
        food = str(rng.choice(_FOODS))
        return [
            str(name_1),
            "likes",
            food,
            "and",
            str(name_2),
            "likes",
            food,
            "too",
            ".",
        ]
    animal = str(rng.choice(list(_ANIMALS)))
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
        words = ["<bos>"]
        while len(words) < length:
            words += _sentence(rng)
        documents.append(encode(words[:length]))
    return documents
