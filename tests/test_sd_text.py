"""SD text conditioning: token ids and hidden states equal the references', by key.

Tokens: SD 1.x equals ``transformers.CLIPTokenizer`` (rebuilt offline from open_clip's BPE
file), SD 2.x equals ``open_clip.tokenize``. Encoders: tiny models in the real key layouts,
every tensor randomised, written as SD checkpoints, load strictly and equal the original
``ldm`` embedders (``FrozenCLIPEmbedder`` on ``transformers.CLIPTextModel``,
``FrozenOpenCLIPEmbedder`` on an open_clip model) and diffusers' SD 2 conversion.
"""

from __future__ import annotations

import gzip
import json
import logging

import ftfy
import ldm.modules.encoders.modules as ldm_encoders
import open_clip
import pytest
import torch
import transformers
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from safetensors.torch import save_file
from torch import nn

from model.encoders.text import (
    SD1_CONFIG,
    SD2_CONFIG,
    SD2_PREFIX,
    TextConfig,
    build_text_encoder,
    config_from_state,
    load_text_encoder,
)
from model.encoders.tokenizer import ClipTokenizer, bpe_tables
from model.weights.checkpoint import CheckpointError
from tests.sd_layout import randomise

SD1_PREFIX = "cond_stage_model.transformer.text_model."
TOL = {"rtol": 1e-5, "atol": 1e-5}
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
SD1_TINY = TextConfig(width=64, layers=3, heads=4, mlp_width=96)


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


# ---------------------------------------------------------------- SD 1.x encoder


def hf_config(width: int, layers: int, heads: int, mlp_width: int, act: str):
    """A ``transformers`` CLIP text config with CLIP's vocabulary and context."""
    return transformers.CLIPTextConfig(
        hidden_size=width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp_width,
        hidden_act=act,
        vocab_size=49408,
        max_position_embeddings=77,
    )


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny CLIPTextModel with random weights, and an SD 1.x file holding them."""
    model = transformers.CLIPTextModel(hf_config(64, 3, 4, 96, "quick_gelu")).eval()
    state = randomise(model.state_dict(), 1)
    model.load_state_dict(state, strict=True)
    file = {SD1_PREFIX + k: v for k, v in state.items()}
    file[SD1_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]  # as v1-5 carries
    file["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other SD parts stay apart
    path = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    save_file(file, str(path))
    return path, model, state


def ldm_clip_embedder(tokenizer, transformer, layer: str = "last", layer_idx: int | None = None):
    """``ldm``'s own FrozenCLIPEmbedder around given parts (its __init__ would download)."""
    cls = ldm_encoders.FrozenCLIPEmbedder
    ref = cls.__new__(cls)
    nn.Module.__init__(ref)
    ref.tokenizer, ref.transformer, ref.device, ref.max_length = tokenizer, transformer, "cpu", 77
    ref.layer, ref.layer_idx = layer, layer_idx
    return ref


@torch.no_grad()
def test_sd1_equals_ldm_frozen_clip_embedder(sd1, hf_tokenizer):
    path, model, _ = sd1
    ours = load_text_encoder(path, "sd1", heads=4)
    assert ours.config == SD1_TINY and not any(p.requires_grad for p in ours.parameters())
    expected = ldm_clip_embedder(hf_tokenizer, model).encode(PROMPTS)
    got = ours.encode(PROMPTS)
    assert got.shape == (len(PROMPTS), 77, 64) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **TOL)
    # SD's unconditional context is the empty prompt's, batch-independent, not zeros
    uncond = ours.encode([""])
    torch.testing.assert_close(uncond[0], expected[0], **TOL)
    assert uncond.abs().mean() > 0.1


