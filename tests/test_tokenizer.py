"""CLIP tokenizer: exact agreement with OpenAI's algorithm and with transformers' CLIPTokenizer.

Three implementations are compared:

* ``vlprompt.backbone.tokenizer.ClipTokenizer`` (the `tokenizers` library as BPE engine);
* ``openai_reference`` below: an independent, plain-Python statement of OpenAI CLIP's ``SimpleTokenizer`` algorithm
  (ftfy + html clean-up, the original ``regex`` pattern with IGNORECASE, a textbook BPE merge loop);
* transformers' ``CLIPTokenizer`` built from vocab.json + merges.txt written here from the package's merges file.

Documented differences of transformers' tokenizer from OpenAI's algorithm (transformers 5 has only the fast
tokenizer): it never runs ftfy or ``html.unescape`` (it only NFC-normalises), and it matches special-token strings
anywhere in the text, while OpenAI's pattern misses them when glued to preceding punctuation. On every such input our
tokenizer agrees with the OpenAI reference, and with transformers applied to the already-cleaned text.
"""

from __future__ import annotations

import gzip
import html
import importlib.resources
import json
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from vlprompt.backbone.tokenizer import (
    EOT_TOKEN,
    SOT_TOKEN,
    ClipTokenizer,
    get_tokenizer,
    tokenize,
)
from vlprompt.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared"
SPLITS = SHARED / "splits"

HARD_CASES = [
    # punctuation and digits
    "a photo of a cat.",
    "Hello, World!!! ...",
    "a---b__c (d) [e] {f} <g> |h| ~i~ `j` ^k^",
    "747-400 and A380",
    "the 2nd of 12 March 2024, 3.14159",
    "100% #1 $5 @home",
    # apostrophes and contractions
    "don't can't it's we're they've I'm you'll he'd",
    "DON'T SHOUT IT'S LOUD",
    "rock'n'roll o'clock 'quoted' ''s ''",
    "'s 't 're 've 'm 'll 'd '",
    # non-ASCII: accents (precomposed and combining), other scripts, emoji
    "café crème brûlée naïve Ångström",
    "cafe\u0301 cre\u0300me",
    "Straße İstanbul Σίσυφος",
    "猫 寿司 東京タワー 한국어",
    "Привет мир",
    "🐈 🐕‍🦺 👍🏽 🇫🇷",
    "rocket🚀launch",
    # white space
    "  a   photo\tof\n\na  cat  ",
    "a\u00a0photo\u3000of\u2003a cat",
    "",
    "   ",
    # lone special-token strings (found by CLIP's pattern)
    "<|startoftext|>a cat<|endoftext|>",
    "a <|endoftext|> b",
]

# Inputs where transformers' tokenizer departs from OpenAI's algorithm (see the module docstring).
FTFY_CASES = [
    "Don’t “quote” me",  # curly quotes -> straight, so ’t is a contraction
    "ﬁsh and ﬂowers",  # ligatures
    "ＡＢＣ１２３",  # full-width characters
]
HF_DIFFERENT = [
    "fish &amp; chips",  # html.unescape
    "fish &amp;amp; chips",  # html.unescape twice
    "&lt;b&gt;bold&lt;/b&gt;",
    *FTFY_CASES,
    "ΟΔΟΣ",  # Python's str.lower() (OpenAI) gives a final sigma: "οδος"; transformers' Lowercase gives "οδοσ"
    "a <|ENDOFTEXT|> b",  # OpenAI lower-cases before matching; transformers matches special tokens case-sensitively
    "x!<|endoftext|>",  # special string glued to punctuation: OpenAI's pattern does not see the special token
]


# --------------------------------------------------------------------------------------------------------------------
# independent reference of OpenAI's algorithm


def _read_merges() -> list[tuple[str, str]]:
    data = importlib.resources.files("vlprompt").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1:48895]]  # type: ignore[misc]


def _byte_table() -> dict[int, str]:
    visible = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    hidden = [b for b in range(256) if b not in visible]
    table = {b: chr(b) for b in visible}
    table.update({b: chr(256 + n) for n, b in enumerate(hidden)})
    return table


