"""Which instruction tokens say *where* to edit (content) and which carry nothing (unrelated).

LIME reads the edit instruction through the CLIP tokenizer without padding, ``[BOS, t1 .. tn, EOS]``,
which the text encoder then sees padded to ``max_length`` (77; CLIP pads with the EOS id). Each
position plays two roles:

* **Content** (stage 1, where to look): the tokens t1..tn of words that are not stop words, not
  punctuation and not verbs. BOS and EOS are never content. All tokens of a multi-token word share its
  role, so a word CLIP splits into several BPE pieces contributes all of its positions.
* **Keep** (stage 2, what not to silence inside the RoI): ``keep`` is False at BOS, at stop-word
  positions and at every padding position after EOS; it is True everywhere else (content words, verbs,
  punctuation and EOS).

Everything here is offline and deterministic: no NLTK, no downloads.

Words
    CLIP's BPE marks the last token of every word with ``</w>``; consecutive tokens up to and including
    one that ends in ``</w>`` form a word. CLIP's pre-tokenizer already splits punctuation and clitics,
    so "don't" is the two words "don" and "'t", "it's" is "it" and "'s", "x-ray" is "x", "-", "ray".
    A word's text is the tokens joined and byte-decoded, lower-cased ("café", "’"). A tokenizer whose
    tokens carry no ``</w>`` markers at all gets each token treated as its own word. Words are grouped
    before truncation, so a word cut short by truncation keeps its full text.

Stop words
    ``data/stopwords.txt``: an English list written for this package (pronouns, determiners,
    prepositions, conjunctions, auxiliaries, modals, and the contraction pieces "s", "t", "re", "ll",
    "don", ...). A word is compared after lower-casing and stripping apostrophes (' and ’) from both
    ends, so "'s" matches "s".

Punctuation
    A non-empty word every character of which is Unicode punctuation (P*), a math, currency or modifier
    symbol (Sm, Sc, Sk), a control/format character (C*) or a separator (Z*). Emoji and other symbols
    (So), letters and digits are not punctuation.

Verb rule
    ``data/verbs.txt`` holds a lexicon of word forms in two sections (format described in that file):

    * ``[always]`` forms ("make", "turn", "remove", "made", ...) are verbs wherever they occur;
    * ``[ambiguous]`` forms, also common nouns or adjectives ("paint", "color", "dress", "light",
      "snow", "fire", ...), are verbs only at the start of a clause: when they are the first word of
      the instruction (``previous_word`` is None or ""), or when the previous word is one of
      ``CLAUSE_STARTERS``: ``, ; : . ! ?``, ``and then also please``, ``let's lets``, ``you``,
      ``should can could would will must shall``.

    For the previous word, a clitic piece is glued to the word before it, so in "let's paint" the word
    before "paint" is "let's". "to" is deliberately *not* a clause starter: "change the weather to
    snow" is far more common in editing instructions than "to paint". Words outside the lexicon are
    never verbs. Stop words take precedence over the lexicon (the two lists share no word).

    Examples: "paint the wall red" -> "paint" is a verb; "add paint to the wall" -> "paint" is content;
    "can you color the car" -> "color" is a verb; "make her dress red" -> "dress" is content.

Fallbacks
    If an instruction has no content token, a ``LimeWarning`` is issued and every non-stop-word,
    non-punctuation token (verbs included) becomes content (``fallback="non_stop_words"``). If there is
    still none, a second warning is issued and ``content`` stays empty (``fallback="whole_image"``: the
    engine then uses the whole image as the RoI).

Truncation
    An instruction longer than ``max_length - 2`` tokens keeps BOS, its first ``max_length - 2`` tokens
    and EOS, exactly as ``tokenizer(text, padding="max_length", max_length=77, truncation=True)`` does;
    ``truncated`` is set and a ``LimeWarning`` says how many tokens were dropped.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from lime_fast.errors import LimeWarning

__all__ = [
    "STOP_WORDS",
    "ALWAYS_VERBS",
    "AMBIGUOUS_VERBS",
    "CLAUSE_STARTERS",
    "TokenRoles",
    "is_stop_word",
    "is_punctuation",
    "is_verb",
    "token_roles",
    "keep_mask",
]

_APOSTROPHES = "'\u2019"
_END_OF_WORD = "</w>"

# Previous words after which an ambiguous lexicon word counts as a verb (see the module docstring).
CLAUSE_STARTERS: frozenset[str] = frozenset(
    {",", ";", ":", ".", "!", "?", "and", "then", "also", "please", "let's", "lets", "you",
     "should", "can", "could", "would", "will", "must", "shall"}
)


def _data_lines(name: str) -> list[str]:
    """Non-empty lines of ``lime_fast/data/<name>`` with '#' comments removed, lower-cased."""
    try:
        root = files("lime_fast")
    except (NotADirectoryError, TypeError):  # lime_fast imported as a namespace package (no __init__.py)
        root = Path(__file__).parent
    text = root.joinpath("data", name).read_text(encoding="utf-8")
    lines = (line.split("#", 1)[0].strip().lower() for line in text.splitlines())
    return [line for line in lines if line]


def _load_stop_words() -> frozenset[str]:
    return frozenset(_data_lines("stopwords.txt"))


def _load_verbs() -> tuple[frozenset[str], frozenset[str]]:
    """Parse ``verbs.txt`` into its ``[always]`` and ``[ambiguous]`` sections."""
    sections: dict[str, set[str]] = {"always": set(), "ambiguous": set()}
    current: set[str] | None = None
    for line in _data_lines("verbs.txt"):
        if line.startswith("["):
            name = line.strip("[]").strip()
            if name not in sections:
                raise ValueError(f"verbs.txt: unknown section [{name}]; expected [always] or [ambiguous].")
            current = sections[name]
            continue
        if current is None:
            raise ValueError(f"verbs.txt: {line!r} comes before any [always] / [ambiguous] section header.")
        current.update(line.split())
    both = sections["always"] & sections["ambiguous"]
    if both:
        raise ValueError(f"verbs.txt: {sorted(both)} are listed in both sections.")
    return frozenset(sections["always"]), frozenset(sections["ambiguous"])


STOP_WORDS: frozenset[str] = _load_stop_words()
ALWAYS_VERBS, AMBIGUOUS_VERBS = _load_verbs()


def _normalize(word: str) -> str:
    """Lower-case, trim whitespace and apostrophes at both ends ("'S" -> "s")."""
    return word.strip().lower().strip(_APOSTROPHES)


def is_stop_word(word: str) -> bool:
    """True if ``word`` (any case, surrounding apostrophes ignored) is in ``STOP_WORDS``."""
    return _normalize(word) in STOP_WORDS


def is_punctuation(word: str) -> bool:
    """True if ``word`` is non-empty and consists only of punctuation-like characters.

    Allowed categories: P* (punctuation), Sm/Sc/Sk (math, currency, modifier symbols), C* (control,
    format) and Z* (separators). Letters, digits and So symbols such as emoji make it a real word.
    """
    if not word:
        return False
    for ch in word:
        cat = unicodedata.category(ch)
        if not (cat[0] in "PCZ" or cat in ("Sm", "Sc", "Sk")):
            return False
    return True


def is_verb(word: str, previous_word: str | None) -> bool:
    """The verb rule: ``[always]`` lexicon forms anywhere, ``[ambiguous]`` ones only at a clause start.

    ``previous_word`` is the word before ``word`` in the instruction (None or "" at the start); a
    clause starts after any word in ``CLAUSE_STARTERS``. Words outside the lexicon are never verbs.
    """
    w = _normalize(word)
    if w in ALWAYS_VERBS:
        return True
    if w not in AMBIGUOUS_VERBS:
        return False
    if previous_word is None:
        return True
    prev = previous_word.strip().lower().replace("\u2019", "'")
    return prev == "" or prev in CLAUSE_STARTERS


@dataclass(frozen=True)
class TokenRoles:
    """Roles of the positions of one tokenized instruction.

    Lengths: ``input_ids``, ``tokens`` and ``words`` have n + 2 entries (BOS, n tokens, EOS, unpadded);
    ``keep`` has ``max_length`` entries; ``content`` holds positions in ``[1, n]`` (which are the same
    in the unpadded and the padded sequence), ascending.
    """

    instruction: str
    input_ids: list[int]
    tokens: list[str]
    words: list[str]
    content: list[int]
    keep: list[bool]
    content_words: list[str]
    fallback: str | None
    truncated: bool

    @property
    def silenced_words(self) -> list[str]:
        """The instruction's words (or tokens) silenced inside the RoI, in order (BOS and padding left out)."""
        return [self.words[i] or self.tokens[i] for i in range(1, len(self.tokens) - 1) if not self.keep[i]]


