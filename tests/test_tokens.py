"""Tests of lime_fast.tokens: content / keep roles of instruction tokens (offline, real CLIP tokenizer)."""

import warnings

import pytest
import torch

from lime_fast.errors import LimeWarning
from lime_fast.tokens import (
    ALWAYS_VERBS,
    AMBIGUOUS_VERBS,
    STOP_WORDS,
    TokenRoles,
    is_punctuation,
    is_stop_word,
    is_verb,
    keep_mask,
    token_roles,
)


def roles_quiet(tok, text, **kw) -> TokenRoles:
    """token_roles, failing the test if it warns."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LimeWarning)
        return token_roles(tok, text, **kw)


def hf_ids(tok, text, max_length=77):
    return tok(text, padding="max_length", max_length=max_length, truncation=True).input_ids


# (instruction, expected content words in order). Verbs, stop words and punctuation never appear.
CASES = [
    ("make her outfit black", ["outfit", "black"]),
    ("turn the sky into a sunset", ["sky", "sunset"]),
    ("add a hat to the dog", ["hat", "dog"]),
    ("remove the car from the street", ["car", "street"]),
    ("paint the wall red", ["wall", "red"]),
    ("change the color of the car to blue", ["color", "car", "blue"]),
    ("what if the man had a beard?", ["man", "beard"]),
    ("let's see it in winter", ["winter"]),
    ("have her wear sunglasses", ["sunglasses"]),
    ("replace the cat with a tiger", ["cat", "tiger"]),
    # NLTK's stop-word list (the release's) has no "like"/"would": its tagger tags them IN / MD, not VB,
    # so the release keeps them as content words; lime_fast does the same.
    ("make it look like a Van Gogh painting", ["like", "van", "gogh", "painting"]),
    ("put a crown on his head", ["crown", "head"]),
    ("give him a red tie", ["red", "tie"]),
    ("the bird should be yellow", ["bird", "yellow"]),
    ("it's now snowing", ["snowing"]),
    ("make it a watercolor", ["watercolor"]),
    ("dress her in a red gown", ["red", "gown"]),
    ("add paint to the wall", ["paint", "wall"]),
    ("have the man hold an umbrella", ["man", "umbrella"]),
    ("change the weather to snow", ["weather", "snow"]),
    ("make the building taller", ["building", "taller"]),
    ("turn the lights off", ["lights"]),
    ("light the candles", ["candles"]),
    ("cover the table with a white cloth", ["table", "white", "cloth"]),
    ("fill the glass with orange juice", ["glass", "orange", "juice"]),
    ("add a fire in the fireplace", ["fire", "fireplace"]),
    ("set the scene at night", ["scene", "night"]),
    ("swap the apples for oranges", ["apples", "oranges"]),
    ("it should be nighttime", ["nighttime"]),
    ("what would it look like in the desert?", ["would", "like", "desert"]),
    ("can you color the car green", ["car", "green"]),
    ("color the car green and paint the door white", ["car", "green", "door", "white"]),
    ("erase the text on the sign", ["text", "sign"]),
    ("zoom in on the face", ["face"]),
    ("place a vase of flowers on the table", ["vase", "flowers", "table"]),
    ("turn him into a robot", ["robot"]),
    ("convert the photo to a pencil sketch", ["photo", "pencil", "sketch"]),
    ("sketch a cat on the wall", ["cat", "wall"]),
    ("Make the sky PURPLE!", ["sky", "purple"]),
    ("don't change the dog, just make the grass greener", ["dog", "grass", "greener"]),
    ("Paint the fence white; then add a mailbox", ["fence", "white", "mailbox"]),
    ("the man's jacket should be denim", ["man", "jacket", "denim"]),
    ("make her dress red", ["dress", "red"]),
    ("let\u2019s paint the house blue", ["house", "blue"]),
    ("what if it was raining?", ["raining"]),
    ("have the dog wear a raincoat", ["dog", "raincoat"]),
]


@pytest.mark.parametrize("text, expected", CASES, ids=[c[0] for c in CASES])
def test_content_words(clip_tok, text, expected):
    r = roles_quiet(clip_tok, text)
    assert r.content_words == expected
    assert r.fallback is None and not r.truncated
    # content positions are exactly the positions whose word is a content word
    assert r.content == [i for i, w in enumerate(r.words) if w in expected and 0 < i < len(r.input_ids) - 1]
    for pos in r.content:
        assert r.keep[pos]


@pytest.mark.parametrize(
    "text",
    [
        "don't make her outfit black, please!",
        "what if the man had a beard?",
        "let's see it in winter",
        "make it look like a Van Gogh painting",
        "put a xylophonist on the stage",
    ],
)
def test_keep_mask_and_alignment(clip_tok, text):
    r = roles_quiet(clip_tok, text)
    padded = hf_ids(clip_tok, text)
    n2 = len(r.input_ids)
    assert len(r.keep) == 77
    assert padded[:n2] == r.input_ids
    assert all(i == clip_tok.pad_token_id for i in padded[n2:])
    assert len(r.tokens) == len(r.words) == n2
    assert r.tokens[1:-1] == [t.removesuffix("</w>") for t in clip_tok.convert_ids_to_tokens(r.input_ids[1:-1])]
    assert r.words[0] == r.words[-1] == ""
    assert r.keep[0] is False  # BOS
    assert r.keep[n2 - 1] is True  # EOS
    assert not any(r.keep[n2:])  # padding after EOS
    for pos in range(1, n2 - 1):
        word = r.words[pos]
        assert r.keep[pos] == (not is_stop_word(word)), (pos, word)
    assert 0 not in r.content and n2 - 1 not in r.content


def test_keep_mask_details(clip_tok):
    r = roles_quiet(clip_tok, "don't make her outfit black, please!")
    by_word = dict(zip(r.words[1:-1], r.keep[1:-1]))
    assert by_word == {
        "don": False, "'t": False, "make": True, "her": False, "outfit": True,
        "black": True, ",": True, "please": True, "!": True,  # not in NLTK's stop words: kept
    }


def test_keep_mask_batch(clip_tok):
    rs = [roles_quiet(clip_tok, "paint the wall red"), roles_quiet(clip_tok, "add a hat to the dog")]
    m = keep_mask(rs)
    assert m.shape == (2, 77) and m.dtype == torch.bool
    assert m[0].tolist() == rs[0].keep and m[1].tolist() == rs[1].keep
    assert m[:, 0].sum() == 0
    with pytest.raises(ValueError):
        keep_mask([])


def test_ambiguous_verb_rule(clip_tok):
    assert "paint" in AMBIGUOUS_VERBS and "make" in ALWAYS_VERBS
    assert is_verb("paint", None) and is_verb("Paint", "") and is_verb("paint", "and")
    assert is_verb("paint", ",") and is_verb("paint", "let's") and is_verb("paint", "let\u2019s")
    assert not is_verb("paint", "add") and not is_verb("paint", "the") and not is_verb("paint", "to")
    assert is_verb("make", "the") and is_verb("made", "cake")  # always verbs
    assert not is_verb("dog", None) and not is_verb("the", None)
    assert roles_quiet(clip_tok, "paint the wall red").content_words == ["wall", "red"]
    assert roles_quiet(clip_tok, "add paint to the wall").content_words == ["paint", "wall"]
    assert roles_quiet(clip_tok, "please light the candles").content_words == ["candles"]
    assert roles_quiet(clip_tok, "add a light to the ceiling").content_words == ["light", "ceiling"]


def test_multi_token_word(clip_tok):
    r = roles_quiet(clip_tok, "put a xylophonist on the stage")
    pos = [i for i, w in enumerate(r.words) if w == "xylophonist"]
    assert len(pos) >= 2
    assert set(pos) <= set(r.content)
    assert r.content_words == ["xylophonist", "stage"]


def test_fallback_non_stop_words(clip_tok):
    with pytest.warns(LimeWarning, match="non-stop") as rec:
        r = token_roles(clip_tok, "make it so")
    assert "make it so" in str(rec[0].message)
    assert r.fallback == "non_stop_words"
    assert r.content_words == ["make"] and r.content == [1]


def test_fallback_whole_image(clip_tok):
    with pytest.warns(LimeWarning) as rec:
        r = token_roles(clip_tok, "it is.")
    assert any("whole image" in str(w.message) for w in rec)
    assert r.fallback == "whole_image" and r.content == [] and r.content_words == []
    assert r.keep[:5] == [False, False, False, True, True]  # BOS it is . EOS
    # "do" is an auxiliary, hence a stop word: "do it" has nothing left either
    with pytest.warns(LimeWarning):
        assert token_roles(clip_tok, "do it").fallback == "whole_image"


def test_roi_words_override(clip_tok):
    text = "make it look like a Van Gogh painting"
    auto = roles_quiet(clip_tok, text)
    r = roles_quiet(clip_tok, text, roi_words=["Van Gogh"])
    assert r.content_words == ["van", "gogh"] and r.content == [6, 7]
    assert r.keep == auto.keep and r.fallback is None
    assert roles_quiet(clip_tok, text, roi_words="painting").content_words == ["painting"]
    # roi words may even name a verb or a word that the rule drops
    assert roles_quiet(clip_tok, "paint the wall red", roi_words=["PAINT", "wall"]).content == [1, 3]
    # no warning when an override rescues a content-less instruction
    assert roles_quiet(clip_tok, "make it so", roi_words=["make"]).content == [1]
    with pytest.raises(ValueError, match=r"'cat'.*van, gogh, painting"):
        token_roles(clip_tok, text, roi_words=["painting", "cat"])
    with pytest.raises(ValueError, match="blank"):
        token_roles(clip_tok, text, roi_words=["  "])
    assert roles_quiet(clip_tok, text, roi_words=[]).content == auto.content


def test_truncation(clip_tok):
    text = "a red cat sits on a blue mat " * 12  # 96 tokens
    with pytest.warns(LimeWarning, match="21 tokens"):
        r = token_roles(clip_tok, text)
    assert r.truncated
    assert len(r.input_ids) == 77 and r.input_ids[-1] == clip_tok.eos_token_id
    assert r.input_ids == hf_ids(clip_tok, text)
    assert r.keep[76] is True and r.keep[0] is False  # EOS sits at the last position
    assert max(r.content) <= 75
    short = roles_quiet(clip_tok, "a red cat", max_length=77)
    assert not short.truncated
    with pytest.warns(LimeWarning, match="dropped"):
        r16 = token_roles(clip_tok, text, max_length=16)
    assert r16.input_ids == hf_ids(clip_tok, text, max_length=16) and len(r16.keep) == 16


def test_bad_instructions(clip_tok):
    with pytest.raises(TypeError, match="str"):
        token_roles(clip_tok, None)
    with pytest.raises(TypeError):
        token_roles(clip_tok, b"make it red")
    with pytest.raises(ValueError, match="empty"):
        token_roles(clip_tok, "")
    with pytest.raises(ValueError, match="empty"):
        token_roles(clip_tok, " \t\n")


def test_word_helpers():
    assert is_stop_word("The") and is_stop_word("'s") and is_stop_word("don") and is_stop_word("'t")
    assert not is_stop_word("dog")
    assert is_punctuation(",") and is_punctuation("?!") and is_punctuation("\u2019") and is_punctuation("%")
    assert not is_punctuation("") and not is_punctuation("a") and not is_punctuation("5")
    assert not is_punctuation("\U0001f436")  # emoji is content


def test_lexicons():
    assert 150 <= len(STOP_WORDS) <= 200
    assert not (STOP_WORDS & (ALWAYS_VERBS | AMBIGUOUS_VERBS))
    assert not (ALWAYS_VERBS & AMBIGUOUS_VERBS)
    for w in STOP_WORDS | ALWAYS_VERBS | AMBIGUOUS_VERBS:
        assert w == w.lower().strip() and " " not in w
    for w in ["make", "makes", "made", "making", "turn", "remove", "replace", "put", "give", "let", "convert"]:
        assert w in ALWAYS_VERBS
    for w in ["paint", "color", "colour", "dress", "light", "cover", "fill", "frame", "water", "snow", "rain", "fire", "shift"]:
        assert w in AMBIGUOUS_VERBS


class _WhitespaceTokenizer:
    """A tokenizer without '</w>' markers: every token must count as its own word."""

    model_max_length = 8
    bos_token_id, eos_token_id = 0, 1

    def __init__(self):
        self.vocab = {"<s>": 0, "</s>": 1}

    def __call__(self, text, add_special_tokens=True, verbose=True):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.lower().split()]
        return {"input_ids": ([0] + ids + [1]) if add_special_tokens else ids}

    def convert_ids_to_tokens(self, ids):
        inv = {i: w for w, i in self.vocab.items()}
        return [inv[i] for i in ids]

    def convert_tokens_to_string(self, toks):
        return " ".join(toks)


def test_tokenizer_without_word_markers():
    r = roles_quiet(_WhitespaceTokenizer(), "paint the old wall red")
    assert r.words == ["", "paint", "the", "old", "wall", "red", ""]
    assert r.content_words == ["old", "wall", "red"] and r.content == [3, 4, 5]
    assert len(r.keep) == 8 and r.keep == [False, True, False, True, True, True, True, False]


def test_stop_words_are_nltks_english_list(clip_tok):
    """The release silences NLTK's English stop words (179 words); lime_fast ships exactly that list.
    Spatial words and modals that an extended list would add stay visible inside the RoI."""
    from lime_fast.tokens import STOP_WORDS

    assert len(STOP_WORDS) == 179
    assert {"i", "the", "of", "ain", "ma", "mightn", "mightn't", "should've", "that'll", "y"} <= STOP_WORDS
    extended_only = {"near", "behind", "inside", "outside", "like", "across", "would", "could", "please", "us", "mine"}
    assert not extended_only & STOP_WORDS
    r = roles_quiet(clip_tok, "put the cat near the door")
    by_word = dict(zip(r.words[1:-1], r.keep[1:-1]))
    assert by_word["near"] and not by_word["the"]
