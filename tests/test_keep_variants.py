"""benchmarks/keep_variants.py: the stricter keep rules silence exactly what they say."""

import keep_variants


def test_rules_on_one_instruction():
    from lime_fast.clip_bpe import clip_tokenizer
    from lime_fast.tokens import keep_mask, token_roles

    roles = [token_roles(clip_tokenizer(), "make the circle blue")]  # BOS make the circle blue EOS pad...
    lime = keep_mask(roles)[0].tolist()
    assert lime[:7] == [False, True, False, True, True, True, False]
    no_eos = keep_variants.keep_rule("no_eos", keep_mask)(roles)[0].tolist()
    assert no_eos[:7] == [False, True, False, True, True, False, False] and no_eos[7:] == lime[7:]
    content = keep_variants.keep_rule("content_only", keep_mask)(roles)[0].tolist()
    assert [i for i, k in enumerate(content) if k] == roles[0].content == [3, 4]
    assert keep_mask(roles)[0].tolist() == lime  # the base rule is left as it was
