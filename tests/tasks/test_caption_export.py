"""The caption decoder's export: PyTorch vs ONNX Runtime graph by graph (1e-4) and as whole decodes (identical
token sequences, greedy and beam), and KV-cache decoding equal to decoding without the cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hbi_export.tasks.caption import TorchSteps, _random_side, decode_parity, side_tensors, write_caption_package
from hbi_export.tasks.decoder import CaptionDecoder, DecoderConfig, load_decoder, save_decoder
from hbi_runtime.errors import EXIT_USAGE, BadInputError, UsageError
from hbi_runtime.tasks.caption import load_caption
from hbi_runtime.tasks.generate import SearchOptions, generate
from hbi_runtime.tokenizer import EOT_ID, SOT_ID

DEMO = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo"
pytestmark = pytest.mark.slow  # one export of three graphs (~15-30 s on a shared 2-core CPU)


TINY_TOWER = {"width": 16, "layers": 2, "heads": 2, "patch_size": 4, "image_size": 32}  # the demo's frames


def _model(frame_deltas: bool = False, patch_grid: int = 0) -> CaptionDecoder:
    """A random decoder with widely spread logits (every matrix of std 0.3, embeddings of std 1), so that decoding
    depends on the video and position and has no near-ties that fp32 rounding differences between PyTorch and
    ONNX Runtime could flip."""
    torch.manual_seed(0)
    config = DecoderConfig(embed_dim=64, tokens_per_level=(8, 2, 1), width=32, layers=2, heads=2,
                           vocab_ids=tuple(range(100, 130)) + (SOT_ID, EOT_ID), max_positions=24, dropout=0.0,
                           frame_deltas=frame_deltas, patch_grid=patch_grid,
                           patch_vision=TINY_TOWER if patch_grid else None)
    model = CaptionDecoder(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(std=0.3)
        if patch_grid:  # a random tower of CLIP-like scale (its residual stream stays O(1))
            for p in model.patch_encoder.parameters():
                p.normal_(std=0.1)
        model.position_embedding.normal_(std=1.0)
        model.token_embedding.weight.normal_(std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    out = tmp_path_factory.mktemp("cap") / "caption"
    manifest = write_caption_package(model, DEMO / "package", out)
    cm = load_caption(out)
    yield model, cm, manifest
    cm.close()


def test_package_verified_and_graphs_match(exported):
    model, cm, manifest = exported
    assert manifest["status"] == "verified"
    graphs = manifest["parity"]["graphs"]
    assert all(graphs[g]["max_abs"] <= 1e-4 for g in ("caption_memory", "decoder_init", "decoder_step"))
    assert manifest["retrieval"]["manifest_sha256"] == cm.retrieval.package.manifest_sha256
    on_disk = json.loads((cm.root / "manifest.json").read_text())
    assert on_disk["manifest_sha256"] == manifest["manifest_sha256"] == cm.manifest.sha256
    assert (on_disk["kind"], on_disk["schema_version"]) == ("caption", 2) and "schema" not in on_disk
    assert on_disk == manifest and not cm.manifest.legacy


def test_greedy_and_beam_token_sequences_identical(exported):
    model, cm, _ = exported
    side = _random_side(model.config, 5)
    report = decode_parity(model, cm, side, settings=((1, 1.0, 0), (2, 0.0, 0), (4, 1.0, 2), (3, 0.6, 3)))
    assert report["ok"], report
    # QA-style prefixes of different lengths (grouped by length in the search)
    sot, q = int(cm.to_local[SOT_ID]), [int(cm.to_local[100 + i]) for i in range(4)]
    prefixes = [[sot], [sot] + q[:2], [sot] + q, [sot] + q[:2], [sot]]
    report = decode_parity(model, cm, side, prefixes=prefixes, settings=((1, 1.0, 0), (3, 1.0, 0)))
    assert report["ok"], report


def test_sequences_are_not_trivial(exported):
    """The fixture's videos decode to different sequences (parity on one repeated token would prove little)."""
    model, cm, _ = exported
    hyps, _ = cm.generate_side(_random_side(model.config, 5), options=SearchOptions(max_length=12))
    lengths = {len(h.tokens) for h in hyps}
    assert max(lengths) >= 3 and len({h.tokens for h in hyps}) >= 4


