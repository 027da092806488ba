"""Tokenizers for text conditioning: CLIP's byte-level BPE and a closed-vocabulary tokenizer for
data sets with their own captions. Both return ``(B, max_length)`` int32 numpy arrays, the input
of :class:`diffusion_jax.models.text.TextTransformer`.

:class:`CLIPTokenizer` is CLIP's tokenizer (Radford et al. 2021, sec. 2.4: a lower-cased byte
pair encoding of the text with a vocabulary of 49,152 symbols, Sennrich et al. 2016, each text
between start and end tokens), as in CLIP's original ``simple_tokenizer``:

1. cleaning: ``ftfy.fix_text`` (when ftfy is installed; otherwise Unicode NFC normalisation, the
   part of it that matters for well-formed text), HTML entities unescaped twice, runs of
   whitespace collapsed to one space, lower case;
2. pre-tokenisation by the regular expression ``'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+``
   (words, single digits, runs of other symbols);
3. each piece's UTF-8 bytes mapped to printable characters (GPT-2's reversible byte table), the
   last one marked with ``</w>``, then merged pair by pair, lowest merge rank first (the BPE of
   Sennrich et al. 2016, applied with CLIP's learned merge list);
4. ``<|startoftext|>`` (49406) + tokens + ``<|endoftext|>`` (49407), truncated to the context
   length (77) with the end token kept last, padded with ``pad_token_id``.

The vocabulary (48,894 merges; 49,408 ids) is the file ``bpe_simple_vocab_16e6.txt.gz`` that ships
inside the ``open-clip-torch`` wheel; :meth:`CLIPTokenizer.from_package` reads it from the
installed distribution without importing the package (so torch is not needed:
``pip install --no-deps open-clip-torch``). Nothing is downloaded at run time.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.metadata
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CLIPTokenizer",
    "WordTokenizer",
    "TokenizerError",
    "bytes_to_unicode",
    "CLIP_BPE_PACKAGE",
    "CLIP_BPE_FILE",
    "CLIP_BPE_SHA256",
]

CLIP_BPE_PACKAGE = "open-clip-torch"
CLIP_BPE_FILE = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of the decompressed vocabulary text (as shipped in open-clip-torch 3.3.0).
CLIP_BPE_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
_NUM_MERGES = 49152 - 256 - 2  # CLIP's 49,152 BPE vocabulary minus the 256 bytes and 2 special tokens

# CLIP's pre-tokenisation pattern (case-insensitive); the special tokens first.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class TokenizerError(ValueError):
    """A prompt the tokenizer cannot encode (unknown token, too long)."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table: printable Latin-1 bytes map to themselves, the
    other 68 bytes to the characters from U+0100 on, in byte order (so no BPE symbol is a
    whitespace or control character)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # printable bytes first: the order of the vocabulary's first 256 entries


