"""CLIP's tokenizer: OpenAI CLIP's byte-level BPE, with the ``tokenizers`` library as the merge engine.

The result is token-for-token the same as OpenAI CLIP's ``SimpleTokenizer`` (``tests/test_tokenizer.py`` checks it
against an independent re-implementation of that algorithm and against transformers' ``CLIPTokenizer``):

1. clean-up: ``ftfy.fix_text`` (when ftfy is installed), ``html.unescape`` twice, strip; collapse every run of Unicode
   white space to one space, strip; lower-case;
2. pre-tokenisation with CLIP's pattern: the two special tokens, the contractions ``'s 't 're 've 'm 'll 'd``, runs of
   letters, single digits, runs of other non-space characters (anything else is dropped);
3. each piece's UTF-8 bytes mapped to 256 printable stand-in characters, then BPE over them with ``</w>`` appended
   to the last symbol of the piece (merges are lines 1..48894 of ``bpe_simple_vocab_16e6.txt.gz``);
4. ids from the 49408-entry vocabulary: 256 byte symbols, the same 256 with ``</w>``, one symbol per merge (in merge
   order), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).

How the ``tokenizers`` pipeline reproduces OpenAI's ``regex`` pattern (compiled with ``IGNORECASE``) exactly: the
text is lower-cased before matching, so case-insensitivity only matters through Unicode case folding, and the only
folds that change a match on lower-cased text are LATIN SMALL LETTER LONG S (``ſ`` folds to ``s``, so ``'ſ`` is a
contraction) and COMBINING GREEK YPOGEGRAMMENI (U+0345, which folds to a letter and so matches none of the classes and
is dropped). Both are spelled out in :data:`PRETOKENIZE_PATTERN`. Characters assigned in Unicode versions newer than
the regex engines' tables can be classified differently by different engines (this also varies with the installed
``regex`` version for OpenAI's code).

Special-token strings typed in the text (``"<|endoftext|>"``) become the special ids only where CLIP's pattern
finds them, i.e. not when glued to preceding punctuation (``"!<|endoftext|>"``), as in OpenAI's code; transformers'
tokenizer instead finds them anywhere.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vlprompt.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.pre_tokenizers import PreTokenizer

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
NUM_MERGES = 48894
"""CLIP uses merges lines 1..48894 of the merges file (line 0 is a version header)."""
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
DEFAULT_CONTEXT_LENGTH = 77

PRETOKENIZE_PATTERN = (
    r"<\|[sſ]tartoftext\|>|<\|endoftext\|>"
    r"|'[sſ]|'t|'re|'ve|'m|'ll|'d"
    r"|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{0345}]+"
)
"""CLIP's pre-tokenisation pattern in Oniguruma syntax, for lower-cased text (see the module docstring)."""

# Unicode White_Space, which is what OpenAI's ``regex`` module matches with ``\s``. Python's ``re`` would also match
# U+001C..U+001F, so the set is written out.
_WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")
_SHORTEN_AT = 60


