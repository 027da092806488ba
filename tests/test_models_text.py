"""Text conditioning: CLIP's text transformer (diffusion_jax.models.text) against transformers'
CLIPTextModel with perturbed random weights (two configurations: quick-GELU with end-token
pooling, exact GELU with the legacy argmax pooling; with and without a padding mask), the
weight loader's checks, CLIP's BPE tokenizer (diffusion_jax.models.tokenizer) against the
reference tokenizer's ids, and the closed-vocabulary tokenizer and encoder.

Fixtures: tests/fixtures/latent_parity, written by scripts/make_latent_fixtures.py."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _clip import needs_vocabulary

from diffusion_jax.models.convert import ConversionError
from diffusion_jax.models.text import (
    CLIP_TEXT_PRESETS,
    TextTransformer,
    clip_text_kwargs_from_config,
    clip_text_state_dict_shapes,
    load_clip_text,
    tiny_text_encoder,
)
from diffusion_jax.models.tokenizer import CLIPTokenizer, TokenizerError, WordTokenizer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "latent_parity"
TOLERANCE = 1e-4  # max |ours - reference| / max |reference| in float32 (measured: about 5e-7)
FAST = {"xla_backend_optimization_level": 0}
VARIANTS = ["clip_eos", "clip_legacy"]


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=VARIANTS)
def clip(request):
    name = request.param
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    module = TextTransformer(**clip_text_kwargs_from_config(meta["config"]))
    params = load_clip_text(module, FIXTURES / f"{name}_state_dict.safetensors")
    io = dict(np.load(FIXTURES / f"{name}_io.npz"))
    fn = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, attention_mask=mask))
    compiled = fn.lower(params, io["input_ids"], io["attention_mask"]).compile(compiler_options=FAST)
    return dict(name=name, module=module, params=params, io=io, meta=meta, apply=compiled)


def test_clip_text_matches_transformers(clip):
    io = clip["io"]
    expected_pooling = "argmax" if clip["name"] == "clip_legacy" else "eos"
    assert clip["module"].pooling == expected_pooling
    out = clip["apply"](clip["params"], io["input_ids"], np.ones_like(io["attention_mask"]))
    assert rel_err(out.last_hidden_state, io["last_hidden_state"]) < TOLERANCE
    assert rel_err(out.pooled_output, io["pooler_output"]) < TOLERANCE
    masked = clip["apply"](clip["params"], io["input_ids"], io["attention_mask"])
    assert rel_err(masked.last_hidden_state, io["masked_last_hidden_state"]) < TOLERANCE
    assert rel_err(masked.pooled_output, io["masked_pooler_output"]) < TOLERANCE


def test_clip_loader_checks_names_and_shapes():
    from diffusion_jax.models.autoencoder import read_state_dict

    meta = json.loads((FIXTURES / "clip_eos.json").read_text())
    module = TextTransformer(**clip_text_kwargs_from_config(meta["config"]))
    state = read_state_dict(FIXTURES / "clip_eos_state_dict.safetensors")
    assert {k: list(v.shape) for k, v in state.items()} == meta["state_dict_shapes"]
    params = load_clip_text(module, state)
    # transformers' 'text_model.' prefix and the position_ids buffer of older checkpoints load too.
    prefixed = {"text_model." + k: v for k, v in state.items()}
    prefixed["text_model.embeddings.position_ids"] = np.arange(77)[None]
    jax.tree.map(np.testing.assert_array_equal, load_clip_text(module, prefixed), params)

    missing = {k: v for k, v in state.items() if k != "encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(ConversionError, match=r"'encoder\.layers\.1\.mlp\.fc2\.bias' is missing"):
        load_clip_text(module, missing)
    extra = dict(state, text_projection=np.zeros((32, 32), np.float32))
    with pytest.raises(ConversionError, match=r"unexpected tensor 'text_projection'"):
        load_clip_text(module, extra)
    bad = dict(state, **{"embeddings.token_embedding.weight": np.zeros((49408, 32), np.float32)})
    with pytest.raises(ConversionError, match=r"'embeddings\.token_embedding\.weight' has shape \(49408, 32\)"):
        load_clip_text(module, bad)


def test_clip_preset_size():
    # CLIP ViT-L/14's text transformer (Stable Diffusion 1.x): 123,060,480 parameters, as
    # transformers' CLIPTextModel with the same config has; 196 tensors.
    shapes = clip_text_state_dict_shapes(TextTransformer(**CLIP_TEXT_PRESETS["clip-vit-large-patch14"]))
    assert sum(int(np.prod(s)) for _, s in shapes.values()) == 123_060_480
    assert len(shapes) == 196


def test_text_transformer_rejects_bad_config_and_inputs():
    with pytest.raises(ValueError, match="activation 'relu'.*pooling 'cls'"):
        TextTransformer(activation="relu", pooling="cls")
    module = TextTransformer(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="L <= 77"):
        jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 78), jnp.int32)))


# --------------------------------------------------------------------------------------------
# CLIP's tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_tokenizer():
    return CLIPTokenizer.from_package(pad_token_id=0)


@needs_vocabulary
def test_clip_tokenizer_matches_reference_ids(clip_tokenizer):
    meta = json.loads((FIXTURES / "tokenizer.json").read_text())
    ref = np.load(FIXTURES / "tokenizer_ids.npz")
    ids = clip_tokenizer(meta["prompts"])
    assert ids.dtype == np.int32 and ids.shape == (len(meta["prompts"]), 77)
    # ftfy's text repair is part of CLIP's cleaning; without ftfy installed, only prompts that
    # ftfy leaves unchanged are comparable (one prompt has curly quotes that ftfy straightens).
    has_ftfy = importlib.util.find_spec("ftfy") is not None
    rows = [i for i, same in enumerate(meta["ftfy_unchanged"]) if same or has_ftfy]
    assert len(rows) >= len(meta["prompts"]) - 1
    for i in rows:
        np.testing.assert_array_equal(ids[i], ref["open_clip"][i], err_msg=repr(meta["prompts"][i]))
    # Padding with the end token (Stable Diffusion 1.x, transformers) where transformers' tokenizer
    # (no ftfy or HTML unescaping) agrees with the original.
    padded_eot = CLIPTokenizer.from_package()(meta["prompts"])
    for i, agree in enumerate(meta["transformers_agrees_with_open_clip"]):
        if agree and i in rows:
            np.testing.assert_array_equal(padded_eot[i], ref["transformers"][i], err_msg=repr(meta["prompts"][i]))


@needs_vocabulary
def test_clip_tokenizer_truncation_and_decode(clip_tokenizer):
    long = "a " * 100
    assert clip_tokenizer(long)[0, -1] == clip_tokenizer.eot_token_id
    with pytest.raises(
        TokenizerError, match="102 tokens with the start and end tokens, more than the context length 77"
    ):
        clip_tokenizer(long, truncate=False)
    assert clip_tokenizer.vocab_size == 49408
    # Decoding puts a space after every word end (CLIP's </w>), so punctuation comes back spaced.
    text = "a photograph of an astronaut riding a horse, café 日本"
    assert clip_tokenizer.decode(clip_tokenizer(text)[0]) == "a photograph of an astronaut riding a horse , café 日本"


# --------------------------------------------------------------------------------------------
# Closed vocabulary
# --------------------------------------------------------------------------------------------

CAPTIONS = ["a handwritten digit 3", "a handwritten digit 7.", "the digit 0, thin"]


def test_word_tokenizer_encodes_and_refuses():
    tok = WordTokenizer.from_captions(CAPTIONS)
    assert tok.vocabulary == sorted({",", ".", "0", "3", "7", "a", "digit", "handwritten", "the", "thin"})
    assert tok.max_length == 7  # the longest caption (5 tokens) + <bos> + <eos>
    ids = tok(["A handwritten DIGIT 7.", "digit 0"])
    v = {w: i + 3 for i, w in enumerate(tok.vocabulary)}
    np.testing.assert_array_equal(ids[1], [1, v["digit"], v["0"], 2, 0, 0, 0])
    assert tok.decode(ids[0]) == "a handwritten digit 7 ."
    with pytest.raises(
        TokenizerError, match=r"unknown word 'zebra' in prompt 'a zebra'; this tokenizer knows only the 10"
    ):
        tok("a zebra")
    with pytest.raises(TokenizerError, match=r"has 6 words; at most 5 fit \(max_length=7"):
        tok("a handwritten digit 3 , thin")
    chars = WordTokenizer.from_captions(CAPTIONS, level="char", max_length=30)
    assert chars.decode(chars("digit 7")[0]) == "digit 7"
    with pytest.raises(TokenizerError, match="unknown char 'z'"):
        chars("z")
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    np.testing.assert_array_equal(again(CAPTIONS), tok(CAPTIONS))


def test_tiny_encoder_ignores_padding():
    tok = WordTokenizer.from_captions(CAPTIONS, max_length=8)
    wide = WordTokenizer(tok.vocabulary, max_length=12)
    module = tiny_text_encoder(wide.vocab_size, wide.max_length, eos_token_id=tok.eos_id, hidden_size=16, num_heads=2)
    ids_short, ids_long = tok(CAPTIONS), wide(CAPTIONS)

    def outputs(ids_short, ids_long):
        params = module.init(jax.random.PRNGKey(0), ids_long)["params"]
        short = module.apply({"params": params}, ids_short, attention_mask=ids_short != tok.pad_id)
        long = module.apply({"params": params}, ids_long, attention_mask=ids_long != tok.pad_id)
        return short, long, module.apply({"params": params}, ids_long)

    short, long, unmasked = (
        jax.jit(outputs).lower(ids_short, ids_long).compile(compiler_options=FAST)(ids_short, ids_long)
    )
    # Bidirectional attention with the padding mask: extra padding changes nothing.
    np.testing.assert_allclose(short.pooled_output, long.pooled_output, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(short.last_hidden_state[:, :5], long.last_hidden_state[:, :5], rtol=1e-5, atol=1e-6)
    # Without the mask the padding leaks in: the check above is not vacuous.
    assert np.max(np.abs(unmasked.pooled_output - long.pooled_output)) > 1e-3
    assert short.pooled_output.shape == (3, 16)
