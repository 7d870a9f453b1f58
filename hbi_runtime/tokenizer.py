"""CLIP byte-level BPE tokenizer, id-for-id the one the official HBI loader uses.

The official HBI code (``HBI/models/tokenization_clip.py``, OpenAI CLIP's ``SimpleTokenizer``) and its
retrieval dataloaders (``HBI/dataloaders/dataloader_retrieval.py``, ``_get_text``) define the text input.
This is an independent implementation of the same behaviour (docs: reference/hbi-official.md, section 1.1):

* clean-up: ``ftfy.fix_text``, then ``html.unescape`` twice, strip; every run of Unicode white space
  (``regex`` ``\\s``) becomes one space; then lower-casing (after the clean-up, as CLIP does);
* pre-tokenisation with CLIP's word pattern (the ``regex`` package: ``\\p{L}`` / ``\\p{N}`` classes), which
  also matches the literal strings ``<|startoftext|>`` / ``<|endoftext|>`` as their special ids, as CLIP does;
* byte-level BPE with the first 48,894 merges of ``bpe_simple_vocab_16e6.txt.gz``; vocabulary of 49,408
  ids: 256 byte symbols, 256 end-of-word byte symbols, 48,894 merges, ``<|startoftext|>`` = 49406,
  ``<|endoftext|>`` = 49407;
* layout of one row (``_get_text``): the loader prepends SOT, cuts the list to ``max_words - 1`` and appends
  EOT, i.e. ``[SOT] + words[:L-2] + [EOT]``; ids are zero-padded to ``L`` and the mask is 1 on the real
  tokens (SOT, words, EOT) and 0 on padding.

Differences from the official loader, on purpose: an empty text (nothing left after clean-up) raises
:class:`~hbi_runtime.errors.BadInputError` instead of silently becoming ``[SOT, EOT]``; ``L`` must lie in
``[3, 77]`` (CLIP has 77 positional embeddings; below 3 no word fits).

Truncation is reported, not hidden: :meth:`ClipTokenizer.__call__` returns one ``truncated`` flag per text,
and logs one summary record at WARNING level on the ``hbi_runtime.tokenizer`` logger. Flags, not
``warnings.warn``: the CLI turns them into its own stderr line (or a JSON field) and a library caller can act
on them per text; ``warnings.warn`` would fire once per call site per process under the default filter, would
say nothing about which texts, and would be printed a second time next to the CLI's message. The logger has a
``NullHandler`` (the standard library convention), so the record is silent unless the application configures
logging.

``ftfy`` and ``regex`` are imported when a tokenizer is built, not when this module is imported, so that
``import hbi_runtime.tokenizer`` works on a box where they are missing (the error then names them).

The vocabulary file shipped in ``hbi_runtime/data/`` is byte-identical to the one in OpenAI CLIP, open_clip and
the HBI release (see ``hbi_runtime/data/README.txt`` for its source and ``LICENSE-clip-bpe.txt``).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import importlib.util
import logging
import marshal
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from hbi_runtime.errors import BadInputError, MissingDependencyError, UsageError
from hbi_runtime.fileio import user_cache_dir

__all__ = [
    "CONTEXT_LENGTH",
    "DEFAULT_VOCAB_PATH",
    "EOT_ID",
    "SOT_ID",
    "VOCAB_SHA256",
    "VOCAB_SIZE",
    "ClipTokenizer",
    "Word",
]

logger = logging.getLogger(__name__)
logger.addHandler(logging.NullHandler())

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # of the shipped file

N_MERGES = 49152 - 256 - 2  # 48,894: CLIP reads merges lines [1, 48895) of the file (line 0 is a header)
VOCAB_SIZE = 49408
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
CONTEXT_LENGTH = 77  # CLIP's positional embeddings: the largest usable max_words
MIN_MAX_WORDS = 3  # SOT + one word + EOT
WORD_CACHE_SIZE = 1 << 16  # distinct pre-tokenised words whose BPE ids are remembered

# CLIP's pre-tokenisation pattern (compiled with IGNORECASE, as CLIP does).
_WORD_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                 r"""|[^\s\p{L}\p{N}]+""")
_SYMBOLS = r"[^\s\p{L}\p{N}]+"  # the pattern's punctuation / symbol / emoji runs
_CONTRACTIONS = frozenset(("'s", "'t", "'re", "'ve", "'m", "'ll", "'d"))
EXACT_CHUNK_CHARS = 256  # longer runs without white space keep their cleaned spelling (offsets cost O(n^2) here)
_EMPTY_HINT = "give a caption with at least one visible character (white space and control characters are removed)"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255, in byte order (GPT-2 / CLIP byte-level BPE).

    Bytes that are printable Latin-1 (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    other 68 bytes are given the code points 256, 257, ... in byte order. Token ids 0..255 are these symbols in
    the *order of the printable group first*, see :func:`_byte_symbol_order`.
    """
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _byte_symbol_order() -> list[int]:
    """Bytes in the order in which their symbols take ids 0..255: the printable ones first, then the rest."""
    printable = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chosen = set(printable)
    return printable + [b for b in range(256) if b not in chosen]