class OpenAIReference:
    """OpenAI CLIP's SimpleTokenizer algorithm, written plainly (slow, for tests)."""

    def __init__(self, fix_text: Callable[[str], str] | None) -> None:
        import regex

        self.fix_text = fix_text
        merges = _read_merges()
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        table = _byte_table()
        self.byte_to_char = table
        self.char_to_byte = {c: b for b, c in table.items()}
        singles = [table[b] for b in sorted(table, key=lambda b: ord(table[b]))]
        vocab = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.vocab = vocab
        self.ids = {s: i for i, s in enumerate(vocab)}
        self.pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.space = regex.compile(r"\s+")

    def bpe(self, word: str) -> list[str]:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def encode(self, text: str) -> list[int]:
        if self.fix_text is not None:
            text = self.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        text = self.space.sub(" ", text).strip().lower()
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            if piece in (SOT_TOKEN, EOT_TOKEN):
                ids.append(self.ids[piece])
                continue
            word = "".join(self.byte_to_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.ids[s] for s in self.bpe(word))
        return ids

    def decode(self, ids: list[int]) -> str:
        chars = "".join(self.vocab[i] for i in ids)
        return bytes(self.char_to_byte[c] for c in chars).decode("utf-8", errors="replace").replace("</w>", " ")


def _ftfy_fix_text() -> Callable[[str], str] | None:
    try:
        import ftfy
    except ImportError:
        return None
    return ftfy.fix_text


# --------------------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def reference(tok: ClipTokenizer) -> OpenAIReference:
    pytest.importorskip("regex")
    fix = _ftfy_fix_text()
    assert tok.uses_ftfy == (fix is not None)
    return OpenAIReference(fix)


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201 - transformers type
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("hf_clip_tokenizer")
    merges = _read_merges()
    table = _byte_table()
    singles = sorted(table.values())
    vocab = singles + [s + "</w>" for s in singles] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return transformers.CLIPTokenizer.from_pretrained(str(folder))


def _hf_ids(hf, text: str) -> list[int]:  # noqa: ANN001
    return hf(text, add_special_tokens=False)["input_ids"]


def _split_classnames() -> list[str]:
    if not SPLITS.is_dir():
        pytest.skip(f"shared fixtures not found at {SPLITS}")
    names: set[str] = set()
    for path in sorted(SPLITS.glob("split_zhou_*.json")):
        for rows in json.loads(path.read_text("utf-8")).values():
            names.update(row[2] for row in rows)
    flowers = SPLITS / "cat_to_name_OxfordFlowers.json"
    if flowers.is_file():
        names.update(json.loads(flowers.read_text("utf-8")).values())
    return sorted(names)


# --------------------------------------------------------------------------------------------------------------------
# vocabulary and known ids


def test_vocabulary_layout(tok: ClipTokenizer) -> None:
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)
    assert tok.id_to_token(0) == "!"  # first printable byte
    assert tok.id_to_token(255) == chr(256 + 67)  # last of the 68 remapped bytes
    assert tok.id_to_token(256) == "!</w>"
    assert tok.id_to_token(512) == "in"  # merges line 1: "i n"
    assert tok.id_to_token(49405) == "jekyll</w>"  # merges line 48894: "jeky ll</w>"
    assert tok.id_to_token(49406) == SOT_TOKEN and tok.id_to_token(49407) == EOT_TOKEN
    assert all(tok.token_to_id(tok.id_to_token(i)) == i for i in range(tok.vocab_size))


def test_known_clip_ids(tok: ClipTokenizer) -> None:
    ids = tok("a photo of a cat.")
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert ids[0, 8:].abs().sum().item() == 0
    assert tok.encode("a photo of a dog.") == [320, 1125, 539, 320, 1929, 269]
    assert tok.encode("banded texture.") == [37804, 16505, 269]
    assert tok.encode("don't") == [847, 713]  # 'don</w>', "'t</w>"
    assert tok.encode("MONKEY!!") == [9465, 748]  # 'monkey</w>', '!!</w>'
    assert [tok.id_to_token(i) for i in tok.encode("the 2nd")] == ["the</w>", "2</w>", "nd</w>"]


def test_case_folding_corner_cases(tok: ClipTokenizer, reference: OpenAIReference) -> None:
    # OpenAI's pattern is case-insensitive: "'ſ" (long s) is a contraction, i.e. one word, so "'" gets no "</w>" ...
    assert tok.encode("'ſ") == reference.encode("'ſ") == [6, 129, 379]
    assert tok.encode("' ſ") == [262, 129, 379]
    # ... and U+0345 folds to a letter, so it matches none of the pattern's classes and is dropped.
    assert tok.encode("a\u0345b") == reference.encode("a\u0345b") == [320, 321]


