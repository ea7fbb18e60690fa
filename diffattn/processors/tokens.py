"""Where words sit in a tokenized prompt, for the editing methods that address tokens by word
(FateZero's blend, reweight and per-word schedules; IR-Diffusion's subject maps).

Token positions count the start token as 0, as the text encoder's output rows do. ``tokenizer`` is
any Hugging Face tokenizer (``tokenizer(text).input_ids``).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

__all__ = ["prompt_words", "word_token_spans", "word_token_indices"]

_MATCHES = ("exact", "normalized", "tokens")


def prompt_words(prompt: str) -> list[str]:
    """The space-separated words of ``prompt`` (the official FateZero word rule)."""
    return prompt.strip().split(" ")


def _norm_word(word: str) -> str:
    return word.lower().strip(".,;:!?\"'")


def word_token_spans(prompt: str, tokenizer) -> list[list[int]]:
    """Token positions of each space-separated word of ``prompt``."""
    spans, pos = [], 1
    for word in prompt_words(prompt):
        n = len(tokenizer(word, add_special_tokens=False).input_ids)
        spans.append(list(range(pos, pos + n)))
        pos += n
    total = len(tokenizer(prompt).input_ids)
    if pos + 1 != total:
        raise ValueError(
            f"prompt {prompt!r} tokenizes to {total} tokens but its words separately to {pos + 1}; "
            "put spaces between words and punctuation, or give token indices instead of words"
        )
    return spans


def _token_occurrences(prompt: str, word: str, tokenizer, what: str) -> list[int]:
    ids = tokenizer(prompt, truncation=True).input_ids
    sub = tokenizer(word.strip(), add_special_tokens=False).input_ids
    hits = [i for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub] if sub else []
    if not hits:
        raise ValueError(
            f"{what} {word!r} is not in prompt {prompt!r} (tokens: {tokenizer.convert_ids_to_tokens(ids)}); "
            "use a word of the prompt, or give token indices instead"
        )
    return [i + j for i in hits for j in range(len(sub))]


def word_token_indices(
    prompt: Optional[str], words: Sequence[Union[str, int]], tokenizer, max_len: int = 77, what: str = "words",
    match: str = "exact",
) -> list[int]:
    """Sorted token positions of ``words`` in ``prompt``; ints are taken as token positions as they are.

    ``match`` says where a word is found:

    * ``"exact"``: every space-separated word of the prompt equal to it (FateZero's official rule:
      ``"tiger"`` does not match ``"tiger,"``), all its tokens;
    * ``"normalized"``: the same, ignoring case and trailing punctuation;
    * ``"tokens"``: every occurrence of the word's (or phrase's) token sequence in the prompt
      truncated to the tokenizer's length (IR-Diffusion's subject words).

    Positions at or past ``max_len`` are dropped. Words need a tokenizer; without one give ints.
    """
    if match not in _MATCHES:
        raise ValueError(f"match must be one of {list(_MATCHES)}, got {match!r}")
    norm = _norm_word if match == "normalized" else (lambda x: x)
    out: list[int] = []
    spans = None
    for w in words:
        if isinstance(w, bool) or not isinstance(w, (str, int)):
            raise TypeError(f"{what} entry {w!r} must be a word (str) or a token index (int)")
        if isinstance(w, int):
            if not 0 <= w < max_len:
                raise ValueError(f"{what} token index {w} is outside [0, {max_len})")
            out.append(w)
            continue
        if tokenizer is None or prompt is None:
            raise ValueError(
                f"{what} entry {w!r} is a word but the pipeline has no tokenizer (or the prompt was given "
                "as embeddings); give token indices (ints, BOS = 0) instead"
            )
        if match == "tokens":
            found = [p for p in _token_occurrences(prompt, w, tokenizer, what) if p < max_len]
            if not found:
                raise ValueError(f"{what} {w!r} lies past the first {max_len} tokens of prompt {prompt!r}")
            out.extend(found)
            continue
        if spans is None:
            spans = word_token_spans(prompt, tokenizer)
        hits = [i for i, pw in enumerate(prompt_words(prompt)) if norm(pw) == norm(w)]
        if not hits:
            hint = "" if match == "normalized" else "; words match exactly (word_match='normalized' ignores case and punctuation)"
            raise ValueError(
                f"{what} entry {w!r} is not a word of the prompt {prompt!r} (words: {prompt_words(prompt)}){hint}"
            )
        for i in hits:
            out.extend(p for p in spans[i] if p < max_len)
    return sorted(set(out))
