"""Report text → sentences, the text views of random sentence sampling.

The splitter (:func:`split_sentences`), applied to the findings and impression text of one report:

1. Whitespace runs become one space.
2. The text is cut after ``.``, ``?`` or ``!`` when whitespace and then an upper-case letter or a digit
   follow. So ``"Dr. ___"``, ``"e.g. the"`` and ``"2.5 cm"`` stay whole, and a numbered list
   ``"1. Small effusion. 2. No pneumothorax."`` falls into ``"1."``, ``"Small effusion."``, ``"2."``,
   ``"No pneumothorax."``.
3. From each piece, a leading section header (upper-case words and a colon: ``"FINDINGS:"``,
   ``"IMPRESSION:"``) and then leading list numbering (``"1."``, ``"2)"``, ``"(3)"``) are removed.
4. A piece is kept when it has at least ``min_words`` words holding a letter (default 1). Pieces that are
   only numbering or MIMIC's ``"___"`` de-identification placeholders have none and are dropped.

When no piece is kept, the whole text (step 1) is the one sentence, provided it holds a letter; a text
without any letter has no sentence.
"""

from __future__ import annotations

import re

_CUT = re.compile(r"(?<=[.?!])\s+(?=[A-Z0-9])")
_HEADER = re.compile(r"^[A-Z][A-Z /&,()-]*:\s*")
_NUMBERING = re.compile(r"^(?:\(?\d+[.)]\s*)+")
_LETTER = re.compile(r"[A-Za-z]")

DEFAULT_MIN_WORDS = 1


def report_text(findings: str, impression: str) -> str:
    """The text a report contributes: its findings, then its impression (either may be empty)."""
    return " ".join(part.strip() for part in (findings, impression) if part and part.strip())


def split_sentences(text: str, min_words: int = DEFAULT_MIN_WORDS) -> list[str]:
    """The sentences of ``text`` by the rule in the module docstring, in order.

    Raises:
        ValueError: ``min_words`` below 1.
    """
    if min_words < 1:
        raise ValueError(f"min_words must be at least 1, got {min_words}")
    collapsed = " ".join(text.split())
    sentences = []
    for piece in _CUT.split(collapsed):
        piece = _NUMBERING.sub("", _HEADER.sub("", piece)).strip()
        if sum(bool(_LETTER.search(word)) for word in piece.split()) >= min_words:
            sentences.append(piece)
    if not sentences and _LETTER.search(collapsed):
        return [collapsed]
    return sentences