# --------------------------------------------------------------------------------------------------------------------
# agreement with OpenAI's algorithm and transformers


def test_all_dataset_classnames_match(tok: ClipTokenizer, reference: OpenAIReference, hf) -> None:  # noqa: ANN001
    names = _split_classnames()
    assert len(names) > 500  # 7 split files + the flower names
    texts = names + [f"a photo of a {n}." for n in names] + [f"a photo of a {n}, a type of flower." for n in names]
    texts += [f"{n} texture." for n in names]
    ours = [tok.encode(t) for t in texts]
    assert ours == [reference.encode(t) for t in texts]
    assert ours == [_hf_ids(hf, t) for t in texts]
    rows = tok(texts)
    hf_rows = hf(texts, padding="max_length", max_length=77)["input_ids"]
    for text, row, hf_row, ids in zip(texts, rows.tolist(), hf_rows, ours):
        n = len(ids) + 2
        assert row[:n] == hf_row[:n] == [49406, *ids, 49407], text
        assert row[n:] == [0] * (77 - n)  # OpenAI pads with 0; transformers pads with <|endoftext|>


@pytest.mark.parametrize("text", HARD_CASES)
def test_hard_cases_match(text: str, tok: ClipTokenizer, reference: OpenAIReference, hf) -> None:  # noqa: ANN001
    assert tok.encode(text) == reference.encode(text)
    assert tok.encode(text) == _hf_ids(hf, text)


@pytest.mark.parametrize("text", HF_DIFFERENT)
def test_where_transformers_differs_we_follow_openai(
    text: str, tok: ClipTokenizer, reference: OpenAIReference, hf  # noqa: ANN001
) -> None:
    if not tok.uses_ftfy and text in FTFY_CASES:
        pytest.skip("ftfy is not installed")
    ours = tok.encode(text)
    assert ours == reference.encode(text)
    assert ours != _hf_ids(hf, text)  # a genuine difference, not a no-op case
    if "!<|" not in text:
        assert ours == _hf_ids(hf, tok.clean(text))  # the difference is the clean-up alone


def test_documented_differences_in_detail(tok: ClipTokenizer, hf) -> None:  # noqa: ANN001
    assert tok.decode(tok.encode("fish &amp;amp; chips")) == "fish & chips "
    glued = tok.encode("x!<|endoftext|>")
    assert tok.eot_token_id not in glued  # "!<|" is one run of punctuation for OpenAI's pattern
    assert [tok.id_to_token(i) for i in glued][:3] == ["x</w>", "!", "<"]
    assert _hf_ids(hf, "x!<|endoftext|>")[-1] == tok.eot_token_id
    spaced = tok.encode("x! <|endoftext|>")
    assert spaced == [343, 256, tok.eot_token_id] == _hf_ids(hf, "x! <|endoftext|>")
    if tok.uses_ftfy:
        assert tok.encode("Don’t") == tok.encode("don't") == [847, 713]


def test_random_strings_match_reference(tok: ClipTokenizer, reference: OpenAIReference) -> None:
    rng = random.Random(1234)
    alphabet = list("'’ſ\u0345<|>!?.,-_ \t\n\u00a0&#;0123456789aAsStTdDlLmMrReEvVxyz") + [
        SOT_TOKEN, EOT_TOKEN, "&amp;", "&lt;", "'s", "'ll", "'re", "ﬆ", "İ", "Σ", "ß", "e\u0301", "🐈", "👍🏽", "猫",
    ]  # fmt: skip
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(3000)]
    assert [tok.encode(t) for t in texts] == [reference.encode(t) for t in texts]


def test_without_ftfy_matches_reference_without_ftfy(reference: OpenAIReference) -> None:
    plain = ClipTokenizer(fix_text=False)
    assert not plain.uses_ftfy
    bare = OpenAIReference(None)
    for text in [*HARD_CASES, *HF_DIFFERENT]:
        assert plain.encode(text) == bare.encode(text), text
    assert plain.encode("fish &amp; chips") == plain.encode("fish & chips")  # html clean-up still runs
    custom = ClipTokenizer(fix_text=str.upper)  # any callable; lower-casing comes after it
    assert custom.encode("Cat") == [2368]


# --------------------------------------------------------------------------------------------------------------------
# context length and truncation


