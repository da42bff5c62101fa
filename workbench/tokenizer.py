"""Byte-level BPE tokenizer: a thin wrapper around ``tokenizers.Tokenizer``.

The wrapper gives the workbench one stable API whether the ``tokenizer.json`` was trained here
(:meth:`Tokenizer.train`) or ships with a Hugging Face Llama-4 checkpoint, plus the per-token
labels and categories that routing plots and analyses need (:meth:`Tokenizer.token_strings`,
:meth:`Tokenizer.categories`, :func:`token_category`).

Only the ``tokenizers`` library is imported (never torch or jax), so ``import workbench`` stays
framework-free.
"""

from __future__ import annotations

import builtins
import keyword
import os
import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PYTHON_KEYWORDS",
    "SPECIAL_TOKENS",
    "TOKEN_CATEGORIES",
    "TokenIdError",
    "Tokenizer",
    "token_category",
]

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)

# Candidates when loading a tokenizer.json trained elsewhere (Llama 3/4 first, then common ones).
_BOS_CANDIDATES = (BOS_TOKEN, "<s>", "<bos>")
_EOS_CANDIDATES = (EOS_TOKEN, "<|eot|>", "<|eot_id|>", "</s>", "<eos>")
_PAD_CANDIDATES = (PAD_TOKEN, "<|finetune_right_pad|>", "<|finetune_right_pad_id|>", "<pad>")

# Llama-3/4 style pre-tokenisation: contractions, words with one leading non-letter, numbers in
# groups of at most three digits, punctuation runs, newlines, other whitespace.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TOKEN_CATEGORIES: tuple[str, ...] = (
    "whitespace",
    "digit",
    "punctuation",
    "keyword",
    "word",
    "special",
    "other",
)

# Names added to builtins by the ``site`` module (``license``, ``copyright``, ``help``...) are
# left out: they depend on how Python was started and collide with ordinary English words. The
# soft keyword ``_`` is left out too: as a token it is punctuation-like.
_SITE_BUILTINS = frozenset({"copyright", "credits", "license", "exit", "quit", "help"})
PYTHON_KEYWORDS: frozenset[str] = frozenset(
    (set(keyword.kwlist) | set(keyword.softkwlist) - {"_"})
    | ({name for name in vars(builtins) if not name.startswith("_")} - _SITE_BUILTINS)
)

class TokenIdError(ValueError, IndexError):
    """A token id the tokenizer does not have (out of range, negative) or that is not an int.

    A ValueError like the workbench's other input errors, and an IndexError as out-of-range
    ids were before."""


_SPECIAL_RE = re.compile(r"<\|[^|<>\s]+\|>|</?s>|<(?:bos|eos|pad|unk)>")

# Whitespace made visible in plot labels.
_VISIBLE_WHITESPACE = str.maketrans({" ": "·", "\n": "↵", "\t": "→", "\r": "␍"})


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode map used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _is_word(s: str) -> bool:
    return s.isalpha() or (s.isidentifier() and any(c.isalpha() for c in s))


def token_category(s: str) -> str:
    """Classify the decoded text of one token into one of :data:`TOKEN_CATEGORIES`.

    Rules, first match wins (surrounding whitespace is stripped before the later tests):
    ``special`` for ``<|...|>``-style control tokens; ``whitespace`` if only whitespace;
    ``keyword`` for Python keywords, soft keywords and builtin names (``def``, `` return``,
    ``len``, ``None``); ``digit`` for decimal digits only (`` 42``); ``word`` for alphabetic
    text or identifiers, optionally after one punctuation character as the pre-tokenizer
    produces them (``the``, `` model``, ``_name``, ``x2``, ``.append``, ``,north``);
    ``punctuation`` when every character is punctuation or a symbol (``):``, `` ==``);
    ``other`` for everything else (empty strings, ``-4``, ``1e``, partial UTF-8 bytes).
    """
    if not s:
        return "other"
    if _SPECIAL_RE.fullmatch(s):
        return "special"
    if s.isspace():
        return "whitespace"
    core = s.strip()
    if "\ufffd" in core:
        return "other"
    if core in PYTHON_KEYWORDS:
        return "keyword"
    if core.isdecimal():
        return "digit"
    if _is_word(core) or (
        len(core) > 1 and unicodedata.category(core[0])[0] in "PS" and _is_word(core[1:])
    ):
        return "word"
    if all(unicodedata.category(c)[0] in "PS" for c in core):
        return "punctuation"
    return "other"