def _clean(text: str) -> str:
    try:
        import ftfy  # noqa: PLC0415 (optional)

        text = ftfy.fix_text(text)
    except ImportError:
        text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (see the module docstring).

    ``tokenizer(texts) -> (B, context_length)`` int32: start token, BPE tokens, end token, then
    ``pad_token_id`` (default: the end token, as Stable Diffusion 1.x and transformers'
    ``CLIPTokenizer`` pad; CLIP's own code and OpenCLIP / Stable Diffusion 2.x pad with 0).
    Prompts longer than the context are truncated (the end token is kept), or refused with
    ``truncate=False``.
    """

    def __init__(self, merges: Sequence[tuple[str, str]], *, context_length: int = 77, pad_token_id: int | None = None):
        try:
            import regex  # noqa: PLC0415 (optional: \p{L} and \p{N} classes)
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError('CLIPTokenizer needs the regex package: pip install "diffusion_jax[clip]"') from err
        if context_length < 2:
            raise ValueError(f"CLIPTokenizer: context_length must be >= 2, got {context_length}")
        self._byte_chars = bytes_to_unicode()
        self._char_bytes = {c: b for b, c in self._byte_chars.items()}
        symbols = list(self._byte_chars.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.ranks: dict[tuple[str, str], int] = {tuple(m): i for i, m in enumerate(merges)}  # type: ignore[misc]
        self.sot_token_id = self.encoder["<|startoftext|>"]
        self.eot_token_id = self.encoder["<|endoftext|>"]
        self.context_length = context_length
        self.pad_token_id = self.eot_token_id if pad_token_id is None else pad_token_id
        self._pattern = regex.compile(_CLIP_PATTERN, regex.IGNORECASE)
        self._cache: dict[str, tuple[str, ...]] = {
            "<|startoftext|>": ("<|startoftext|>",),
            "<|endoftext|>": ("<|endoftext|>",),
        }

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_bpe_file(cls, path: str | os.PathLike, **kwargs: Any) -> CLIPTokenizer:
        """From a ``bpe_simple_vocab_16e6.txt(.gz)`` file: a version line, then one merge
        ``"a b"`` per line; the first 48,894 merges are CLIP's."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        return cls(_parse_merges(raw, path), **kwargs)

    @classmethod
    def from_package(cls, **kwargs: Any) -> CLIPTokenizer:
        """CLIP's vocabulary from the installed ``open-clip-torch`` distribution (the file is
        read in place; the package is not imported, so its torch dependency is not needed)."""
        try:
            dist = importlib.metadata.distribution(CLIP_BPE_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise ImportError(
                f"CLIP's BPE vocabulary ships inside the {CLIP_BPE_PACKAGE} wheel, which is not installed; "
                f'install it with pip install "diffusion_jax[clip]" (or pip install --no-deps {CLIP_BPE_PACKAGE}: '
                f"only its vocabulary file is read), or pass the file to CLIPTokenizer.from_bpe_file"
            ) from None
        path = str(dist.locate_file(CLIP_BPE_FILE))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{CLIP_BPE_PACKAGE} {dist.version} has no {CLIP_BPE_FILE} (looked at {path})")
        with open(path, "rb") as f:
            raw = f.read()
        text = gzip.decompress(raw)
        digest = hashlib.sha256(text).hexdigest()
        if digest != CLIP_BPE_SHA256:
            raise ValueError(
                f"{path} ({CLIP_BPE_PACKAGE} {dist.version}) is not CLIP's vocabulary: sha256 of its text is "
                f"{digest}, expected {CLIP_BPE_SHA256}"
            )
        return cls(_parse_merges(raw, path), **kwargs)

    # -- encoding --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> tuple[str, ...]:
        if piece in self._cache:
            return self._cache[piece]
        chars = "".join(self._byte_chars[b] for b in piece.encode("utf-8"))
        word = [*chars[:-1], chars[-1] + "</w>"]
        while len(word) > 1:
            # The adjacent pair with the lowest merge rank; every occurrence of it is merged,
            # left to right without overlap.
            ranked = [(self.ranks.get((a, b), -1), (a, b)) for a, b in zip(word[:-1], word[1:])]
            known = [(r, p) for r, p in ranked if r >= 0]
            if not known:
                break
            _, (first, second) = min(known)
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = tuple(word)
        if len(self._cache) < 100_000:
            self._cache[piece] = result
        return result

    def encode(self, text: str) -> list[int]:
        """BPE token ids of ``text``, without the start and end tokens."""
        ids: list[int] = []
        for piece in self._pattern.findall(_clean(text)):
            ids.extend(self.encoder[t] for t in self._bpe(piece))
        return ids

    def __call__(
        self, texts: str | Iterable[str], *, context_length: int | None = None, truncate: bool = True
    ) -> np.ndarray:
        """``(B, context_length)`` int32 ids for a prompt or a list of prompts."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        n = self.context_length if context_length is None else context_length
        out = np.full((len(texts), n), self.pad_token_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > n:
                if not truncate:
                    raise TokenizerError(
                        f"prompt {text[:60]!r}{'...' if len(text) > 60 else ''} has {len(ids)} tokens with the start "
                        f"and end tokens, more than the context length {n}"
                    )
                ids = ids[: n - 1] + [self.eot_token_id]
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; start, end and padding tokens are dropped, ``</w>`` becomes a space."""
        skip = {self.sot_token_id, self.eot_token_id, self.pad_token_id}
        raw = bytearray()
        for i in ids:
            if int(i) in skip:
                continue
            token = self.decoder[int(i)]
            end = token.endswith("</w>")
            raw.extend(self._char_bytes[c] for c in (token[:-4] if end else token))
            if end:
                raw.extend(b" ")
        return raw.decode("utf-8", errors="replace").strip()


def _parse_merges(raw: bytes, where: str) -> list[tuple[str, str]]:
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != _NUM_MERGES or bad:
        raise ValueError(
            f"{where}: expected a version line and {_NUM_MERGES} merges 'a b', got {len(merges)} lines"
            + (f" (line {bad[0] + 2} is {lines[bad[0] + 1]!r})" if bad else "")
        )
    return merges  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Closed vocabulary
# --------------------------------------------------------------------------------------------

_WORD_PATTERN = re.compile(r"[^\W_]+|[^\w\s]|_")


class WordTokenizer:
    """A closed-vocabulary tokenizer for data sets with their own captions, word- or
    character-level, for a :class:`~diffusion_jax.models.text.TextTransformer` trained from scratch.

    Ids: 0 ``<pad>``, 1 ``<bos>``, 2 ``<eos>``, then the vocabulary in the given order.
    ``tokenizer(texts) -> (B, max_length)`` int32: ``<bos>``, tokens, ``<eos>``, padding.
    Words are runs of letters and digits; each punctuation mark is a token of its own; text is
    lower-cased when ``lowercase``. A token outside the vocabulary, or a prompt longer than
    ``max_length`` (counting ``<bos>`` and ``<eos>``), raises :class:`TokenizerError`: a model
    trained on a closed vocabulary has nothing to say about either.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self, vocabulary: Sequence[str], *, max_length: int, level: str = "word", lowercase: bool = True):
        if level not in ("word", "char"):
            raise ValueError(f"WordTokenizer: level must be 'word' or 'char', got {level!r}")
        if max_length < 3:
            raise ValueError(f"WordTokenizer: max_length must be >= 3 (<bos>, a token, <eos>), got {max_length}")
        vocabulary = list(vocabulary)
        clash = [t for t in vocabulary if t in self.SPECIALS]
        dupes = sorted({t for t in vocabulary if vocabulary.count(t) > 1})
        if clash or dupes:
            raise ValueError(f"WordTokenizer: vocabulary has reserved {clash} or repeated {dupes} entries")
        self.vocabulary = vocabulary
        self.max_length = max_length
        self.level = level
        self.lowercase = lowercase
        self._ids = {t: i + len(self.SPECIALS) for i, t in enumerate(vocabulary)}
        self._tokens = list(self.SPECIALS) + vocabulary

    @classmethod
    def from_captions(
        cls, captions: Iterable[str], *, max_length: int | None = None, level: str = "word", lowercase: bool = True
    ) -> WordTokenizer:
        """The vocabulary of ``captions`` (sorted); ``max_length`` defaults to the longest
        caption's length plus ``<bos>`` and ``<eos>``."""
        probe = cls([], max_length=3, level=level, lowercase=lowercase)
        split = [probe.split(c) for c in captions]
        vocabulary = sorted({t for tokens in split for t in tokens})
        longest = max((len(t) for t in split), default=1) + 2
        return cls(
            vocabulary, max_length=longest if max_length is None else max_length, level=level, lowercase=lowercase
        )

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def split(self, text: str) -> list[str]:
        text = text.lower() if self.lowercase else text
        if self.level == "char":
            return list(text)
        return _WORD_PATTERN.findall(text)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` without ``<bos>`` / ``<eos>``; unknown tokens raise :class:`TokenizerError`."""
        tokens = self.split(text)
        unknown = [t for t in tokens if t not in self._ids]
        if unknown:
            shown = ", ".join(repr(t) for t in self.vocabulary[:30]) + (" ..." if len(self.vocabulary) > 30 else "")
            names = ", ".join(map(repr, dict.fromkeys(unknown)))
            raise TokenizerError(
                f"unknown {self.level}{'s' if len(set(unknown)) > 1 else ''} {names} "
                f"in prompt {text!r}; this tokenizer knows only the {len(self.vocabulary)} {self.level}s of its "
                f"training captions: {shown}"
            )
        return [self._ids[t] for t in tokens]

    def __call__(self, texts: str | Iterable[str]) -> np.ndarray:
        """``(B, max_length)`` int32 ids; too-long prompts raise :class:`TokenizerError`."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text), self.eos_id]
            if len(ids) > self.max_length:
                raise TokenizerError(
                    f"prompt {text!r} has {len(ids) - 2} {self.level}s; at most {self.max_length - 2} fit "
                    f"(max_length={self.max_length} counts <bos> and <eos>)"
                )
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> str:
        tokens = [self._tokens[int(i)] for i in ids if int(i) >= len(self.SPECIALS)]
        return ("" if self.level == "char" else " ").join(tokens)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (store it next to the trained text encoder)."""
        return dict(
            vocabulary=list(self.vocabulary), max_length=self.max_length, level=self.level, lowercase=self.lowercase
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WordTokenizer:
        return cls(
            d["vocabulary"],
            max_length=d["max_length"],
            level=d.get("level", "word"),
            lowercase=d.get("lowercase", True),
        )
