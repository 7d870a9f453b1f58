"""Torch-free tests of captioning: search semantics on toy scorers, metrics against hand computation, the CLI on
the shipped demo caption package, bad input."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hbi_runtime.cli import app
from hbi_runtime.errors import BadInputError, UsageError
from hbi_runtime.tasks.generate import SearchOptions, banned_tokens, generate
from hbi_runtime.tasks.metrics import bleu, caption_metrics, cider_d, lcs, rouge_l

A, B, C, EOS = 0, 1, 2, 3
V = 4
DEMO = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo"


class Toy:
    """A step model whose next-token distribution is a table keyed by the generated tokens (per item).

    ``tables[item][generated] = {token: probability}``; missing tokens have probability 0; a missing key falls
    back to ``default``. The state is the generated tokens of each row (no cache)."""

    def __init__(self, tables, default=None):
        self.tables, self.default = tables, default
        self.calls = 0

    def _logp(self, items, gens):
        out = np.full((len(items), V), -np.inf)
        for r, (it, g) in enumerate(zip(items, gens)):
            dist = self.tables[int(it)].get(tuple(g), self.default)
            for tok, p in dist.items():
                out[r, tok] = math.log(p)
        return out

    def init(self, items, prefix):
        gens = [()] * len(items)
        return self._logp(items, gens), (np.asarray(items), gens)

    def step(self, state, parents, tokens):
        self.calls += 1
        items = state[0][parents]
        gens = [state[1][p] + (int(t),) for p, t in zip(parents, tokens)]
        return self._logp(items, gens), (items, gens)


# beam search beats greedy: greedy takes A (0.5) then A (0.3, tie with B broken to the lower id) then EOS:
# 0.5 * 0.3 = 0.15; [B, C] has 0.4 * 0.9 = 0.36.
TABLE_BEAM = {(): {A: 0.5, B: 0.4, C: 0.1}, (A,): {A: 0.3, B: 0.3, C: 0.2, EOS: 0.2}, (B,): {C: 0.9, EOS: 0.1},
              (A, A): {EOS: 1.0}, (A, B): {EOS: 1.0}, (B, C): {EOS: 1.0}}
# length penalty: [A]+EOS has log 0.6 over 2 tokens; [B, C, A]+EOS has log 0.4 over 4 tokens.
TABLE_LENGTH = {(): {A: 0.6, B: 0.4}, (A,): {EOS: 1.0}, (B,): {C: 1.0}, (B, C): {A: 1.0}, (B, C, A): {EOS: 1.0}}
REPEATER = {A: 0.7, B: 0.2, EOS: 0.1}


def run(tables, options, n=1, default=None):
    return generate(Toy([tables] * n, default), [[9]] * n, EOS, options)


def test_greedy_takes_the_argmax_with_low_id_ties():
    (h,) = run(TABLE_BEAM, SearchOptions(beam_size=1))
    assert h.tokens == (A, A) and h.ended
    assert h.logprob == pytest.approx(math.log(0.5 * 0.3))


def test_beam_search_finds_the_better_sequence():
    (h,) = run(TABLE_BEAM, SearchOptions(beam_size=2, length_penalty=0.0))
    assert h.tokens == (B, C)
    assert h.logprob == pytest.approx(math.log(0.36))


def test_length_penalty_changes_the_winner():
    (short,) = run(TABLE_LENGTH, SearchOptions(beam_size=2, length_penalty=0.0))
    assert short.tokens == (A,) and short.score == pytest.approx(math.log(0.6))
    (long,) = run(TABLE_LENGTH, SearchOptions(beam_size=2, length_penalty=1.0))
    # log(0.4) / 4 = -0.229 beats log(0.6) / 2 = -0.255
    assert long.tokens == (B, C, A) and long.score == pytest.approx(math.log(0.4) / 4)


def test_no_repeat_ngram():
    (plain,) = run({}, SearchOptions(max_length=5), default=REPEATER)
    assert plain.tokens == (A,) * 5 and not plain.ended  # cut at max_length, no EOS
    # bigrams: A A, then A is banned after A (A A exists) -> B, then A (no "B A" yet), then A and B banned
    (two,) = run({}, SearchOptions(max_length=10, no_repeat_ngram=2), default=REPEATER)
    assert two.tokens == (A, A, B, A) and two.ended
    (one,) = run({}, SearchOptions(max_length=10, no_repeat_ngram=1), default=REPEATER)
    assert one.tokens == (A, B) and one.ended
    assert banned_tokens([1, 2, 3, 1, 2], 3) == {3}
    assert banned_tokens([1, 2], 3) == set()
    assert banned_tokens([5, 5], 1) == {5}


def test_eos_first_gives_an_empty_caption_and_max_length_cuts():
    (h,) = run({(): {EOS: 0.9, A: 0.1}}, SearchOptions(beam_size=3), default={EOS: 1.0})
    assert h.tokens == () and h.ended
    (h,) = run({}, SearchOptions(max_length=3), default={B: 1.0})
    assert h.tokens == (B, B, B) and not h.ended


def test_batched_items_equal_single_items():
    tables = [TABLE_BEAM, TABLE_LENGTH, {(): {EOS: 1.0}}]
    for beam in (1, 2, 3):
        o = SearchOptions(beam_size=beam, length_penalty=0.5)
        batched = generate(Toy(tables, {EOS: 1.0}), [[9]] * 3, EOS, o)
        single = [generate(Toy([t], {EOS: 1.0}), [[9]], EOS, o)[0] for t in tables]
        assert [h.tokens for h in batched] == [h.tokens for h in single]


def test_prefixes_of_different_lengths_are_grouped():
    hyps = generate(Toy([TABLE_BEAM, TABLE_BEAM]), [[9], [9, 9]], EOS, SearchOptions())
    assert [h.tokens for h in hyps] == [(A, A), (A, A)]
    with pytest.raises(UsageError):
        generate(Toy([TABLE_BEAM]), [[]], EOS, SearchOptions())


@pytest.mark.parametrize("kwargs", [{"beam_size": 0}, {"max_length": 0}, {"no_repeat_ngram": -1},
                                    {"length_penalty": float("nan")}])
def test_bad_search_options(kwargs):
    with pytest.raises(UsageError):
        SearchOptions(**kwargs)


# ------------------------------------------------------------------------------------------------ metrics
CAND, REF = "The cat is on the mat.", "the cat is on the red mat"


def test_bleu4_by_hand():
    # p1 = 6/6, p2 = 4/5, p3 = 3/4, p4 = 2/3; c = 6, r = 7: BP = exp(1 - 7/6)
    want = math.exp(1 - 7 / 6) * (1 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu([CAND], [[REF]]) == pytest.approx(want)
    assert bleu(["a b c d"], [["a b c d"]]) == pytest.approx(1.0)
    assert bleu(["x y z w"], [["a b c d"]]) == 0.0
    # clipping: p1 = 2/4 (two "the" in the reference), no bigram "the the" in it: p2 = 0 -> BLEU 0
    assert bleu(["the the the the"], [["the cat the mat"]]) == 0.0


def test_rouge_l_by_hand():
    assert lcs("a b c d".split(), "a c d".split()) == 3
    p, r = 6 / 6, 6 / 7
    assert rouge_l([CAND], [[REF]]) == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))
    # the best reference for precision and recall separately: "a x" vs refs ["a", "a x y z"]
    p, r = max(1 / 2, 2 / 2), max(1 / 1, 2 / 4)
    assert rouge_l(["a x"], [["a", "a x y z"]]) == pytest.approx((1 + 1.44) * p * r / (r + 1.44 * p))


def test_cider_d_by_hand():
    # two items whose n-grams each occur in one item only (idf = log 2 everywhere): identical two-word captions
    # match at n = 1 and 2 (similarity 1) and have no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # "a b" vs "a c": unigram cosine with clipping = log2^2 / (sqrt2 log2)^2 = 1/2, no bigram match -> 1.25;
    # "x" vs "y": 0. Mean 0.625
    assert cider_d(["a b", "x"], [["a c"], ["y"]]) == pytest.approx(0.625)
    # the length penalty: identical unigrams, lengths 2 vs 3 -> exp(-1 / 72) at n = 1
    value = cider_d(["a a", "q"], [["a a a"], ["z"]])
    assert value == pytest.approx(10 * (1.0 * math.exp(-1 / 72) + (1.0 * math.exp(-1 / 72))) / 4 / 2)


def test_metrics_bad_input():
    with pytest.raises(BadInputError):
        bleu(["a"], [])
    with pytest.raises(BadInputError):
        rouge_l([], [])
    with pytest.raises(BadInputError):
        cider_d(["a"], ["a"])  # a string is not a list of references
    m = caption_metrics(["a b"], [["a b"]])
    assert m["meteor"] is None and "offline" in m["meteor_note"]


# ------------------------------------------------------------------------------------------------ CLI, demo
runner = CliRunner()
needs_demo = pytest.mark.skipif(not (DEMO / "caption" / "manifest.json").is_file(),
                                reason="the demo caption package is not built")


def _canonical() -> dict[str, str]:
    queries = json.loads((DEMO / "queries.json").read_text())["queries"]
    return {q["expected"]: q["query"] for q in queries if q["kind"] == "canonical"}


CLAUSE = re.compile(r"^(a|the) (red|green|blue|yellow) (square|circle|triangle|cross) "
                    r"(moves (left|right|up|down)|appears|disappears|turns (red|green|blue|yellow))$")


@needs_demo
def test_caption_cli_on_the_demo_samples():
    """Every sample gets a grammatical caption with its reference's number of events, in the canonical form.

    (Not every attribute is right: the demo decoder names all attributes of only a few held-out videos, because
    the demo retrieval model's video side encodes shapes and motions weakly; docs/captioning.md.)"""
    samples = sorted((DEMO / "samples").glob("*.mp4"))
    res = runner.invoke(app, ["caption", *map(str, samples), "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["schema"] == "hbi.caption/1" and len(out["model_sha256"]) == 64
    assert len(out["caption_package_sha256"]) == 64
    got = {Path(r["path"]).name: r["text"] for r in out["results"]}
    want = _canonical()
    assert sorted(got) == sorted(p.name for p in samples)
    for name, text in got.items():
        clauses = text.split(", then ")
        assert all(CLAUSE.match(c) for c in clauses), text
        assert len(clauses) == len(want[name].split(", then ")), (text, want[name])


@needs_demo
def test_caption_cli_beam_table_csv_and_question():
    sample = str(sorted((DEMO / "samples").glob("*.mp4"))[0])
    res = runner.invoke(app, ["caption", sample, "--beam-size", "3", "--no-repeat-ngram", "4"])
    assert res.exit_code == 0 and Path(sample).name in res.stdout
    res = runner.invoke(app, ["caption", sample, "--format", "csv"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0] == "path,question,text,tokens,logprob,score,error"
    (csv_row,) = list(csv.DictReader(res.stdout.splitlines()))
    (json_row,) = json.loads(runner.invoke(app, ["caption", sample, "--format", "json"]).stdout)["results"]
    assert set(json_row) == set(csv_row)  # the same columns in CSV as in JSON
    assert csv_row["tokens"] == " ".join(map(str, json_row["tokens"])) and float(csv_row["score"]) == json_row["score"]
    res = runner.invoke(app, ["caption", sample, "--question", "how many events are there?", "--format", "jsonl"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.splitlines()[0])
    want = _canonical()[Path(sample).name]
    assert row["text"] == {2: "two", 3: "three"}[want.count(", then") + 1]


@needs_demo
def test_eval_caption_cli(tmp_path):
    samples = sorted((DEMO / "samples").glob("*.mp4"))[:3]
    res = runner.invoke(app, ["caption", *map(str, samples), "--format", "json"])
    own = {Path(r["path"]).name: r["text"] for r in json.loads(res.stdout)["results"]}
    # references = the decoder's own captions: a perfect score; a JSON reference file
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({k: [v] for k, v in own.items()}))
    res = runner.invoke(app, ["eval-caption", "--captions", str(refs), "--videos", str(DEMO / "samples"),
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["schema"] == "hbi.eval-caption/1" and out["videos"] == 3 and len(out["model_sha256"]) == 64
    assert out["metrics"]["bleu4"] == pytest.approx(1.0) and out["metrics"]["rouge_l"] == pytest.approx(1.0)
    assert out["metrics"]["meteor"] is None
    # the canonical references (CSV, one row per reference): the metrics of the reported captions
    want = _canonical()
    csv_refs = tmp_path / "refs.csv"
    with open(csv_refs, "w", newline="") as f:  # captions hold commas: quoted (an unquoted one is refused)
        csv.writer(f).writerows([("video", "caption"), *((p.name, want[p.name]) for p in samples)])
    res = runner.invoke(app, ["eval-caption", "--captions", str(csv_refs), "--videos", str(DEMO / "samples"),
                              "--format", "json"])
    out = json.loads(res.stdout)
    cands = [c["caption"] for c in out["captions"]]
    assert cands == [own[Path(c["path"]).name] for c in out["captions"]]
    references = [c["references"] for c in out["captions"]]
    assert out["metrics"]["bleu4"] == pytest.approx(bleu(cands, references))
    assert out["metrics"]["cider_d"] == pytest.approx(cider_d(cands, references))
    res = runner.invoke(app, ["eval-caption", "--captions", str(csv_refs), "--videos", str(DEMO / "samples")])
    assert res.exit_code == 0 and "BLEU-4" in res.stdout and "METEOR   n/a" in res.stdout


def test_caption_cli_bad_input(tmp_path):
    res = runner.invoke(app, ["caption", str(tmp_path / "missing.mp4")])
    assert res.exit_code == 3 and "does not exist" in res.output
    res = runner.invoke(app, ["caption", str(tmp_path), "--caption-model", str(tmp_path)])
    assert res.exit_code == 3
    bogus = tmp_path / "v.mp4"
    bogus.write_bytes(b"not a video")
    res = runner.invoke(app, ["caption", str(bogus), "--caption-model", str(tmp_path)])
    assert res.exit_code == 3 and "caption package" in res.output
    res = runner.invoke(app, ["caption", str(bogus), "--beam-size", "0", "--caption-model", str(tmp_path)])
    assert res.exit_code == 2
    res = runner.invoke(app, ["eval-caption", "--captions", str(tmp_path / "none.csv"), "--videos", str(tmp_path)])
    assert res.exit_code == 3 and "does not exist" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    res = runner.invoke(app, ["eval-caption", "--captions", str(bad), "--videos", str(tmp_path)])
    assert res.exit_code == 3 and "video,caption" in res.output


@needs_demo
def test_caption_package_integrity(tmp_path):
    import shutil

    from hbi_runtime.errors import MismatchError
    from hbi_runtime.tasks.caption import load_caption

    copy = tmp_path / "caption"
    shutil.copytree(DEMO / "caption", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["retrieval"]["path"] = str((DEMO / "package").resolve())
    (copy / "manifest.json").write_text(json.dumps(manifest))  # edited: the hash no longer matches
    with pytest.raises(MismatchError, match="edited"):
        load_caption(copy)
    shutil.rmtree(copy)
    shutil.copytree(DEMO / "caption", copy)
    with open(copy / "decoder_step.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(MismatchError, match="modified"):
        load_caption(copy)


@needs_demo
def test_caption_cli_bad_file_among_good_ones(tmp_path):
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"not a video")
    good = str(sorted((DEMO / "samples").glob("*.mp4"))[0])
    res = runner.invoke(app, ["caption", good, str(bogus), "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = {Path(r["path"]).name: r for r in json.loads(res.stdout)["results"]}
    assert rows["bogus.mp4"]["error"] and rows["bogus.mp4"]["text"] is None
    assert rows[Path(good).name]["error"] is None and rows[Path(good).name]["text"]
    res = runner.invoke(app, ["caption", good, str(bogus), "--strict"])
    assert res.exit_code == 3


@needs_demo
def test_caption_package_symlink_leading_out_is_refused(tmp_path):
    import shutil

    from hbi_runtime.tasks.caption import read_caption_manifest

    copy = tmp_path / "caption"
    shutil.copytree(DEMO / "caption", copy)
    (copy / "decoder_step.onnx").rename(tmp_path / "decoder_step.onnx")
    (copy / "decoder_step.onnx").symlink_to(tmp_path / "decoder_step.onnx")  # same bytes, same sha256
    with pytest.raises(BadInputError, match=r"decoder_step.onnx is a symlink to .*, outside the caption package"):
        read_caption_manifest(copy)


@needs_demo
@pytest.mark.parametrize("text, match", [("[" * 100_000, "too deeply"), ('{"schema": NaN}', "NaN is not JSON"),
                                         ("[1, 2]", "is not a JSON object")], ids=["100000-deep", "nan", "list"])
def test_hostile_caption_manifest_is_bad_input(tmp_path, text, match):
    from hbi_runtime.tasks.caption import read_caption_manifest

    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BadInputError, match=match) as exc:
        read_caption_manifest(tmp_path)
    assert exc.value.exit_code == 3 and "caption-export" in exc.value.hint
    res = runner.invoke(app, ["caption", str(sorted((DEMO / "samples").glob("*.mp4"))[0]), "--caption-model",
                              str(tmp_path)])
    assert res.exit_code == 3 and "Traceback" not in res.output