def test_kv_cache_equals_no_cache(exported):
    model, cm, _ = exported
    side = _random_side(model.config, 4)
    for o in (SearchOptions(max_length=12), SearchOptions(beam_size=3, max_length=12, no_repeat_ngram=2)):
        with_cache, n_cached = cm.generate_side(side, options=o, cache=True)
        without, n_full = cm.generate_side(side, options=o, cache=False)
        assert [h.tokens for h in with_cache] == [h.tokens for h in without]
        np.testing.assert_allclose([h.logprob for h in with_cache], [h.logprob for h in without], atol=1e-4)
        assert n_cached < n_full  # the cache computes each position once
    # PyTorch too: the cached decoder equals re-running the whole sequence
    eot, sot = int(cm.to_local[EOT_ID]), int(cm.to_local[SOT_ID])
    t_side = side_tensors(side)
    o = SearchOptions(beam_size=2, max_length=10)
    a = generate(TorchSteps(model, t_side, cache=True), [[sot]] * 4, eot, o)
    b = generate(TorchSteps(model, t_side, cache=False), [[sot]] * 4, eot, o)
    assert [h.tokens for h in a] == [h.tokens for h in b]


def test_teacher_forcing_equals_cached_steps():
    model = _model()
    side = side_tensors(_random_side(model.config, 2))
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(side, ids)  # (2, 7, V)
        cross, bias = model.cross_cache(side)
        logp, past = model.decode(ids[:, :3], None, cross, bias)
        steps = [logp]
        for t in range(3, 7):
            logp, past = model.decode(ids[:, t:t + 1], past, cross, bias)
            steps.append(logp)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 2:], atol=1e-5, rtol=1e-5)


def test_decoder_folder_roundtrip(tmp_path):
    model = _model()
    save_decoder(model, tmp_path / "d", extra={"training": {"note": "x"}})
    loaded, meta = load_decoder(tmp_path / "d")
    assert meta["training"] == {"note": "x"} and loaded.config == model.config
    side = side_tensors(_random_side(model.config, 2))
    ids = torch.zeros(2, 3, dtype=torch.long)
    with torch.no_grad():
        torch.testing.assert_close(loaded(side, ids), model(side, ids))


def test_frame_delta_decoder_exports_with_parity(tmp_path):
    """DecoderConfig.frame_deltas: 7 more memory tokens (one per consecutive frame pair) in the exported graphs
    too, graph and whole-decode parity, and the package's decoder reloads with the switch on."""
    model = _model(frame_deltas=True)
    manifest = write_caption_package(model, DEMO / "package", tmp_path / "caption")
    assert manifest["status"] == "verified", manifest["parity"]
    assert manifest["decoder"]["frame_deltas"] is True
    with load_caption(tmp_path / "caption") as cm:
        side = _random_side(model.config, 4)
        _, bias = model.cross_cache(side_tensors(side))
        assert bias.shape[-1] == 8 + 2 + 1 + 7
        report = decode_parity(model, cm, side, settings=((1, 1.0, 0), (3, 1.0, 2)))
        assert report["ok"], report


def test_spatial_memory_decoder_exports_and_captions_real_videos(tmp_path):
    """DecoderConfig.patch_grid: the frame_patches graph (frozen tower copy) and the patch tokens in the memory;
    graph parity (random frames and the fixture videos' frames), identical greedy / beam decodes, and the runtime
    captions video files through both graphs."""
    model = _model(frame_deltas=True, patch_grid=2)
    samples = sorted(str(p) for p in (DEMO / "samples").glob("*.mp4"))[:3]
    manifest = write_caption_package(model, DEMO / "package", tmp_path / "caption", fixture_videos=samples)
    assert manifest["status"] == "verified", manifest["parity"]
    graphs = manifest["parity"]["graphs"]
    assert graphs["frame_patches"]["max_abs"] <= 1e-4 and graphs["frame_patches_videos"]["videos"] == 3
    assert manifest["graphs"]["frame_patches"]["outputs"][0]["shape"] == ["video_batch", 8, 4, 16]
    with load_caption(tmp_path / "caption") as cm:
        videos, paths, errors = cm.encode_videos(samples)
        assert not errors and paths == samples and videos.patches.shape == (3, 8, 4, 16)
        _, bias = model.cross_cache(side_tensors(videos))
        assert bias.shape[-1] == 8 + 2 + 1 + 7 + (8 + 7) * 4  # levels, frame deltas, patches and their deltas
        report = decode_parity(model, cm, videos, settings=((1, 1.0, 0), (3, 1.0, 2)))
        assert report["ok"], report
        # different frames, different patch maps: the memory reads them (a zeroed map changes the decode inputs)
        cross, _ = cm.memory(videos)
        blank, _ = cm.memory(type(videos)(videos.side, np.zeros_like(videos.patches)))
        assert float(np.abs(cross[0] - blank[0]).max()) > 1e-3
        results, _ = cm.caption_videos(samples[:2])
        assert [r.path for r in results] == samples[:2]
        with pytest.raises(UsageError, match="patch map"):
            cm.generate_side(videos.side)
        with pytest.raises(BadInputError, match="patch map of shape"):
            cm.generate_side(type(videos)(videos.side, videos.patches[:, :, :2]))
        rows = videos.take([2, 0, 2])
        assert rows.n == 3 and np.array_equal(rows.patches[1], videos.patches[0])