def _group_words(tokenizer, ids: list[int]) -> tuple[list[str], list[int]]:
    """Split BPE ids into words.

    Returns ``(words, word_of)``: the lower-cased text of each word and, for each id, the index of
    its word. A word ends at a token ending in ``</w>``; without any such marker every token is a word.
    """
    toks = tokenizer.convert_ids_to_tokens(ids)
    marked = any(t.endswith(_END_OF_WORD) for t in toks)
    groups: list[list[str]] = []
    current: list[str] = []
    for t in toks:
        current.append(t)
        if not marked or t.endswith(_END_OF_WORD):
            groups.append(current)
            current = []
    if current:  # a word without its closing marker (cannot happen with CLIP; kept for safety)
        groups.append(current)
    words, word_of = [], []
    for i, g in enumerate(groups):
        text = tokenizer.convert_tokens_to_string(g).replace(_END_OF_WORD, " ").strip().lower()
        words.append(text)
        word_of.extend([i] * len(g))
    return words, word_of


def _context_words(words: list[str]) -> list[str | None]:
    """For each word, the previous word for the verb rule, with clitics glued on ("let", "'s" -> "let's")."""
    prev: list[str | None] = []
    for i in range(len(words)):
        if i == 0:
            prev.append(None)
            continue
        p = words[i - 1]
        if p[:1] in _APOSTROPHES and i >= 2:  # "let", "'s"
            p = words[i - 2] + p
        elif i >= 3 and words[i - 2] in ("'", "\u2019"):  # "let", "’", "s" (CLIP splits a curly apostrophe off)
            p = words[i - 3] + "'" + p
        prev.append(p)
    return prev