def test_context_length_boundary_and_truncation(tok: ClipTokenizer, hf) -> None:  # noqa: ANN001
    fits = " ".join(["cat"] * 75)  # 75 BPE ids + SOT + EOT = 77
    row = tok(fits)[0]
    assert row[0].item() == 49406 and row[-1].item() == 49407 and row[1:76].tolist() == [2368] * 75
    too_long = fits + " dog"
    with pytest.raises(ConfigError, match=r"78 tokens long .* context length 77") as info:
        tok(too_long)
    assert "truncate=True" in str(info.value)
    assert "cat cat" in str(info.value) and "..." in str(info.value) and too_long not in str(info.value)
    cut = tok(too_long, truncate=True)[0]
    assert cut.tolist() == [49406, *[2368] * 75, 49407]
    assert cut.argmax().item() == 76  # the EOT read-out position
    hf_cut = hf(too_long, truncation=True, max_length=77)["input_ids"]
    assert hf_cut == cut.tolist()


def test_very_long_classname_both_ways(tok: ClipTokenizer) -> None:
    name = "Supercalifragilisticexpialidocious " * 12 + "café au lait"
    ids = tok.encode(name)
    assert len(ids) > 75
    with pytest.raises(ConfigError, match=f"{len(ids) + 5 + 2} tokens long"):  # "a photo of a" + "." + SOT/EOT
        tok(["a cat", f"a photo of a {name}."])
    rows = tok([name, "a cat"], truncate=True)
    assert rows.shape == (2, 77)
    assert rows[0].tolist() == [49406, *ids[:75], 49407]
    assert rows[1, :4].tolist() == [49406, 320, 2368, 49407]
    short = tok(name, context_length=8, truncate=True)
    assert short.shape == (1, 8) and short[0].tolist() == [49406, *ids[:6], 49407]


def test_batch_shapes_and_padding(tok: ClipTokenizer) -> None:
    rows = tok(["a cat", "", "a photo of a dog."], context_length=10)
    assert rows.shape == (3, 10) and rows.dtype == torch.int64
    assert rows.tolist() == [
        [49406, 320, 2368, 49407, 0, 0, 0, 0, 0, 0],
        [49406, 49407, 0, 0, 0, 0, 0, 0, 0, 0],
        [49406, 320, 1125, 539, 320, 1929, 269, 49407, 0, 0],
    ]
    assert tok([]).shape == (0, 77)
    assert torch.equal(tokenize(["a cat", "a dog"]), tok(["a cat", "a dog"]))
    assert get_tokenizer() is get_tokenizer()


# --------------------------------------------------------------------------------------------------------------------
# decoding and errors


def test_decode_matches_reference(tok: ClipTokenizer, reference: OpenAIReference) -> None:
    assert tok.decode(tok.encode("A photo of a Cat.")) == "a photo of a cat . "
    assert tok.decode(torch.tensor([320, 2368])) == "a cat "
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 6))]
        assert tok.decode(ids) == reference.decode(ids)
    half_char = tok.encode("猫")[:1]  # first byte(s) of a multi-byte character
    assert tok.decode(half_char) == reference.decode(half_char)
    assert "\ufffd" in tok.decode(half_char)


def test_bad_input_raises_config_error(tok: ClipTokenizer) -> None:
    with pytest.raises(ConfigError, match="encodes str"):
        tok.encode(3)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="encodes str"):
        tok(["a cat", None])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="sequence of str"):
        tok(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="context_length"):
        tok("a cat", context_length=1)
    with pytest.raises(ConfigError, match="outside CLIP's vocabulary"):
        tok.id_to_token(49408)
    with pytest.raises(ConfigError, match="outside CLIP's vocabulary"):
        tok.decode([-1])
    with pytest.raises(ConfigError, match="not a symbol"):
        tok.token_to_id("a cat")  # symbols never hold a space
    assert tok.token_to_id("cat</w>") == 2368 and tok.token_to_id("cat") != 2368  # word end vs word piece


def test_bad_merges_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt.gz"
    with pytest.raises(ConfigError, match="cannot read"):
        ClipTokenizer(missing)
    plain = tmp_path / "plain.txt"
    plain.write_text("#version\ni n\n")
    with pytest.raises(ConfigError, match="not a gzip"):
        ClipTokenizer(plain)
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version\ni n\nt h\n"))
    with pytest.raises(ConfigError, match="holds 2 merges"):
        ClipTokenizer(short)


def test_import_is_light() -> None:
    code = "import sys, vlprompt.backbone.tokenizer; print('torch' in sys.modules, 'tokenizers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