def byte_symbols() -> list[str]:
    """The stand-in character of each byte value 0..255 (GPT-2/CLIP's reversible byte-to-unicode mapping).

    Printable Latin-1 bytes (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the other 68 bytes take
    the characters U+0100, U+0101, ... in byte order, so no symbol is white space or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    symbols: list[str] = []
    extra = 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def load_merges(path: str | Path | None = None) -> list[tuple[str, str]]:
    """Read CLIP's BPE merges: lines 1..48894 of the gzip'ed merges file (the package's copy by default)."""
    if path is None:
        data = importlib.resources.files("vlprompt").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
        source = "vlprompt/assets/bpe_simple_vocab_16e6.txt.gz"
    else:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the BPE merges file {str(path)!r}: {exc}") from exc
        source = str(path)
    try:
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source!r} is not a gzip'ed UTF-8 CLIP merges file: {exc}") from exc
    lines = text.split("\n")[1 : NUM_MERGES + 1]
    while lines and not lines[-1].strip():
        lines.pop()  # the newline that ends the file
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{source!r}, line {number + 1}: expected two symbols per merge, got {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != NUM_MERGES:
        raise ConfigError(f"{source!r} holds {len(merges)} merges; CLIP's vocabulary needs {NUM_MERGES}")
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
    """CLIP's vocabulary in id order: byte symbols, byte symbols + ``</w>``, merged symbols, SOT, EOT."""
    singles = sorted(byte_symbols())  # OpenAI's order: printable bytes first, then U+0100.. (= code point order)
    return [
        *singles,
        *(symbol + END_OF_WORD for symbol in singles),
        *(first + second for first, second in merges),
        SOT_TOKEN,
        EOT_TOKEN,
    ]


def _load_fix_text() -> Callable[[str], str] | None:
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


def clean_text(text: str, fix_text: Callable[[str], str] | None) -> str:
    """CLIP's clean-up: ``fix_text`` (ftfy), HTML-unescape twice, collapse white space, strip, lower-case."""
    if fix_text is not None:
        text = fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


def _shorten(text: str) -> str:
    return text if len(text) <= _SHORTEN_AT else text[: _SHORTEN_AT - 3] + "..."


class ClipTokenizer:
    """OpenAI CLIP's tokenizer (see the module docstring for the algorithm).

    ``fix_text`` chooses the first clean-up step: ``None`` (default) uses ``ftfy.fix_text`` when ftfy is installed,
    as OpenAI's code does; ``False`` skips it; a callable replaces it. ``merges_path`` points to another gzip'ed
    merges file of the same format.
    """

    sot_token_id: int = VOCAB_SIZE - 2
    eot_token_id: int = VOCAB_SIZE - 1
    vocab_size: int = VOCAB_SIZE

    def __init__(
        self,
        merges_path: str | Path | None = None,
        *,
        fix_text: Callable[[str], str] | bool | None = None,
    ) -> None:
        from tokenizers import Regex, Tokenizer, pre_tokenizers
        from tokenizers.models import BPE

        if fix_text is None or fix_text is True:
            self._fix_text = _load_fix_text()
            if fix_text is True and self._fix_text is None:
                raise ConfigError("fix_text=True needs the 'ftfy' package: pip install ftfy")
        elif fix_text is False:
            self._fix_text = None
        else:
            self._fix_text = fix_text
        merges = load_merges(merges_path)
        self._vocab = build_vocab(merges)
        self._ids = {token: index for index, token in enumerate(self._vocab)}
        if len(self._ids) != VOCAB_SIZE:
            raise ConfigError(f"the merges file gives {len(self._ids)} distinct symbols, expected {VOCAB_SIZE}")
        symbols = byte_symbols()
        self._byte_of_symbol = {symbol: byte for byte, symbol in enumerate(symbols)}

        # The BPE model never sees the special tokens: they are matched in encode() (see _encode_with_specials).
        bpe_vocab = {token: index for index, token in enumerate(self._vocab[: self.sot_token_id])}
        model = BPE(
            vocab=bpe_vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
        )
        splitter = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="removed", invert=True)
        engine = Tokenizer(model)
        engine.pre_tokenizer = pre_tokenizers.Sequence(
            [splitter, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        self._engine: Tokenizer = engine
        self._splitter: PreTokenizer = splitter

    @property
    def uses_ftfy(self) -> bool:
        """Whether clean-up runs a ``fix_text`` step (ftfy's by default)."""
        return self._fix_text is not None

    def clean(self, text: str) -> str:
        """The text as CLIP's BPE sees it (after clean-up, white-space collapse and lower-casing)."""
        return clean_text(text, self._fix_text)

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text``, without start/end tokens."""
        if not isinstance(text, str):
            raise ConfigError(f"the tokenizer encodes str, got {type(text).__name__}: {text!r}")
        cleaned = self.clean(text)
        if SOT_TOKEN in cleaned or EOT_TOKEN in cleaned:
            return self._encode_with_specials(cleaned)
        return self._engine.encode(cleaned, add_special_tokens=False).ids

    def _encode_with_specials(self, cleaned: str) -> list[int]:
        # Rare path: special-token strings in the text. Encoding each pre-token on its own gives the same pieces as
        # encoding the whole text (a match of the pattern, matched again on its own, is itself), so the special
        # ones can be mapped to their ids and the others go through the BPE engine.
        ids: list[int] = []
        for piece, _ in self._splitter.pre_tokenize_str(cleaned):
            if piece == SOT_TOKEN:
                ids.append(self.sot_token_id)
            elif piece == EOT_TOKEN:
                ids.append(self.eot_token_id)
            else:
                ids.extend(self._engine.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` as OpenAI's decoder gives it: ``</w>`` becomes a space (so the text ends with one).

        Start, end and padding ids are decoded like any other id; drop them first if they are not wanted.
        Invalid UTF-8 (a piece of a multi-byte character) becomes U+FFFD.
        """
        symbols = "".join(self.id_to_token(int(index)) for index in ids)
        data = bytes(self._byte_of_symbol[char] for char in symbols)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def id_to_token(self, index: int) -> str:
        """The vocabulary symbol of ``index`` (byte-level characters, ``</w>`` marks a word end), e.g. ``'cat</w>'``."""
        if not 0 <= index < VOCAB_SIZE:
            raise ConfigError(f"token id {index} is outside CLIP's vocabulary (0..{VOCAB_SIZE - 1})")
        return self._vocab[index]

    def token_to_id(self, token: str) -> int:
        """The id of a vocabulary symbol (the inverse of :meth:`id_to_token`)."""
        try:
            return self._ids[token]
        except KeyError:
            raise ConfigError(
                f"{token!r} is not a symbol of CLIP's vocabulary; symbols are byte-level strings such as 'cat</w>' "
                "(use encode() for text)"
            ) from None

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        truncate: bool = False,
    ) -> torch.Tensor:
        """Token ids ``[N, context_length]`` (int64): start token, BPE ids, end token, then zeros.

        Text longer than ``context_length`` tokens (start and end tokens included) raises :class:`ConfigError`,
        unless ``truncate`` is true: then the first ``context_length - 1`` tokens are kept and the end token is put
        last, so reading the text feature at the end token (the largest id) still works.
        """
        import torch

        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence):
            raise ConfigError(f"the tokenizer takes a str or a sequence of str, got {type(texts).__name__}")
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ConfigError(f"context_length must be an int >= 2 (start and end tokens), got {context_length!r}")
        rows: list[list[int]] = []
        for text in texts:
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > context_length:
                if not truncate:
                    raise ConfigError(
                        f"text {_shorten(text)!r} is {len(tokens)} tokens long (start and end tokens included), "
                        f"more than CLIP's context length {context_length}; shorten it (a class name, a prompt "
                        "template, --template or --ctx-init on the command line), or from Python cut it with "
                        "truncate=True"
                    )
                tokens = [*tokens[: context_length - 1], self.eot_token_id]
            rows.append(tokens)
        result = torch.zeros(len(rows), context_length, dtype=torch.long)
        for row, tokens in enumerate(rows):
            result[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return result


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> ClipTokenizer:
    """The default :class:`ClipTokenizer`, built once per process (building takes a fraction of a second)."""
    return ClipTokenizer()


def tokenize(
    texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH, truncate: bool = False
) -> torch.Tensor:
    """``get_tokenizer()(texts, context_length, truncate)``: CLIP token ids ``[N, context_length]``."""
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)