def _roi_word_list(tokenizer, roi_words: Sequence[str] | str) -> list[str]:
    """Entries of ``roi_words`` split into words the same way the instruction is."""
    if isinstance(roi_words, str):
        roi_words = [roi_words]
    out: list[str] = []
    for entry in roi_words:
        if not isinstance(entry, str):
            raise TypeError(f"roi_words entries must be str, got {type(entry).__name__}: {entry!r}")
        if not entry.strip():
            raise ValueError(f"roi_words contains a blank entry {entry!r}; remove it or pass roi_words=None.")
        ids = tokenizer(entry, add_special_tokens=False, verbose=False)["input_ids"]
        out.extend(w for w in _group_words(tokenizer, ids)[0] if w not in out)
    return out


def token_roles(
    tokenizer,
    instruction: str,
    roi_words: Sequence[str] | None = None,
    max_length: int | None = None,
) -> TokenRoles:
    """Tokenize ``instruction`` and assign content / keep roles to its positions (rules: module docstring).

    Args:
        tokenizer: a ``transformers.CLIPTokenizer`` (any tokenizer with BOS and EOS ids works).
        instruction: the edit instruction; must be a non-blank str.
        roi_words: optional override of the content words. Each entry is split into words like the
            instruction ("Van Gogh" -> "van", "gogh"); content becomes every position whose word equals
            one of them (case-insensitive). ``keep`` is unaffected. None or an empty sequence: automatic.
        max_length: padded length the text encoder sees; default ``tokenizer.model_max_length`` (77).

    Returns:
        ``TokenRoles``; ``keep`` has ``max_length`` entries, ``input_ids`` n + 2 <= ``max_length``.

    Raises:
        TypeError: ``instruction`` is not a str.
        ValueError: blank instruction, a blank roi entry, or an roi word that is not in the instruction.
    """
    max_length, bos, eos = _checked(tokenizer, instruction, max_length)
    body = list(tokenizer(instruction, add_special_tokens=False, verbose=False)["input_ids"])
    body_words, body_word_of = _group_words(tokenizer, body)
    room = max_length - 2
    truncated = len(body) > room
    if truncated:
        warnings.warn(
            f"Instruction {instruction!r} has {len(body)} tokens but the text encoder reads at most {room}; "
            f"the last {len(body) - room} tokens were dropped.",
            LimeWarning,
            stacklevel=2,
        )
        body, body_word_of = body[:room], body_word_of[:room]
    n = len(body)

    input_ids = [bos] + body + [eos]
    tokens = [t.removesuffix(_END_OF_WORD) for t in tokenizer.convert_ids_to_tokens(input_ids)]
    words = [""] + [body_words[w] for w in body_word_of] + [""]
    positions_of: dict[int, list[int]] = {}  # word index -> its positions in input_ids
    for pos, w in enumerate(body_word_of, start=1):
        positions_of.setdefault(w, []).append(pos)
    word_ids = list(positions_of)  # kept words, in order
    stop = {w: is_stop_word(body_words[w]) for w in word_ids}

    keep = [False] * max_length
    for pos in range(1, n + 2):  # tokens and EOS, except the stop words' positions
        keep[pos] = True
    for w in word_ids:
        if stop[w]:
            for pos in positions_of[w]:
                keep[pos] = False

    if roi_words is not None and len(roi_words) > 0:
        chosen, fallback = _roi_word_ids(tokenizer, roi_words, body_words, word_ids, instruction, truncated), None
    else:
        chosen, fallback = _content_word_ids(body_words, word_ids, stop, instruction)
    return TokenRoles(
        instruction=instruction,
        input_ids=input_ids,
        tokens=tokens,
        words=words,
        content=sorted(pos for w in chosen for pos in positions_of[w]),
        keep=keep,
        content_words=list(dict.fromkeys(body_words[w] for w in chosen)),
        fallback=fallback,
        truncated=truncated,
    )