def test_patch_encoder_reads_what_the_towers_last_block_reads():
    """PatchEncoder = the input of the retrieval tower's last block (captured by a hook while the tower computes
    its CLS feature), patch positions only, average-pooled: at full resolution and at 2 x 2."""
    from hbi_export.model.clip import VisionTower
    from hbi_export.model.config import HBIConfig, VisionConfig

    torch.manual_seed(1)
    tower = VisionTower(HBIConfig(embed_dim=8, vision=VisionConfig(**TINY_TOWER))).eval()
    seen = {}
    tower.transformer.resblocks[-1].register_forward_pre_hook(lambda _m, args: seen.update(x=args[0].clone()))
    frames = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        tower(frames.flatten(0, 1))
    full = seen["x"][:, 1:].reshape(2, 3, 8, 8, 16)  # (B, T, rows, cols, width)
    for grid in (8, 2):
        config = DecoderConfig(embed_dim=8, patch_grid=grid, patch_vision=TINY_TOWER)
        from hbi_export.tasks.decoder import PatchEncoder

        enc = PatchEncoder(config)
        enc.load_tower(tower)
        with torch.no_grad():
            got = enc(frames)
        k = 8 // grid
        want = full.reshape(2, 3, grid, k, grid, k, 16).mean(dim=(3, 5)).reshape(2, 3, grid * grid, 16)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in enc.parameters())  # frozen: training never moves the copy
    with pytest.raises(BadInputError, match="does not divide"):
        DecoderConfig(embed_dim=8, patch_grid=3, patch_vision=TINY_TOWER)


# ---------------------------------------------------------------------------------------------------------------
# hbi-export caption-export --out / --overwrite (hbi_runtime.outputs.prepare_output_dir): never the decoder folder or
# the retrieval package, never a folder of other files; a previous caption package is replaced only once the new one
# is written and checked


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return save_decoder(_model(), tmp_path_factory.mktemp("dec") / "decoder")


def _caption_export(*args: str):
    """``hbi-export caption-export`` (registered into hbi-export by hbi_training.caption_cli.register_export)."""
    from hbi_training.caption_cli import register_export
    from typer.testing import CliRunner

    from hbi_runtime.cli_options import make_app

    app = make_app("hbi-export", "caption-export alone")
    register_export(app)
    return CliRunner().invoke(app, ["caption-export", *args])


@pytest.mark.parametrize("where", ["the decoder folder", "a folder holding it", "the retrieval package"])
def test_out_may_not_be_an_input(decoder_dir, tmp_path, where):
    decoder, retrieval = tmp_path / "runs" / "decoder", tmp_path / "retrieval"
    shutil.copytree(decoder_dir, decoder)
    shutil.copytree(DEMO / "package", retrieval)
    before = _tree(tmp_path)
    out = {"the decoder folder": decoder, "a folder holding it": decoder.parent, "the retrieval package": retrieval}
    result = _caption_export("--decoder", str(decoder), "--model", str(retrieval), "--out", str(out[where]),
                             "--overwrite")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "the input" in result.stderr and "Traceback" not in result.output
    assert _tree(tmp_path) == before


def test_a_folder_of_other_files_is_refused_even_with_overwrite(decoder_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = _caption_export("--decoder", str(decoder_dir), "--out", str(mine), "--overwrite")
    assert result.exit_code == EXIT_USAGE, result.output
    assert "does not hold a caption package" in result.stderr and "even with --overwrite" in result.stderr
    assert _tree(mine) == {"notes.txt": b"keep me"}


def test_overwrite_replaces_a_previous_caption_package(exported, decoder_dir, tmp_path):
    _, cm, _ = exported
    out = tmp_path / "caption"
    shutil.copytree(cm.root, out)
    before = _tree(out)
    result = _caption_export("--decoder", str(decoder_dir), "--out", str(out), "--overwrite", "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "verified"
    with load_caption(out) as model:  # hash-checked, and its retrieval package found from the new place
        assert model.retrieval.package.manifest_sha256 == cm.retrieval.package.manifest_sha256
    assert _tree(out) != before and _siblings(out) == ["caption"]  # replaced; no temporary or old folder left


def test_an_export_that_fails_at_the_swap_leaves_the_previous_caption_package(exported, decoder_dir, tmp_path,
                                                                               monkeypatch):
    """The new package is complete and checked, but moving it into place fails (a full disk, say)."""
    _, cm, _ = exported
    out = tmp_path / "caption"
    shutil.copytree(cm.root, out)
    before = _tree(out)
    real_rename = os.rename

    def rename(src, dst):
        if ".partial-" in Path(src).name:
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    result = _caption_export("--decoder", str(decoder_dir), "--out", str(out), "--overwrite")
    assert result.exit_code == 3 and "the disk is full (No space left" in result.stderr, result.output
    assert _tree(out) == before
    assert _siblings(out) == ["caption"]