class Batch(NamedTuple):
    """Padded token ids and their attention mask, as ``encode_batch(..., pad=True)`` returns
    them (unpacks as ``ids, mask = ...``)."""

    input_ids: np.ndarray  # (B, T) int64, pad_id at padding
    attention_mask: np.ndarray  # (B, T) int64: 1 = token, 0 = pad


class Tokenizer:
    """Byte-level BPE tokenizer with Llama-style special tokens.

    Attributes ``bos_id``, ``eos_id`` and ``pad_id`` hold the special-token ids; ``backend`` is
    the wrapped ``tokenizers.Tokenizer`` for anything not covered here.
    """

    def __init__(self, backend: _HFTokenizer) -> None:
        self.backend = backend
        self.bos_id = self._find_special(_BOS_CANDIDATES, "beginning-of-text")
        self.eos_id = self._find_special(_EOS_CANDIDATES, "end-of-text")
        try:
            self.pad_id = self._find_special(_PAD_CANDIDATES, "padding")
        except ValueError:
            self.pad_id = self.eos_id
        self._special_ids = frozenset(
            {self.bos_id, self.eos_id, self.pad_id}
            | {
                i
                for i, tok in backend.get_added_tokens_decoder().items()
                if getattr(tok, "special", False)
            }
        )
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)

    def _find_special(self, candidates: Sequence[str], what: str) -> int:
        for token in candidates:
            idx = self.backend.token_to_id(token)
            if idx is not None:
                return int(idx)
        raise ValueError(f"tokenizer has no {what} token (looked for {', '.join(candidates)})")

    # ---------------------------------------------------------------------------------- io

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load from a directory holding ``tokenizer.json`` or from the json file itself."""
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json found at {file}")
        try:
            backend = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises its own (non-OSError) exception types
            raise ValueError(f"{file} is not a valid tokenizer.json: {exc}") from exc
        try:
            return cls(backend)
        except ValueError as exc:
            raise ValueError(f"{file}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` into a directory (created if needed) or to a ``.json`` path.

        Returns the path of the written file.
        """
        p = Path(path)
        file = p if p.suffix == ".json" else p / "tokenizer.json"
        file.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(file), pretty=True)
        return file

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
        """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same input).

        Special tokens get ids 0, 1, 2 (bos, eos, pad); the 256 byte symbols follow, so every
        string is encodable. The saved json adds bos like Llama's post-processor, for Hugging
        Face loaders; :meth:`encode` adds it itself instead.
        """
        if vocab_size < len(SPECIAL_TOKENS) + 256:
            raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 256}")
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        bos = backend.token_to_id(BOS_TOKEN)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos)],
        )
        return cls(backend)

    # ------------------------------------------------------------------------- encode/decode

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding rows must cover it)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``, with ``bos_id`` prepended when ``add_bos``."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, *, pad: bool = False,
                     padding_side: str = "right") -> list[list[int]] | Batch:
        """:meth:`encode` for many texts at once (parallel inside ``tokenizers``).

        Without ``pad``: one list of ids per text (ragged). With ``pad=True``: a
        :class:`Batch` of ``input_ids`` (B, T) int64 filled with ``pad_id`` and
        ``attention_mask`` (B, T) int64 (1 = token, 0 = pad), padded on ``padding_side``
        ("right", or "left" for generation), ready for ``model.run(ids, attention_mask=mask)``.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode() for one text")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side={padding_side!r}: choose 'right' or 'left'")
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = [self.bos_id] if add_bos else []
        rows = [prefix + list(e.ids) for e in encs]
        if not pad:
            return rows
        if not rows:
            raise ValueError("encode_batch(pad=True) got no texts")
        T = max(1, max(len(r) for r in rows))
        ids = np.full((len(rows), T), self.pad_id, np.int64)
        mask = np.zeros((len(rows), T), np.int64)
        for b, r in enumerate(rows):
            if not r:
                continue
            sl = slice(0, len(r)) if padding_side == "right" else slice(T - len(r), T)
            ids[b, sl] = r
            mask[b, sl] = 1
        return Batch(ids, mask)

    def check_ids(self, ids: Iterable[int], what: str = "decode") -> list[int]:
        """``ids`` as a list of ints in ``0..vocab_size-1``; TokenIdError otherwise.

        Accepts a 1-D sequence or array of integers (numpy integers included); a float, a bool,
        a string or a nested sequence is refused, never truncated or guessed at.
        """
        if isinstance(ids, str | bytes):
            raise TokenIdError(f"{what}: ids must be a sequence of ints, got a string {ids!r:.40}")
        if hasattr(ids, "detach"):  # a torch tensor
            ids = ids.detach().cpu().numpy()
        if hasattr(ids, "__array__") and getattr(ids, "ndim", 1) != 1:
            raise TokenIdError(f"{what}: ids must be one-dimensional, got shape "
                               f"{tuple(ids.shape)}; decode one sequence at a time")
        try:
            items = list(ids)
        except TypeError:
            raise TokenIdError(f"{what}: ids must be a sequence of ints, got "
                               f"{type(ids).__name__} {ids!r:.40}") from None
        out = []
        n = self.vocab_size
        for pos, i in enumerate(items):
            if isinstance(i, bool | np.bool_) or not isinstance(i, int | np.integer):
                raise TokenIdError(f"{what}: token ids must be ints, got {type(i).__name__} "
                                   f"{i!r:.40} at position {pos}")
            i = int(i)
            if not 0 <= i < n:
                raise TokenIdError(f"{what}: token id {i} at position {pos} is outside the "
                                   f"vocabulary [0, {n})")
            out.append(i)
        return out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped unless ``skip_special_tokens=False``.

        ``decode(encode(text)) == text`` for any string. An id outside the vocabulary (negative
        or >= ``vocab_size``) or a non-integer id is a TokenIdError.
        """
        return str(
            self.backend.decode(self.check_ids(ids), skip_special_tokens=skip_special_tokens)
        )

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (in the vocabulary's own spelling), or None."""
        idx = self.backend.token_to_id(token)
        return None if idx is None else int(idx)

    def id_to_token(self, idx: int) -> str | None:
        """Vocabulary entry of an id (byte-level spelling, e.g. 'Ġthe'), or None (also for a
        negative id)."""
        idx = int(idx)
        return None if idx < 0 else self.backend.id_to_token(idx)

    # ------------------------------------------------------------------------ per-token views

    def _token_text(self, idx: int, errors: str) -> str:
        """Decoded text of one token; ``errors`` says how partial UTF-8 bytes are rendered."""
        token = self.backend.id_to_token(idx)
        if token is None:
            raise TokenIdError(f"token id {idx} out of range for vocab of {self.vocab_size}")
        if idx in self._special_ids:
            return token
        table = _byte_decoder()
        if self._byte_level and all(c in table for c in token):
            return bytes(table[c] for c in token).decode("utf-8", errors=errors)
        return str(self.backend.decode([idx], skip_special_tokens=False))

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Readable label for each token: its text with whitespace made visible.

        Space becomes '·', newline '↵', tab '→', carriage return '␍'; special tokens keep their
        names; tokens holding part of a multi-byte character show the bytes as ``\\xNN``.
        """
        return [self._token_text(i, "backslashreplace").translate(_VISIBLE_WHITESPACE)
                for i in self.check_ids(ids, "token_strings")]

    def categories(self, ids: Iterable[int]) -> list[str]:
        """:func:`token_category` of each token's text; special ids are always ``"special"``.

        Partial UTF-8 byte tokens are ``"other"``.
        """
        out = []
        for i in self.check_ids(ids, "categories"):
            special = i in self._special_ids
            out.append("special" if special else token_category(self._token_text(i, "replace")))
        return out