@dataclass(frozen=True)
class Word:
    """One word of a text, as :meth:`ClipTokenizer.words` finds it.

    Attributes:
        text: the word as written in the text given (case, accents, emoji, any script), when ``exact``; else its
            cleaned, lower-cased spelling (what the tokenizer read).
        start, end: its place in the text given (``text[start:end]``); -1 when not ``exact``.
        first: index of its first BPE piece in :meth:`ClipTokenizer.encode`'s ids (row position ``1 + first``).
        pieces: how many BPE pieces it has.
        exact: ``text`` is the original spelling.
    """

    text: str
    start: int
    end: int
    first: int
    pieces: int
    exact: bool = True

    def positions(self, max_words: int) -> range:
        """Its row positions in a row of length ``max_words`` (SOT first), only those that fit."""
        last = max_words - 1  # EOT's place when the row is full
        return range(min(1 + self.first, last), min(1 + self.first + self.pieces, last))


class ClipTokenizer:
    """CLIP BPE tokenizer producing the official HBI loader's ``(ids, mask)`` rows.

    Args:
        vocab_path: the gzip BPE merges file; default: the copy shipped in ``hbi_runtime/data/``.
        max_words: ``L``, the row length including SOT and EOT (official default 32; MSR-VTT eval uses 24,
            ActivityNet 64).

    Raises:
        BadInputError: the vocabulary file is missing or malformed.
        UsageError: ``max_words`` is outside ``[3, 77]``.
        MissingDependencyError: ``ftfy`` or ``regex`` is not installed.
    """

    def __init__(self, vocab_path: str | Path | None = None, max_words: int = 32) -> None:
        # ftfy is imported on the first text that needs it (about 40 ms; printable ASCII never does, see clean),
        # but its absence is an error now, as regex's
        missing = next((name for name in ("ftfy", "regex") if importlib.util.find_spec(name) is None), None)
        if missing is not None:  # pragma: no cover - exercised only where the packages are missing
            raise MissingDependencyError(f"the CLIP tokenizer needs the '{missing}' package, which is not installed",
                                         hint="pip install ftfy regex")
        import regex
        self._word_re = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self._space_re = regex.compile(r"\s+")
        self._chunk_re = regex.compile(r"\S+")
        self._symbol_re = regex.compile(_SYMBOLS)

        self.max_words = _check_max_words(max_words)
        self.vocab_path = Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB_PATH
        self._byte_to_symbol = _byte_symbols()  # indexed by byte value
        self._id_of, self._rank = _load_tables(self.vocab_path)
        self._token_bytes_list: list[bytes] | None = None  # built on the first decode
        self._word_ids = lru_cache(maxsize=WORD_CACHE_SIZE)(self._bpe_ids)

    # ------------------------------------------------------------------ single text

    @staticmethod
    def _fix_text(text: str) -> str:
        import ftfy

        return ftfy.fix_text(text)

    def clean(self, text: str) -> str:
        """CLIP's clean-up: ftfy, HTML unescape twice, white space collapsed and stripped, lower-cased."""
        # Fast path (most captions): printable ASCII without '&' is a fixed point of ftfy.fix_text and of
        # html.unescape, so both are skipped; they are two thirds of the time otherwise. tests/runtime/
        # test_tokenizer.py checks the fixed-point claim on random printable ASCII.
        if not (text.isascii() and text.isprintable() and "&" not in text):
            text = html.unescape(html.unescape(self._fix_text(text))).strip()
        return self._space_re.sub(" ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text``, without SOT / EOT and without truncation (may be empty)."""
        ids: list[int] = []
        word_ids = self._word_ids
        for word in self._word_re.findall(self.clean(text)):
            ids.extend(word_ids(word))
        return ids

    def words(self, text: str) -> list[Word]:
        """The words of ``text`` with their BPE pieces: :meth:`encode`'s ids, grouped.

        A word is a run of the text without white space, less the punctuation / symbol runs at its start and end,
        which are words of their own ("dog," -> "dog", ","; "(hippopotamus)" -> "(", "hippopotamus", ")"; "don't",
        "t-shirt", "2024", "o'clock" stay whole, although CLIP splits them; a symbol run such as an emoji is one
        word). Each word keeps its exact spelling in ``text``: the pieces come from the cleaned, lower-cased text, so
        the word's place in ``text`` is found by cleaning prefixes of its run (a word whose place cannot be found
        that way, or in a run over ``EXACT_CHUNK_CHARS`` characters, keeps the cleaned spelling, ``exact=False``).
        The pieces of all words, in order, are exactly :meth:`encode`'s ids.
        """
        out: list[Word] = []
        pieces: list[int] = []
        for run in self._chunk_re.finditer(text):
            for start, end, spelled, ids, exact in self._run_words(run.group(), run.start()):
                out.append(Word(spelled, start, end, len(pieces), len(ids), exact))
                pieces += ids
        if pieces != self.encode(text):  # cleaning was not local to each run: words of the whole cleaned text
            out, pieces = [], []
            for spelled, ids in self._cleaned_words(self.clean(text)):
                out.append(Word(spelled, -1, -1, len(pieces), len(ids), False))
                pieces += ids
        return out

    def _cleaned_words(self, cleaned: str) -> list[tuple[str, tuple[int, ...]]]:
        """(spelling, ids) of the words of a cleaned text (no offsets)."""
        out = []
        for run in self._chunk_re.finditer(cleaned):
            for group in self._groups(list(self._word_re.finditer(run.group()))):
                ids = tuple(i for m in group for i in self._word_ids(m.group()))
                out.append((run.group()[group[0].start():group[-1].end()], ids))
        return out

    def _groups(self, tokens: list) -> list[list]:
        """Pre-tokens of one run without white space -> words: leading and trailing symbol runs split off."""
        wordy = [k for k, m in enumerate(tokens)
                 if not (self._symbol_re.fullmatch(m.group()) and m.group() not in _CONTRACTIONS)]
        if not wordy:
            return [[m] for m in tokens]
        a, b = wordy[0], wordy[-1]
        return [[m] for m in tokens[:a]] + [tokens[a:b + 1]] + [[m] for m in tokens[b + 1:]]

    def _run_words(self, run: str, offset: int) -> list[tuple[int, int, str, tuple[int, ...], bool]]:
        """(start, end, spelling, ids, exact) of the words of one run of the original text."""
        cleaned = self.clean(run)
        groups = self._groups(list(self._word_re.finditer(cleaned)))
        spans = [(g[0].start(), g[-1].end()) for g in groups]
        ids = [tuple(i for m in g for i in self._word_ids(m.group())) for g in groups]
        where = self._original_offsets(run, cleaned, sorted({e for span in spans for e in span}))
        out = []
        for (cs, ce), word_ids in zip(spans, ids):
            if where is not None and where.get(cs) is not None and where.get(ce) is not None:
                s, e = where[cs], where[ce]
                if s < e and self.clean(run[s:e]) == cleaned[cs:ce]:
                    out.append((offset + s, offset + e, run[s:e], word_ids, True))
                    continue
            out.append((-1, -1, cleaned[cs:ce], word_ids, False))
        return out

    def _original_offsets(self, run: str, cleaned: str, cuts: list[int]) -> dict[int, int | None] | None:
        """For each offset ``cut`` in ``cleaned`` (= clean(run)), the matching offset in ``run``: the longest prefix
        of ``run`` that cleans to ``cleaned[:cut]`` (so "&lt;" stays whole); None where no prefix does."""
        if len(cleaned) == len(run) and cleaned == run.lower():  # cleaning only lower-cased it, char for char
            return {c: c for c in cuts}
        if len(run) > EXACT_CHUNK_CHARS:
            return None
        prefixes = [self.clean(run[:k]) for k in range(len(run) + 1)]
        out: dict[int, int | None] = {}
        for cut in cuts:
            target = cleaned[:cut]
            out[cut] = max((k for k, p in enumerate(prefixes) if p == target), default=None)
        if len(cleaned) in out:
            out[len(cleaned)] = len(run)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Text of a row or of :meth:`encode` output.

        A leading SOT is skipped and decoding stops at the first EOT (so zero padding after it is ignored);
        a special token anywhere else is written as its name. End-of-word markers become spaces and the
        trailing space is dropped. Bytes that are not valid UTF-8 (a multi-byte character cut by truncation)
        become U+FFFD.
        """
        out = bytearray()
        for pos, raw in enumerate(ids):
            i = int(raw)
            if not 0 <= i < VOCAB_SIZE:
                raise BadInputError(f"token id {i} at position {pos} is outside the CLIP vocabulary [0, {VOCAB_SIZE})")
            if i == EOT_ID:
                break
            if i == SOT_ID:
                if pos == 0:
                    continue
                out += SOT_TOKEN.encode()
            else:
                out += self._token_bytes()[i]
        return out.decode("utf-8", errors="replace").rstrip(" ")

    def _token_bytes(self) -> list[bytes]:
        """Bytes of each ordinary token (the end-of-word marker becomes a space), by id; built once."""
        if self._token_bytes_list is None:
            symbol_to_byte = {sym: b for b, sym in enumerate(self._byte_to_symbol)}
            vocab = list(self._id_of)[:SOT_ID]  # the dict holds the tokens in id order
            self._token_bytes_list = [bytes(symbol_to_byte[c] for c in tok.removesuffix("</w>"))
                                      + (b" " if tok.endswith("</w>") else b"") for tok in vocab]
        return self._token_bytes_list

    # ------------------------------------------------------------------ batch

    def __call__(self, texts: Sequence[str], max_words: int | None = None,
                 ) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """Tokenise a batch as the official loader does.

        Args:
            texts: the captions / queries.
            max_words: ``L`` for this call; default: the tokenizer's ``max_words``.

        Returns:
            ``(ids, mask, truncated)``: ``ids`` int64 ``[B, L]`` = ``[SOT] + words[:L-2] + [EOT]`` then zeros;
            ``mask`` int64 ``[B, L]``, 1 on SOT, words and EOT; ``truncated[i]`` is True when text ``i`` had
            more than ``L - 2`` BPE tokens and lost the rest.

        Raises:
            BadInputError: a text is not a string, or is empty once cleaned (``"text N is empty"``).
            UsageError: ``texts`` is a single string, or ``max_words`` is outside ``[3, 77]``.
        """
        if isinstance(texts, (str, bytes)):
            raise UsageError("texts must be a list of strings, not a single string",
                             hint="wrap one text in a list: tokenizer([text])")
        length = self.max_words if max_words is None else _check_max_words(max_words)
        keep = length - 2
        texts = list(texts)
        ids = np.zeros((len(texts), length), dtype=np.int64)
        n_real = np.zeros(len(texts), dtype=np.int64)
        truncated: list[bool] = []
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise BadInputError(f"text {row} is not a string (got {type(text).__name__})")
            words = self.encode(text)
            if not words:
                raise BadInputError(f"text {row} is empty", hint=_EMPTY_HINT)
            truncated.append(len(words) > keep)
            words = words[:keep]
            n = len(words) + 2
            ids[row, 0] = SOT_ID
            ids[row, 1:n - 1] = words
            ids[row, n - 1] = EOT_ID
            n_real[row] = n
        mask = (np.arange(length)[None, :] < n_real[:, None]).astype(np.int64)
        if any(truncated):
            cut = [i for i, t in enumerate(truncated) if t]
            logger.warning("%d of %d texts are longer than max_words=%d (%d BPE tokens + SOT + EOT) and were "
                           "truncated: text %s", len(cut), len(texts), length, keep,
                           ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else ""))
        return ids, mask, truncated

    # ------------------------------------------------------------------ BPE

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """BPE ids of one pre-tokenised word (cached by ``self._word_ids``).

        The word's UTF-8 bytes become byte symbols, the last one marked end-of-word; then the adjacent pair
        with the lowest merge rank is merged everywhere (left to right, non-overlapping) until no adjacent pair
        is a known merge.
        """
        if word == SOT_TOKEN or word == EOT_TOKEN:
            return (self._id_of[word],)
        to_symbol = self._byte_to_symbol
        symbols = "".join(to_symbol[b] for b in word.encode("utf-8", errors="surrogatepass"))
        parts = list(symbols[:-1])
        parts.append(symbols[-1] + "</w>")
        rank = self._rank
        while len(parts) > 1:
            best, best_rank = None, N_MERGES
            for pair in zip(parts, parts[1:]):
                r = rank.get(pair, N_MERGES)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(parts)
            while i < n:
                if i < n - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        id_of = self._id_of
        return tuple(id_of[p] for p in parts)


def _check_max_words(max_words: int) -> int:
    if isinstance(max_words, bool) or not isinstance(max_words, (int, np.integer)):
        raise UsageError(f"max_words must be an integer, got {max_words!r}")
    if not MIN_MAX_WORDS <= int(max_words) <= CONTEXT_LENGTH:
        raise UsageError(f"max_words={max_words} is outside [{MIN_MAX_WORDS}, {CONTEXT_LENGTH}]",
                         hint="CLIP rows hold SOT, at least one word and EOT, in at most 77 positions")
    return int(max_words)


TABLES_FORMAT = 1  # of the cached tables below; a change of their layout bumps it


def _build_tables(path: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """The id of each token and the rank of each merge pair, from the merges file (about 0.15 s of CPU)."""
    merges = _read_merges(path)
    symbols = _byte_symbols()
    base = [symbols[b] for b in _byte_symbol_order()]
    vocab = base + [s + "</w>" for s in base] + [a + b for a, b in merges] + [SOT_TOKEN, EOT_TOKEN]
    id_of = {tok: i for i, tok in enumerate(vocab)}
    if len(vocab) != VOCAB_SIZE or len(id_of) != VOCAB_SIZE:
        raise BadInputError(
            f"{path}: the BPE merges give {len(id_of)} distinct tokens, expected {VOCAB_SIZE}",
            hint="use the CLIP file bpe_simple_vocab_16e6.txt.gz (or leave vocab_path unset)")
    return id_of, {pair: i for i, pair in enumerate(merges)}


def tables_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hbi-toolkit/bpe`` (``~/.cache`` by default), where the built tables are kept."""
    return user_cache_dir("bpe")


def _load_tables(path: Path) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    """:func:`_build_tables`, cached on disk by the content of the merges file (read back in a few ms).

    The cache file is named by the SHA-256 of the merges file, so an edited or different vocabulary never meets
    another's tables; it is written atomically, and one that cannot be read or does not hold tables of the
    expected sizes is rebuilt. A cache that cannot be written (read-only home) only costs the build each time.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BadInputError(f"BPE vocabulary file not found: {path}",
                            hint="leave vocab_path unset to use the shipped bpe_simple_vocab_16e6.txt.gz") from None
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read the BPE merges file ({exc})") from None
    cache = tables_cache_dir() / f"{hashlib.sha256(raw).hexdigest()[:32]}-v{TABLES_FORMAT}.marshal"
    try:
        fmt, id_of, rank = marshal.loads(cache.read_bytes())
        if (fmt == TABLES_FORMAT and isinstance(id_of, dict) and isinstance(rank, dict)
                and len(id_of) == VOCAB_SIZE and len(rank) == N_MERGES):
            return id_of, rank
    except (OSError, ValueError, EOFError, TypeError):  # absent or damaged: built again below
        pass
    id_of, rank = _build_tables(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_bytes(marshal.dumps((TABLES_FORMAT, id_of, rank)))
        os.replace(tmp, cache)
    except OSError as exc:
        logger.debug("BPE tables not cached at %s: %s", cache, exc)
    return id_of, rank


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with gzip.open(path, "rb") as fh:
            lines = fh.read().decode("utf-8").split("\n")
    except FileNotFoundError:
        raise BadInputError(f"BPE vocabulary file not found: {path}",
                            hint="leave vocab_path unset to use the shipped bpe_simple_vocab_16e6.txt.gz") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: not a gzip-compressed UTF-8 BPE merges file ({exc})") from None
    merges = []
    for number, line in enumerate(lines[1:N_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise BadInputError(f"{path}: line {number} is not a BPE merge 'a b': {line[:80]!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != N_MERGES:
        raise BadInputError(f"{path}: {len(merges)} BPE merges, expected at least {N_MERGES}")
    return merges
