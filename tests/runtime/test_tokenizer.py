"""hbi_runtime.tokenizer: CLIP BPE ids and rows identical to the official HBI loader's.

Where the expected ids come from. Every expected id list here and in fixtures/tokenizer_expected.json was
computed with the OFFICIAL HBI tokenizer, ``HBI/models/tokenization_clip.py`` of the HBI release (OpenAI CLIP's
``SimpleTokenizer``; file sha256 60af2ecc..., recorded in the fixture) under ftfy 6.3.1 and regex 2026.11.19, by a
generator script run outside the repository (the official code is not part of hbi-toolkit):

* it loads ``tokenization_clip.py`` by file path (``importlib.util.spec_from_file_location``) and calls
  ``SimpleTokenizer().encode(text)`` for the hand-written sentences of ``KNOWN`` below and for 1000 random
  strings (``random.Random(20240607)``; 1-12 items each, drawn from caption words, punctuation runs, accented /
  CJK / Greek / Cyrillic letters, emoji incl. ZWJ sequences and flags, HTML entities, mojibake, control
  characters, many kinds of Unicode white space, digits, contractions, the literal special-token strings and
  random code points below U+3000) -> fixture key ``random``;
* for the first 200 random strings it runs the official loader's ``RetrievalDataset._get_text`` (taken from
  ``HBI/dataloaders/dataloader_retrieval.py`` with ``ast``, called on a stand-in ``self`` whose tokenizer is the
  official one) with ``max_words=24`` -> fixture key ``rows_L24`` (ids, and the number of mask-1 positions; the
  official mask is always 1s then 0s).

open_clip 3.3.0's ``SimpleTokenizer`` gives the same ids for every ``KNOWN`` case except the literal special-token
one (open_clip renamed its special tokens to ``<start_of_text>`` / ``<end_of_text>``), which is why the official
file is the reference. The implementation was also compared with the official tokenizer on 150,000 further
random strings (0 differences) while it was written.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import hbi_runtime
from hbi_runtime.errors import EXIT_BAD_INPUT, BadInputError, UsageError
from hbi_runtime.tokenizer import (
    CONTEXT_LENGTH,
    DEFAULT_VOCAB_PATH,
    EOT_ID,
    SOT_ID,
    VOCAB_SHA256,
    VOCAB_SIZE,
    ClipTokenizer,
)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tokenizer_expected.json"

_FOX = [518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929]  # "the quick brown fox jumps over the lazy dog"

# (name, text, official ids without SOT / EOT) -- see the module docstring for their origin.
KNOWN = [
    ("simple", "a man is playing a guitar",
     [320, 786, 533, 1629, 320, 5084]),
    ("punctuation_numbers", "Hello, World!!! It's 3:45pm -- 1,000 people (approx.) watched #42...",
     [3306, 267, 1002, 995, 585, 568, 274, 281, 275, 276, 990, 2432, 272, 267, 271, 271, 271, 1047, 263, 18266,
      5376, 5775, 258, 275, 273, 678]),
    ("accents", "Crème brûlée à la française, naïve café in São Paulo; Ærø Øresund",
     [1075, 12138, 614, 711, 127, 119, 75, 13489, 21259, 1210, 38381, 30505, 267, 1097, 35689, 563, 15304, 530,
      45911, 21628, 282, 42495, 81, 45598, 17483, 515, 40735]),
    ("cjk", "一个男人在弹吉他 日本語のテキスト 한국어 문장",
     [19759, 222, 19759, 103, 20211, 115, 36839, 37746, 101, 161, 120, 117, 41673, 231, 37743, 500, 39121, 44353,
      34002, 252, 21575, 2429, 228, 47121, 32421, 486, 15197, 250, 31871, 255, 31625, 368, 167, 105, 116, 20849,
      354]),
    ("emoji", "a dog 🐶 plays fetch 🎾👍🏽 with a family 👨\u200d👩\u200d👧 in 🇫🇷 ❤️",
     [320, 1929, 10631, 5134, 30271, 41982, 43722, 593, 320, 1315, 25023, 26304, 964, 356, 530, 16223, 1752]),
    # ftfy repairs UTF-8 read as Windows-1252: "cafÃ©" -> "café", "â€œ" / "â€\x9d" / "â€™" -> curly quotes
    # (then uncurled).
    ("mojibake", "The cafÃ© owner said â€œhelloâ€\x9d and didnâ€™t smile",
     [518, 15304, 5019, 1946, 257, 3306, 257, 537, 2376, 713, 3490]),
    # ftfy unescapes once (no '<' in the text), then html.unescape twice: "&amp;amp;" -> "&".
    ("html_entities",
     "tom &amp; jerry &lt;b&gt;chase&lt;/b&gt; &quot;fun&quot; &amp;amp; &#39;more&#39; &eacute;t&eacute;",
     [2435, 261, 9164, 283, 321, 285, 3859, 34308, 321, 285, 257, 1499, 257, 261, 880, 1423, 262, 3459, 39694]),
    ("whitespace", "  a   woman\t\tis \n\n cooking\r\n in\u00a0a\u3000kitchen  \x1c  ",
     [320, 2308, 533, 6283, 530, 320, 4485]),
    ("case_and_contractions", "SHE'S RUNNING; We'll SEE, they've GONE, I'M here, DON'T stop",
     [1043, 568, 2761, 282, 649, 1342, 862, 267, 889, 1200, 3601, 267, 328, 880, 763, 267, 847, 713, 1691]),
    # CLIP's word pattern matches the special-token strings, so typed-in markers become the special ids.
    ("special_token_literal", "before <|startoftext|> middle <|endoftext|> after",
     [1348, SOT_ID, 3694, EOT_ID, 953]),
    ("long", " ".join(["the quick brown fox jumps over the lazy dog"] * 12), _FOX * 12),
    ("fullwidth_ligatures", "\uff21\uff22\uff23\uff11\uff12\uff13 \ufb01sh \ufb02ow \ufb00",
     [5334, 272, 273, 274, 2759, 5608, 1304]),
    ("combining_marks", "e\u0301te\u0301 cafe\u0301 n\u0303",
     [3459, 39694, 15304, 127, 365]),
]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads(FIXTURE.read_text(encoding="ascii"))


# ---------------------------------------------------------------------------------------------- vocabulary


def test_shipped_vocabulary_is_the_clip_file_with_its_license():
    data = DEFAULT_VOCAB_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == VOCAB_SHA256
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    assert lines[0].startswith("\"bpe_simple_vocab_16e6.txt#version")
    folder = DEFAULT_VOCAB_PATH.parent
    license_text = (folder / "LICENSE-clip-bpe.txt").read_text(encoding="utf-8")
    assert "Copyright (c) 2021 OpenAI" in license_text and "MIT License" in license_text
    assert "open-clip-torch 3.3.0" in license_text
    readme = (folder / "README.txt").read_text(encoding="utf-8")
    assert VOCAB_SHA256 in readme and "open_clip/bpe_simple_vocab_16e6.txt.gz" in readme


def test_vocabulary_layout(tok):
    assert VOCAB_SIZE == 49408 and SOT_ID == 49406 and EOT_ID == 49407
    # ids 0..255 are the byte symbols ('!' is 0), 256..511 the same with the end-of-word marker
    assert tok.encode("!") == [256] and tok.encode("!!") == [748]
    assert tok.decode([0, 256]) == "!!"
    assert tok.decode(list(range(SOT_ID))).count(" ") > 0  # every ordinary id decodes


def test_bad_vocabulary_files(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        ClipTokenizer(tmp_path / "missing.txt.gz")
    (tmp_path / "plain.txt.gz").write_text("not gzip")
    with pytest.raises(BadInputError, match="gzip"):
        ClipTokenizer(tmp_path / "plain.txt.gz")
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\nt h\nth e</w>\n"))
    with pytest.raises(BadInputError):
        ClipTokenizer(short)


# ---------------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize(("text", "ids"), [(t, i) for _, t, i in KNOWN], ids=[n for n, _, _ in KNOWN])
def test_known_ids(tok, text, ids):
    assert tok.encode(text) == ids


def test_1000_random_strings_match_the_official_tokenizer(tok, expected):
    cases = expected["random"]
    assert len(cases) == 1000
    wrong = [(i, c["text"], tok.encode(c["text"]), c["ids"]) for i, c in enumerate(cases)
             if tok.encode(c["text"]) != c["ids"]]
    assert not wrong, f"{len(wrong)} mismatches, first: {wrong[0]!r}"


def test_rows_match_the_official_loader(tok, expected):
    """``__call__`` at L=24 against the official ``_get_text`` rows (SOT + words[:22] + EOT, zero padded)."""
    rows = expected["rows_L24"]
    texts = [c["text"] for c in expected["random"][: len(rows)]]
    usable = [i for i, c in enumerate(expected["random"][: len(rows)]) if c["ids"]]  # empty texts: we refuse
    ids, mask, truncated = tok([texts[i] for i in usable], max_words=24)
    want_ids = np.array([rows[i]["ids"] for i in usable], dtype=np.int64)
    want_n = np.array([rows[i]["n_real"] for i in usable])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask.sum(1), want_n)
    np.testing.assert_array_equal(mask, (np.arange(24)[None, :] < want_n[:, None]).astype(np.int64))
    n_words = np.array([len(expected["random"][i]["ids"]) for i in usable])
    assert truncated == list(n_words > 22)
    assert 0 < sum(truncated) < len(usable)


# ---------------------------------------------------------------------------------------------- rows


def test_row_layout(tok):
    ids, mask, truncated = tok(["a man is playing a guitar", "Hi!"])
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, 32)
    assert ids[0, :8].tolist() == [SOT_ID, 320, 786, 533, 1629, 320, 5084, EOT_ID]
    assert (ids[0, 8:] == 0).all()
    assert mask[0].tolist() == [1] * 8 + [0] * 24
    assert ids[1, : 2 + len(tok.encode("Hi!"))][[0, -1]].tolist() == [SOT_ID, EOT_ID]
    assert truncated == [False, False]
    assert (ids.argmax(1) == mask.sum(1) - 1).all()  # EOT is the largest id: argmax finds it (CLIP's pooling)


def test_max_words_per_call_and_default(tok):
    assert tok(["a dog"])[0].shape == (1, 32)
    assert tok(["a dog"], max_words=24)[0].shape == (1, 24)
    assert ClipTokenizer(max_words=64)(["a dog"])[0].shape == (1, 64)
    assert tok([], max_words=24)[0].shape == (0, 24)


def test_truncation_flags_and_boundary(tok, caplog):
    length = 8
    words = tok.encode("one two three four five six seven eight nine")
    assert len(words) == 9
    exact = " ".join(["dog"] * (length - 2))  # fits exactly: not truncated
    over = " ".join(["dog"] * (length - 1))
    with caplog.at_level(logging.WARNING, logger="hbi_runtime.tokenizer"):
        ids, mask, truncated = tok(["one two three four five six seven eight nine", exact, over, "a cat"],
                                   max_words=length)
    assert truncated == [True, False, True, False]
    assert ids[0].tolist() == [SOT_ID, *words[: length - 2], EOT_ID]
    assert mask[:3].min() == 1 and ids[:3, -1].tolist() == [EOT_ID] * 3
    assert ids[1].tolist() == ids[2].tolist()
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "2 of 4 texts" in caplog.records[0].getMessage() and "text 0, 2" in caplog.records[0].getMessage()


def test_no_log_record_without_truncation(tok, caplog):
    with caplog.at_level(logging.DEBUG, logger="hbi_runtime.tokenizer"):
        tok(["a short caption"])
    assert not caplog.records


@pytest.mark.parametrize("text", ["", " ", "   \t\n  ", "\u3000\u00a0\r\n", "\x00\x07\x1b"],
                         ids=["empty", "space", "mixed-ascii-space", "unicode-space", "control-only"])
def test_empty_text_is_rejected_with_its_index(tok, text):
    """The official loader would silently give [SOT, EOT] (an embedding of nothing); we refuse."""
    with pytest.raises(BadInputError) as info:
        tok(["a dog runs", text])
    assert info.value.message == "text 1 is empty"
    assert info.value.hint and info.value.exit_code == EXIT_BAD_INPUT
    assert tok.encode(text) == []


def test_bad_arguments(tok):
    with pytest.raises(UsageError, match="single string"):
        tok("a dog")
    with pytest.raises(BadInputError, match="text 1 is not a string"):
        tok(["a dog", 3])
    for bad in (2, 0, -5, CONTEXT_LENGTH + 1, 3.0, True, "32"):
        with pytest.raises(UsageError):
            tok(["a dog"], max_words=bad)
        with pytest.raises(UsageError):
            ClipTokenizer(max_words=bad)
    assert tok(["a dog runs fast"], max_words=3)[0].tolist() == [[SOT_ID, 320, EOT_ID]]
    assert tok(["a dog"], max_words=np.int64(CONTEXT_LENGTH))[0].shape == (1, CONTEXT_LENGTH)


# ---------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("text", ["a man is playing a guitar", "two girls dancing in the kitchen",
                                  "café crème", "一个男人"])
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_rows_and_errors(tok):
    ids, _, _ = tok(["A Man, playing GUITAR!"])
    assert tok.decode(ids[0]) == "a man , playing guitar !"  # SOT skipped, stops at EOT, padding ignored
    assert tok.decode([]) == ""
    with pytest.raises(BadInputError, match="outside the CLIP vocabulary"):
        tok.decode([320, VOCAB_SIZE])
    with pytest.raises(BadInputError):
        tok.decode([-1])


# ---------------------------------------------------------------------------------------------- fast path


def test_ascii_fast_path_is_exact(tok):
    """Printable ASCII without '&' skips ftfy / html.unescape; check that they would not change it."""
    import html

    import ftfy

    rng = random.Random(5)
    alphabet = [chr(c) for c in range(0x20, 0x7F) if chr(c) != "&"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        assert html.unescape(html.unescape(ftfy.fix_text(text))) == text, repr(text)


def test_ten_thousand_captions_are_fast():
    rng = random.Random(0)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(2000)]
    captions = [" ".join(rng.choice(vocab) for _ in range(rng.randint(6, 20))) for _ in range(10_000)]
    tok = ClipTokenizer(max_words=32)  # fresh: cold word cache
    start = time.perf_counter()
    ids, _, _ = tok(captions)
    elapsed = time.perf_counter() - start
    assert ids.shape == (10_000, 32)
    assert elapsed < 10.0, f"10k captions took {elapsed:.2f} s"  # ~0.15 s on a 2-core CPU box


# ---------------------------------------------------------------------------------------------- no torch


def test_tokenizer_works_without_torch(tmp_path):
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from hbi_runtime.tokenizer import ClipTokenizer\n"
        "ids, mask, _ = ClipTokenizer()(['a man is playing a guitar'])\n"
        "assert ids[0, :3].tolist() == [49406, 320, 786], ids\n"
        "assert 'torch' not in sys.modules\n"
    )
    # the hbi_runtime this test imported (installed or a checkout on sys.path), not whatever cwd offers
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(hbi_runtime.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, check=False, env=env)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------- cached BPE tables


def test_bpe_tables_are_cached_by_content_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    import hbi_runtime.tokenizer as tok

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    fresh = ClipTokenizer()  # builds the tables and writes the cache
    files = list(tok.tables_cache_dir().glob("*.marshal"))
    assert len(files) == 1 and files[0].name.startswith(tok.VOCAB_SHA256[:32])
    text = "a red circle appears, then a blue square — twice"
    expected = (fresh.encode(text), fresh.decode(fresh.encode(text)))

    def no_build(path):
        raise AssertionError("the tables were built although a cache exists")

    monkeypatch.setattr(tok, "_build_tables", no_build)
    cached = ClipTokenizer()  # read back, not built
    assert (cached.encode(text), cached.decode(cached.encode(text))) == expected
    assert cached._id_of == fresh._id_of and cached._rank == fresh._rank
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    files[0].write_bytes(files[0].read_bytes()[:1000])  # damaged: built again and rewritten
    rebuilt = ClipTokenizer()
    assert rebuilt.encode(text) == expected[0]
    assert len(files[0].read_bytes()) > 1000

    # another vocabulary (same merges, one extra trailing line) gets its own cache file
    other = tmp_path / "other.txt.gz"
    with gzip.open(DEFAULT_VOCAB_PATH, "rb") as src, gzip.open(other, "wb") as dst:
        dst.write(src.read() + b"\n")
    assert ClipTokenizer(other).encode(text) == expected[0]
    assert len(list(tok.tables_cache_dir().glob("*.marshal"))) == 2


def test_bpe_tables_work_without_a_writable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert ClipTokenizer().encode("a red circle") == ClipTokenizer().encode("a red circle") != []
