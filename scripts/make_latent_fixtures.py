"""Writes tests/fixtures/latent_parity: reference outputs of diffusers' ``AutoencoderKL``,
transformers' ``CLIPTextModel`` and CLIP's tokenizer, for the parity tests of
``diffusion_jax.models.autoencoder``, ``diffusion_jax.models.text`` and
``diffusion_jax.models.tokenizer``.

    python scripts/make_latent_fixtures.py [--out tests/fixtures/latent_parity]

Needs the reference libraries, which are not dependencies of diffusion_jax (nothing is
downloaded from a model hub: every network is built from a config object with random weights):

    pip install torch diffusers transformers safetensors numpy
    pip install --no-deps open-clip-torch ftfy wcwidth regex   # CLIP's BPE file and tokenizer

Networks get their libraries' random initialisation plus N(0, 0.05^2) noise on every tensor
(GroupNorm/LayerNorm scales would otherwise be exactly 1 and biases 0, hiding mistakes in them).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import pathlib

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOISE = 0.05

# --------------------------------------------------------------------------------------------
# Autoencoder
# --------------------------------------------------------------------------------------------

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(8, 16, 16),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
    scaling_factor=0.18215,
)


def perturb(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(NOISE * torch.randn(p.shape, generator=gen))


def save_state_dict(module: torch.nn.Module, path: pathlib.Path) -> dict:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))
    path.chmod(0o644)
    return {k: list(v.shape) for k, v in state.items()}


def make_vae(out: pathlib.Path) -> None:
    import diffusers
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    perturb(vae, 1)
    shapes = save_state_dict(vae, out / "vae_state_dict.safetensors")

    gen = torch.Generator().manual_seed(2)
    x = torch.rand((2, 3, 16, 16), generator=gen) * 2 - 1
    z = torch.randn((2, 4, 4, 4), generator=gen)
    # Moments with large entries, for the log-variance clipping to [-30, 20].
    moments = torch.randn((2, 8, 3, 3), generator=gen) * 25
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        recon = vae(x, sample_posterior=False).sample
        decoded = vae.decode(z).sample
        clipped = DiagonalGaussianDistribution(moments)
    np.savez_compressed(
        out / "vae_io.npz",
        x=x.numpy(),
        mean=posterior.mean.numpy(),
        logvar=posterior.logvar.numpy(),
        reconstruction=recon.numpy(),
        z=z.numpy(),
        decoded=decoded.numpy(),
        moments=moments.numpy(),
        moments_mean=clipped.mean.numpy(),
        moments_logvar=clipped.logvar.numpy(),
        moments_std=clipped.std.numpy(),
    )
    meta = dict(
        diffusers=diffusers.__version__,
        torch=torch.__version__,
        config={k: list(v) if isinstance(v, tuple) else v for k, v in VAE_CONFIG.items()},
        num_params=sum(p.numel() for p in vae.parameters()),
        state_dict_shapes=shapes,
    )
    (out / "vae.json").write_text(json.dumps(meta, indent=1) + "\n")

    # The dtype coverage of the safetensors reader: float16, bfloat16 and int64 tensors.
    from safetensors.torch import save_file

    base = torch.randn((3, 5), generator=gen)
    save_file(
        {"f16": base.half(), "bf16": base.bfloat16(), "i64": torch.arange(-3, 4), "f32": base},
        str(out / "dtypes.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "dtypes.safetensors").chmod(0o644)
    np.savez(
        out / "dtypes_expected.npz",
        f16=base.half().float().numpy(),
        bf16=base.bfloat16().float().numpy(),
        i64=np.arange(-3, 4),
        f32=base.numpy(),
    )


# --------------------------------------------------------------------------------------------
# CLIP text transformer
# --------------------------------------------------------------------------------------------

# 'eos': transformers' current pooling (first position of eos_token_id); 'legacy': a config with
# eos_token_id = 2, for which transformers pools at argmax(input_ids), and exact GELU.
CLIP_CONFIGS = {
    "clip_eos": dict(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=1,
    ),
    "clip_legacy": dict(
        vocab_size=1000,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=3,
        max_position_embeddings=77,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=998,
        eos_token_id=2,
        pad_token_id=1,
    ),
}


def clip_ids(gen: torch.Generator, lengths: list[int], bos: int, eos: int, pad: int) -> torch.Tensor:
    rows = []
    for n in lengths:
        body = torch.randint(3, 990, (n,), generator=gen)
        row = torch.cat([torch.tensor([bos]), body, torch.tensor([eos]), torch.full((75 - n,), pad)])
        rows.append(row)
    return torch.stack(rows)


def make_clip(out: pathlib.Path) -> None:
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel

    for i, (name, cfg) in enumerate(CLIP_CONFIGS.items()):
        torch.manual_seed(10 + i)
        model = CLIPTextModel(CLIPTextConfig(**cfg, attn_implementation="eager")).eval()
        perturb(model, 20 + i)
        shapes = save_state_dict(model, out / f"{name}_state_dict.safetensors")
        gen = torch.Generator().manual_seed(30 + i)
        # SD pads with the end token (999 here); the 'eos' config pads with pad_token_id.
        pad = 999 if name == "clip_legacy" else cfg["pad_token_id"]
        ids = clip_ids(gen, [5, 20, 75], 998, 999, pad)
        mask = (torch.arange(77)[None, :] <= torch.tensor([6, 21, 76])[:, None]).long()
        with torch.no_grad():
            res = model(input_ids=ids)
            res_masked = model(input_ids=ids, attention_mask=mask)
        np.savez_compressed(
            out / f"{name}_io.npz",
            input_ids=ids.numpy(),
            attention_mask=mask.numpy(),
            last_hidden_state=res.last_hidden_state.numpy(),
            pooler_output=res.pooler_output.numpy(),
            masked_last_hidden_state=res_masked.last_hidden_state.numpy(),
            masked_pooler_output=res_masked.pooler_output.numpy(),
        )
        meta = dict(
            transformers=transformers.__version__,
            torch=torch.__version__,
            config=cfg,
            num_params=sum(p.numel() for p in model.parameters()),
            state_dict_shapes=shapes,
        )
        (out / f"{name}.json").write_text(json.dumps(meta, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "A Photograph of an ASTRONAUT riding a horse!",
    "",
    "   leading and    inner   spaces\tand\ttabs\n",
    "don't you'll we've they're I'm she'd it's",
    "numbers 1234567 and 3.14159, 2nd place; 10x faster",
    "hyphenated-words, under_scores and e-mail@example.com",
    "emoji 🐱🚀 and symbols ©®™ ∑∞",
    "café naïve façade Zürich São Paulo",
    "日本語のテキストと中文文本",
    "Привет мир, γειά σου κόσμε",
    "punctuation!!! ??? ... --- ((nested)) [brackets] {braces}",
    "a " * 100 + "very long prompt that must be truncated to seventy-seven tokens",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "html entities &amp; &lt;b&gt; and curly “quotes” ‘single’",
    "the quick brown fox jumps over the lazy dog",
    "a painting of a cat in the style of van gogh, trending on artstation, 4k, highly detailed",
    "digit 7",
]


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character table (the same as in CLIP's tokenizer).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer(out: pathlib.Path) -> None:
    dist = importlib.metadata.distribution("open-clip-torch")
    bpe_path = pathlib.Path(str(dist.locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz")))
    raw = bpe_path.read_bytes()
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", bpe_path.parent / "tokenizer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    simple = mod.SimpleTokenizer(str(bpe_path))
    open_clip_ids = simple(PROMPTS, context_length=77).numpy()  # padded with 0

    # transformers' CLIPTokenizer on the same vocabulary (its merges: lines 1 .. 48894 of the file).
    from transformers import CLIPTokenizer

    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    hf = CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])
    hf_ids = np.asarray(hf(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"], dtype=np.int64)
    np.savez_compressed(out / "tokenizer_ids.npz", open_clip=open_clip_ids.astype(np.int64), transformers=hf_ids)
    agree = [
        bool(np.array_equal(open_clip_ids[i][open_clip_ids[i] != 0], hf_ids[i][: (open_clip_ids[i] != 0).sum()]))
        for i in range(len(PROMPTS))
    ]
    import ftfy

    meta = dict(
        prompts=PROMPTS,
        # Prompts that ftfy.fix_text (part of CLIP's text cleaning) leaves unchanged.
        ftfy_unchanged=[ftfy.fix_text(p) == p for p in PROMPTS],
        ftfy=importlib.metadata.version("ftfy"),
        bpe_file="open_clip/bpe_simple_vocab_16e6.txt.gz",
        bpe_package=f"open-clip-torch {dist.version}",
        bpe_sha256=hashlib.sha256(raw).hexdigest(),
        transformers_agrees_with_open_clip=agree,
    )
    (out / "tokenizer.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    print("tokenizer: transformers agrees with open_clip on", sum(agree), "of", len(agree), "prompts")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "latent_parity"))
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    make_vae(out)
    make_clip(out)
    make_tokenizer(out)
    print("wrote", sorted(p.name for p in out.iterdir()))


if __name__ == "__main__":
    main()