@torch.no_grad()
def test_sd1_clip_skip_is_a1111s(sd1):
    path, model, _ = sd1
    ours = load_text_encoder(path, "sd1", heads=4)
    tokens = ours.tokenize(PROMPTS[:4])
    hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states
    for skip in (2, 3):
        ours.clip_skip = skip
        expected = model.final_layer_norm(hidden[-skip])
        torch.testing.assert_close(ours(tokens), expected, **TOL)
    with pytest.raises(ValueError, match="clip_skip"):
        ours.clip_skip = 4
    with pytest.raises(ValueError, match="token ids"):
        ours(torch.full((1, 77), 49408))


def test_sd1_key_variants_load_alike(sd1, tmp_path, caplog):
    """Older prefix without text_model., bare HF files, fp16, odd position_ids."""
    _, model, state = sd1
    reference = load_text_encoder({SD1_PREFIX + k: v for k, v in state.items()}, heads=4)
    ids = torch.arange(77.0)[None]
    ids[0, 5] = 4.9999  # a broken merge's float ids: ignored, and said so
    variants = {
        "old": {"cond_stage_model.transformer." + k: v for k, v in state.items()},
        "bare_hf": {"text_model." + k: v for k, v in state.items()},
        "bare": dict(state) | {"embeddings.position_ids": ids},
    }
    tokens = reference.tokenize(PROMPTS[:3])
    for name, variant in variants.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(variant, str(path))
        with caplog.at_level(logging.WARNING):
            got = load_text_encoder(path, "sd1", heads=4)(tokens)
        torch.testing.assert_close(got, reference(tokens), rtol=0, atol=0)
    assert "position_ids" in caplog.text
    half = load_text_encoder({k: v.half() for k, v in state.items()}, heads=4)
    assert half.final_layer_norm.weight.dtype == torch.float32
    low = load_text_encoder(state, heads=4, dtype=torch.bfloat16).encode(PROMPTS[:2])
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), reference.encode(PROMPTS[:2]), rtol=0, atol=0.1)


def test_strict_loading_names_file_and_keys(sd1, tmp_path):
    _, _, state = sd1
    dropped = "encoder.layers.1.mlp.fc2.bias"
    cases = {
        "missing": ({k: v for k, v in state.items() if k != dropped}, f"1 missing keys: {dropped}"),
        "unexpected": (
            state | {"encoder.layers.0.extra": torch.ones(1)},
            "1 unexpected keys: encoder.layers.0.extra",
        ),
        "misshapen": (
            state | {"final_layer_norm.bias": torch.ones(65)},
            "final_layer_norm.bias (file (65,), model (64,))",
        ),
    }
    for name, (variant, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({SD1_PREFIX + k: v for k, v in variant.items()}, str(path))
        with pytest.raises(CheckpointError) as err:
            load_text_encoder(path, "sd1", heads=4)
        assert str(path) in str(err.value) and message in str(err.value)
    path = tmp_path / "unet_only.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError, match="no sd2 text encoder: lacks token_embedding.weight"):
        load_text_encoder(path, "sd2")
    with pytest.raises(ValueError, match="kind must be"):
        load_text_encoder(state, "sdxl")


# ---------------------------------------------------------------- SD 2.x encoder


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """A tiny open_clip CLIP (GELU) less its visual tower, random, and an SD 2.x file."""
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3}
    vision_cfg = {"image_size": 16, "patch_size": 8, "width": 32, "head_width": 32, "layers": 1}
    model = open_clip.CLIP(embed_dim=48, vision_cfg=vision_cfg, text_cfg=text_cfg)
    del model.visual
    state = randomise(model.state_dict(), 2)
    model.load_state_dict(state, strict=True)
    path = tmp_path_factory.mktemp("sd2") / "sd2.ckpt"
    torch.save({"state_dict": {SD2_PREFIX + k: v for k, v in state.items()}}, path)
    return path, model.eval(), state