def _checked(tokenizer, instruction, max_length) -> tuple[int, int, int]:
    """(max_length, BOS id, EOS id), after checking the instruction and the tokenizer."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}: {instruction!r}")
    if not instruction.strip():
        raise ValueError(f"instruction is empty or whitespace only ({instruction!r}); describe the edit in words.")
    max_length = int(max_length if max_length is not None else tokenizer.model_max_length)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (BOS and EOS), got {max_length}.")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no BOS or EOS token id; LIME needs a CLIP tokenizer.")
    return max_length, bos, eos


def _roi_word_ids(tokenizer, roi_words, body_words, word_ids, instruction, truncated) -> list[int]:
    """The words the user named (``roi_words``); ValueError listing the instruction's words for one it lacks."""
    wanted = _roi_word_list(tokenizer, roi_words)
    present = {body_words[w] for w in word_ids}
    for r in wanted:
        if r not in present:
            listed = ", ".join(dict.fromkeys(body_words[w] for w in word_ids))
            note = " (the instruction was truncated; later words are not available)" if truncated else ""
            raise ValueError(f"roi word {r!r} is not in the instruction {instruction!r}{note}; its words are: {listed}")
    return [w for w in word_ids if body_words[w] in wanted]


def _content_word_ids(body_words, word_ids, stop, instruction) -> tuple[list[int], str | None]:
    """The automatic content words (not stop words, punctuation or verbs) and the fallback used, if any:
    "non_stop_words" (verbs included) when there are none, "whole_image" when there are none of those."""
    prev = _context_words(body_words)
    punct = {w: is_punctuation(body_words[w]) for w in word_ids}
    verb = {w: is_verb(body_words[w], prev[w]) for w in word_ids}
    chosen = [w for w in word_ids if not (stop[w] or punct[w] or verb[w])]
    if chosen:
        return chosen, None
    chosen = [w for w in word_ids if not (stop[w] or punct[w])]
    warnings.warn(
        f"Instruction {instruction!r} has no content word (only stop words, punctuation and verbs); "
        "falling back to its non-stop, non-punctuation words (verbs included)"
        + (f": {[body_words[w] for w in chosen]}." if chosen else "; there are none."),
        LimeWarning,
        stacklevel=3,
    )
    if chosen:
        return chosen, "non_stop_words"
    warnings.warn(
        f"Instruction {instruction!r} has no non-stop word either; falling back to the whole image "
        "as the region of interest.",
        LimeWarning,
        stacklevel=3,
    )
    return chosen, "whole_image"


def keep_mask(roles_list: Sequence[TokenRoles]) -> torch.Tensor:
    """Stack the ``keep`` lists of a batch: bool tensor [B, max_length] (True = attend, False = silence)."""
    if len(roles_list) == 0:
        raise ValueError("keep_mask needs at least one TokenRoles.")
    lengths = {len(r.keep) for r in roles_list}
    if len(lengths) != 1:
        raise ValueError(f"keep_mask: TokenRoles of different max_length {sorted(lengths)} cannot be stacked.")
    return torch.tensor([r.keep for r in roles_list], dtype=torch.bool)
