"""SD text conditioning: token ids equal the references'.

SD 1.x equals ``transformers.CLIPTokenizer`` (rebuilt offline from open_clip's BPE file),
SD 2.x equals ``open_clip.tokenize``.
"""

from __future__ import annotations

import gzip
import json

import ftfy
import open_clip
import pytest
import torch
from open_clip.tokenizer import bytes_to_unicode, default_bpe

from model.encoders.tokenizer import ClipTokenizer, bpe_tables

transformers = pytest.importorskip("transformers")

# Prompts on which ftfy changes nothing beyond NFC.
PROMPTS = [
    "",
    "a photograph of an astronaut riding a horse",
    "A   Photo,  of\tTHE\nsea!!! ...?  ",
    "(red:1.2) [blue] {green} <lora:x:0.5>, (((masterpiece))), [cat|dog] AND",
    "café naïve Straße 東京タワー 😀🚀 Ωmega e\u0301 Привет",
    "it's they're we've I'm you'll he'd IT'S",
    "1024x768, 3.14159, 2024-01-01, 10000000, ½, #1",
    "a " * 75,  # exactly the 75 tokens that fit
    "a " * 76,  # one too many
    " ".join(f"word{i}" for i in range(60)),  # far too long
    "a<|endoftext|>b <|startoftext|> c",
    "<start_of_text> hi <end_of_text>",
]
# Prompts ftfy repairs: curly quotes, full width, ligatures, mojibake, entities, controls.
FTFY_PROMPTS = [
    "“quoted” ’s ｆｕｌｌｗｉｄｔｈ ﬁne cafÃ©",
    "&amp; &amp;amp; &lt;b&gt; tom &amp; jerry",
    "x\x1cy\u200bz \u00a0nbsp\x07",
]


# ---------------------------------------------------------------- tokenizer references


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """SD 1.x's tokenizer, from vocab.json / merges.txt rebuilt from open_clip's BPE list."""
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(
        str(folder), pad_token="<|endoftext|>", model_max_length=77
    )


def hf_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids exactly as ``FrozenCLIPEmbedder.forward`` asks for them."""
    return tokenizer(
        prompts, truncation=True, max_length=77, padding="max_length", return_tensors="pt"
    )["input_ids"]


def test_vocabulary_is_open_clips(hf_tokenizer):
    vocab, ranks = bpe_tables()
    assert len(vocab) == 49408 and len(ranks) == 48894
    assert vocab == hf_tokenizer.get_vocab()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    reference = open_clip.SimpleTokenizer().encoder
    assert vocab == {names.get(k, k): v for k, v in reference.items()}


def test_sd1_token_ids_equal_transformers(hf_tokenizer):
    """ftfy-neutral prompts: SD 1.x as released equals today's CLIPTokenizer."""
    torch.testing.assert_close(ClipTokenizer("sd1")(PROMPTS), hf_ids(hf_tokenizer, PROMPTS))


def test_sd1_cleaning_variants_equal_transformers(hf_tokenizer):
    """fix_text=False is transformers >= 5 (NFC); True is the ftfy-cleaning tokenizer SD 1.x
    shipped with (transformers 4.x's Python CLIPTokenizer), i.e. CLIPTokenizer on ftfy's text."""
    prompts = PROMPTS + FTFY_PROMPTS + ["<|ENDOFTEXT|> lit"]
    nfc = ClipTokenizer("sd1", fix_text=False)(prompts)
    torch.testing.assert_close(nfc, hf_ids(hf_tokenizer, prompts))
    prompts = prompts[:-1]
    ftfy_ids = ClipTokenizer("sd1")(prompts)
    torch.testing.assert_close(ftfy_ids, hf_ids(hf_tokenizer, [ftfy.fix_text(p) for p in prompts]))
    assert not torch.equal(ftfy_ids, hf_ids(hf_tokenizer, prompts))  # the prompts do differ
    # The Python tokenizer maps a literal that lower-casing made special (its bpe cache).
    lowered = hf_ids(hf_tokenizer, ["<|endoftext|> lit"])
    torch.testing.assert_close(ClipTokenizer("sd1")("<|ENDOFTEXT|> lit"), lowered)


def test_sd2_token_ids_equal_open_clip():
    prompts = PROMPTS + FTFY_PROMPTS + ["<|ENDOFTEXT|> lit"]
    torch.testing.assert_close(ClipTokenizer("sd2")(prompts), open_clip.tokenize(prompts))


def test_padding_and_truncation():
    sd1, sd2 = ClipTokenizer("sd1"), ClipTokenizer("sd2")
    a, b = sd1(["", "a " * 75, "a " * 76]), sd2("")
    assert a.shape == (3, 77) and a.dtype == torch.int64 and b.shape == (1, 77)
    assert a[0].tolist() == [49406] + [49407] * 76  # SD 1.x pads with the end token
    assert b[0].tolist() == [49406, 49407] + [0] * 75  # SD 2.x with zeros
    assert a[1].tolist() == [49406] + [320] * 75 + [49407]
    torch.testing.assert_close(a[2], a[1])  # cut to 75 tokens, the end token kept
    with pytest.raises(ValueError, match="always applies ftfy"):
        ClipTokenizer("sd2", fix_text=False)