def ldm_open_clip_embedder(model: nn.Module, layer: str = "penultimate"):
    """``ldm``'s own FrozenOpenCLIPEmbedder around a given open_clip model.

    SD 2 ran open_clip 2.0.2, whose blocks took (L, N, D); ldm permutes to that layout,
    so the blocks of today's batch-first open_clip are switched back to it.
    """
    for block in model.transformer.resblocks:
        block.attn.batch_first = False
    cls = ldm_encoders.FrozenOpenCLIPEmbedder
    ref = cls.__new__(cls)
    nn.Module.__init__(ref)
    ref.model, ref.device, ref.max_length, ref.layer = model, "cpu", 77, layer
    ref.layer_idx = {"last": 0, "penultimate": 1}[layer]
    return ref


@torch.no_grad()
def test_sd2_equals_ldm_frozen_open_clip_embedder(sd2):
    path, model, _ = sd2
    ours = load_text_encoder(path, "sd2", heads=4)
    assert ours.config.proj_dim == 48 and ours.clip_skip == 2
    prompts = PROMPTS + FTFY_PROMPTS
    expected = ldm_open_clip_embedder(model).encode(prompts)
    got = ours.encode(prompts)
    assert got.shape == (len(prompts), 77, 64)
    torch.testing.assert_close(got, expected, **TOL)
    torch.testing.assert_close(ours.encode([""])[0], expected[0], **TOL)  # the uncond
    ours.clip_skip = 1
    torch.testing.assert_close(
        ours.encode(prompts[:3]), ldm_open_clip_embedder(model, "last").encode(prompts[:3]), **TOL
    )


@torch.no_grad()
def test_sd2_equals_diffusers_conversion(sd2):
    """diffusers' SD 2 text encoder: a CLIPTextModel of layers - 1 GELU layers."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    path, _, state = sd2
    last = "cond_stage_model.model.transformer.resblocks.2."
    full = {SD2_PREFIX + k: v for k, v in state.items() if not (SD2_PREFIX + k).startswith(last)}
    hf = transformers.CLIPTextModel(hf_config(64, 2, 4, 256, "gelu")).eval()
    converted = single_file.convert_open_clip_checkpoint(hf, full)
    hf.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()})
    ours = load_text_encoder(path, "sd2", heads=4)
    tokens = ours.tokenize(PROMPTS[:4])
    torch.testing.assert_close(ours(tokens), hf(input_ids=tokens).last_hidden_state, **TOL)


def test_sd2_bare_open_clip_file_loads(sd2, tmp_path):
    _, _, state = sd2
    path = tmp_path / "open_clip.safetensors"
    save_file(state | {"visual.proj": torch.zeros(32, 48)}, str(path))
    ours, reference = (
        load_text_encoder(path, "sd2", heads=4),
        load_text_encoder(sd2[0], "sd2", heads=4),
    )
    tokens = ours.tokenize(PROMPTS[:2])
    torch.testing.assert_close(ours(tokens), reference(tokens), rtol=0, atol=0)


# ---------------------------------------------------------------- real sizes, by key


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_real_layouts_are_the_references():
    """Full-size SD 1.x / 2.x encoders (on the meta device) have the references' keys."""
    with torch.device("meta"):
        sd1_ours, sd2_ours = build_text_encoder("sd1"), build_text_encoder("sd2")
        hf = transformers.CLIPTextModel(hf_config(768, 12, 12, 3072, "quick_gelu"))
        oc = open_clip.CLIP(**open_clip.get_model_config("ViT-H-14"))
    assert shapes(sd1_ours) == shapes(hf)
    assert shapes(sd2_ours) == {k: v for k, v in shapes(oc).items() if not k.startswith("visual.")}
    assert sum(p.numel() for p in sd1_ours.parameters()) == 123_060_480
    assert sum(p.numel() for p in sd2_ours.parameters()) == 354_032_641
    state = {k: torch.empty(v, device="meta") for k, v in shapes(sd2_ours).items()}
    assert config_from_state(state, "sd2") == SD2_CONFIG
    state = {k: torch.empty(v, device="meta") for k, v in shapes(sd1_ours).items()}
    assert config_from_state(state, "sd1") == SD1_CONFIG
    assert SD1_CONFIG.heads == 768 // 64 and SD2_CONFIG.heads == 1024 // 64
