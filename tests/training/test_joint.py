"""The joint fine-tune (hbi_training.joint): the caption loss reaches the video tower, the decoder sees the right
rows, and a tiny run trains both parts and writes a loadable checkpoint + decoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hbi_export.model import HBIConfig, HBIModel
from hbi_export.tasks.decoder import CaptionDecoder, DecoderConfig, VocabMap
from hbi_runtime.tokenizer import ClipTokenizer
from hbi_training.caption import SIDE_NAMES, build_vocab, make_sequences, qa_pairs, training_texts
from hbi_training.joint import JointSettings, JointTask, run_joint, side_arrays, side_tuple
from hbi_training.losses import HBILoss, LossConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from hbi_training.data import generate

    return generate(tmp_path_factory.mktemp("joint") / "data", 12, 4, 0).root


def _videos(data: Path, split: str) -> list[dict]:
    from hbi_training.data import read_manifest

    return [v for v in read_manifest(data)["videos"] if v["split"] == split]


def _task(data: Path, caption_weight: float = 1.0):
    torch.manual_seed(0)
    model = HBIModel(HBIConfig.tiny())
    videos = _videos(data, "train")
    tok = ClipTokenizer()
    config = DecoderConfig(embed_dim=64, tokens_per_level=(8, *model.config.cluster_counts(8, "video")), width=32,
                           layers=1, heads=2, vocab_ids=build_vocab(training_texts(videos, "canonical", True), tok))
    seqs = make_sequences(videos, tok, VocabMap(config), captions="canonical", qa=True,
                          max_positions=config.max_positions)
    task = JointTask(model, HBILoss(LossConfig(banzhaf=False)), CaptionDecoder(config), seqs,
                     {v["id"]: i for i, v in enumerate(videos)}, caption_weight=caption_weight, seed=0)
    return task, seqs, videos


def _batch(data: Path, n: int = 4):
    from hbi_training.data import SyntheticVideoDataset

    ds = SyntheticVideoDataset(data, "train", max_frames=8, image_size=32)
    items = [ds[int(ds.items_of_video(v)[0])] for v in range(n)]
    return (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]), torch.stack([i[2] for i in items]),
            torch.stack([i[3] for i in items]), [i[4] for i in items])


def test_decoder_rows_are_one_caption_and_one_qa_pair_of_each_batch_video(data):
    task, seqs, _ = _task(data)
    rows, owner = task.decoder_rows([3, 0, 5])
    assert owner.tolist() == [0, 0, 1, 1, 2, 2]
    assert seqs.video[rows].tolist() == [3, 3, 0, 0, 5, 5]
    assert (seqs.prefix[rows] == 1).tolist() == [True, False] * 3  # caption (prefix SOT only), then a question
    again, _ = task.decoder_rows([3, 0, 5])
    assert again.tolist() == rows.tolist()  # drawn from (seed, step): the same step draws the same rows
    task.steps_done = 7
    draws = {tuple(task.decoder_rows([3, 0, 5])[0]) for task.steps_done in range(8)}
    assert len(draws) > 1  # the QA row changes with the step


def test_caption_loss_alone_trains_the_video_tower(data):
    """The decoder reads the differentiable side: its cross entropy has a gradient in the vision tower."""
    task, _, _ = _task(data, caption_weight=1.0)
    batch = _batch(data)
    out = task.loss(batch)
    assert set(out.parts) >= {"nce_entity", "nce_action", "nce_event", "distill", "caption"}
    assert torch.isclose(out.total, sum(out.parts[k] for k in ("nce_entity", "nce_action", "nce_event"))
                         + 2.0 * out.parts["distill"] + out.parts["caption"])
    out.parts["caption"].backward()
    grad = task.model.clip.visual.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert task.model.clip.token_embedding.weight.grad is None  # the text tower is not in the caption loss
    trainable = [p for p in task.decoder.parameters() if p.requires_grad]
    assert len(trainable) == len(list(task.decoder.parameters())) > 0  # (no frozen part without a patch grid)
    assert all(p.grad is not None for p in trainable)


def test_side_arrays_are_the_models_side_in_decoder_order(data):
    task, _, _ = _task(data)
    _, _, frames, fmask, _ = _batch(data, 3)
    arrays = side_arrays(task.model, frames.numpy(), fmask.numpy(), batch=2)
    with torch.no_grad():
        side = side_tuple(task.model.encode_video(frames, fmask))
    assert list(arrays) == list(SIDE_NAMES)
    for name, tensor in zip(SIDE_NAMES, side):
        np.testing.assert_allclose(arrays[name], tensor.numpy(), atol=1e-6)
    assert arrays["video_tokens_l0"].shape == (3, 8, 64) and arrays["video_mask_l2"].shape == (3, 1)


def test_tiny_joint_run(data, tmp_path):
    from hbi_export.checkpoints import build_model
    from hbi_export.tasks.decoder import load_decoder

    s = JointSettings(data_dir=data, out_dir=tmp_path / "run", model_preset="tiny", steps=4, batch_size=4,
                      width=32, layers=1, heads=2, log_every=2, train_eval_videos=4, progress=False)
    torch.manual_seed(0)
    start = HBIModel(HBIConfig.tiny())  # what the run starts from (seed_everything(0), then the preset)
    summary = run_joint(s)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4] and all(r["caption"] > 0 for r in train)
    val = [r for r in lines if r["kind"] == "val"][-1]
    assert 0 <= val["attribute_accuracy"] <= 100 and 0 <= val["train_attribute_accuracy"] <= 100
    model, _ = build_model(tmp_path / "run" / "final")
    moved = (model.clip.visual.conv1.weight - start.clip.visual.conv1.weight).abs().max()
    assert moved > 0  # the video tower trained
    decoder, meta = load_decoder(tmp_path / "run" / "decoder")
    assert meta["training"]["settings"]["steps"] == 4
    assert summary["test_videos"] == 4 and 0.0 <= summary["test_attribute_accuracy"] <= 1.0
    assert summary["qa"]["questions"] == sum(len(qa_pairs(v["scene"])) for v in _videos(data, "test"))
    assert (tmp_path / "run" / "test_captions.json").is_file()


def test_the_decoder_alone_continues_from_a_joint_run(data, tmp_path):
    """`hbi-train caption --init-decoder RUN/decoder`: same vocabulary and memory shape -> continues those
    weights; another vocabulary is refused."""
    from hbi_export.tasks.decoder import load_decoder
    from hbi_runtime.errors import UsageError
    from hbi_training.caption import CaptionTrainSettings, train_caption

    demo = Path(__file__).resolve().parents[2] / "hbi_runtime" / "data" / "demo" / "package"
    if not (demo / "manifest.json").is_file():
        pytest.skip("no demo package")
    run_joint(JointSettings(data_dir=data, out_dir=tmp_path / "joint", model_preset="tiny", steps=1, batch_size=4,
                            width=32, layers=1, heads=2, train_eval_videos=0, progress=False))
    start, _ = load_decoder(tmp_path / "joint" / "decoder")
    s = CaptionTrainSettings(data_dir=data, out_dir=tmp_path / "cont", package=demo, steps=2, batch_size=4,
                             init_decoder=tmp_path / "joint" / "decoder", log_every=1)
    train_caption(s)
    after, _ = load_decoder(tmp_path / "cont" / "decoder")
    assert after.config == start.config  # width 32, 1 layer: the joint decoder's, not the settings' 128 / 2
    assert any(not torch.equal(a, b) for a, b in zip(after.state_dict().values(), start.state_dict().values()))
    with pytest.raises(UsageError, match="vocabulary or memory shape"):
        train_caption(CaptionTrainSettings(data_dir=data, out_dir=tmp_path / "bad", package=demo, steps=1,
                                           batch_size=4, qa=False, init_decoder=tmp_path / "joint" / "decoder"))


# ---------------------------------------------------------------------------------------------------------------
# per-frame attribute supervision


def test_frame_times_are_the_times_the_decoded_frames_show(data):
    """Target k must describe cached frame k: the runtime's decode of a video samples exactly these times."""
    from hbi_runtime.package import Preprocessing
    from hbi_runtime.video import decode_video
    from hbi_training.data import read_manifest
    from hbi_training.joint import frame_times

    manifest = read_manifest(data)
    decoded = decode_video(data / manifest["videos"][0]["file"], Preprocessing(max_frames=8, image_size=32))
    times = frame_times(manifest["config"], 8)
    np.testing.assert_allclose(times, decoded.indices / decoded.fps)
    assert len(times) == manifest["config"]["seconds"]  # 1 fps: one frame per second, none dropped


def test_frame_targets_name_what_each_cached_frame_shows(data):
    """Independent check through the pixels: at each target position the decoded frame has the target colour;
    a scene object marked absent (not yet appeared / gone) leaves background at its own position."""
    from hbi_runtime.package import CLIP_MEAN, CLIP_STD
    from hbi_training.data import SyntheticVideoDataset, read_manifest
    from hbi_training.data.scenes import BACKGROUND, COLOURS, SHAPES, Scene
    from hbi_training.joint import frame_targets, frame_times

    manifest = read_manifest(data)
    videos = _videos(data, "train")
    colours = list(manifest["vocabulary"]["colours"])
    cls, pos = frame_targets(videos, frame_times(manifest["config"], 8), 8, colours, list(SHAPES))
    ds = SyntheticVideoDataset(data, "train", max_frames=8, image_size=32)
    pixels = (ds.frames.transpose(0, 1, 3, 4, 2) * np.array(CLIP_STD) + np.array(CLIP_MEAN)) * 255
    checked = {"present": 0, "absent": 0}
    for n, v in enumerate(videos):
        objects = {o.shape: o for o in Scene.from_dict(v["scene"]).objects}
        for k in range(8):
            for j, shape in enumerate(SHAPES):
                if cls[n, k, j] > 0:
                    x, y = pos[n, k, j]
                    want = COLOURS[colours[cls[n, k, j] - 1]]
                    assert np.abs(pixels[n, k, int(y * 32), int(x * 32)] - want).max() < 60, (n, k, shape)
                    checked["present"] += 1
                elif shape in objects:  # in the scene but not visible at this frame: its start spot is empty
                    # (absent shapes here only appear / disappear, which never move)
                    o = objects[shape]
                    assert np.abs(pixels[n, k, int(o.y * 32), int(o.x * 32)] - BACKGROUND).max() < 60, (n, k, shape)
                    checked["absent"] += 1
                else:
                    assert cls[n, k, j] == 0
    assert checked["present"] > 100 and checked["absent"] > 0
    assert cls.shape == (len(videos), 8, len(SHAPES))
    assert (cls >= 0).all()  # every sampled frame of these 8-second videos is a real frame


def test_frame_event_targets_follow_the_scene_timing(data):
    """Independent of ``object_state``: with one frame per second (frame k shows second k), an appear / disappear
    / turn in segment [start, end) switches at start + 0.5, so frame start + 1 alone shows it; a move runs from
    start to end - 1, so frames start + 1 .. end - 1 show it. The class names the action and the object's colour
    (each object has one event, so its start colour is the colour before)."""
    from hbi_training.data import read_manifest
    from hbi_training.data.scenes import ACTIONS, MOVES, SHAPES
    from hbi_training.joint import frame_event_targets, frame_times

    manifest = read_manifest(data)
    videos = _videos(data, "train") + _videos(data, "test")
    colours = list(manifest["vocabulary"]["colours"])
    events = frame_event_targets(videos, frame_times(manifest["config"], 8), 8, colours, list(SHAPES),
                                 list(ACTIONS))
    expected = np.zeros_like(events)
    kinds = set()
    for n, v in enumerate(videos):
        for e in v["scene"]["events"]:
            obj = v["scene"]["objects"][e["obj"]]
            frames = range(e["start"] + 1, e["end"]) if e["action"] in MOVES else [e["start"] + 1]
            for k in frames:
                expected[n, k, SHAPES.index(obj["shape"])] = (1 + ACTIONS.index(e["action"]) * len(colours)
                                                              + colours.index(obj["colour"]))
            kinds.add(e["action"] if e["action"] not in MOVES else "move")
    assert np.array_equal(events, expected)
    assert kinds >= {"move", "appear", "disappear", "turn"}  # every kind of timing was checked
    assert events.shape == (len(videos), 8, len(SHAPES))
    assert (events[:, 0] == 0).all()


def test_aux_head_with_events_adds_the_event_term(data):
    from hbi_training.data import read_manifest
    from hbi_training.data.scenes import ACTIONS, SHAPES
    from hbi_training.joint import FrameAttributeHead, frame_attribute_accuracy, frame_event_targets, \
        frame_targets, frame_times

    task, seqs, videos = _task(data)
    manifest = read_manifest(data)
    colours, times = list(manifest["vocabulary"]["colours"]), frame_times(manifest["config"], 8)
    cls, pos = frame_targets(videos, times, 8, colours, list(SHAPES))
    ev = frame_event_targets(videos, times, 8, colours, list(SHAPES), list(ACTIONS))
    head = FrameAttributeHead(64, len(SHAPES), 1 + len(colours), n_events=1 + len(ACTIONS) * len(colours))
    aux_task = JointTask(task.model, task.criterion, task.decoder, seqs, task.video_index, caption_weight=1.0,
                         seed=0, aux=(head, cls, pos, ev), aux_weight=2.0)
    aux_task.train(False)
    batch = _batch(data)
    out, base = aux_task.loss(batch), task.loss(batch)
    terms = [out.parts[k] for k in ("aux_class", "aux_position", "aux_event")]
    assert len(terms) == 3 and all(t > 0 for t in terms)
    assert torch.isclose(out.total, base.total + 2.0 * sum(terms))
    tokens = side_arrays(task.model, *(t.numpy() for t in batch[2:4]))[SIDE_NAMES[0]]
    acc = frame_attribute_accuracy(head, tokens, cls[:4], ev[:4])
    assert 0.0 <= acc["frame_event_accuracy"] <= 1.0 and "frame_present_accuracy" in acc


def test_aux_loss_reaches_the_video_tower_and_adds_to_the_total(data):
    from hbi_training.data import read_manifest
    from hbi_training.data.scenes import SHAPES
    from hbi_training.joint import FrameAttributeHead, frame_targets, frame_times

    task, seqs, videos = _task(data)
    manifest = read_manifest(data)
    colours = list(manifest["vocabulary"]["colours"])
    cls, pos = frame_targets(videos, frame_times(manifest["config"], 8), 8, colours, list(SHAPES))
    head = FrameAttributeHead(64, len(SHAPES), 1 + len(colours))
    aux_task = JointTask(task.model, task.criterion, task.decoder, seqs, task.video_index, caption_weight=1.0,
                         seed=0, aux=(head, cls, pos), aux_weight=0.5)
    batch = _batch(data)
    aux_task.train(False)  # no dropout: the two losses see the same forward pass
    out = aux_task.loss(batch)
    base = task.loss(batch)
    assert out.parts["aux_class"] > 0 and out.parts["aux_position"] > 0
    assert torch.isclose(out.total, base.total + 0.5 * (out.parts["aux_class"] + out.parts["aux_position"]))
    out.parts["aux_class"].backward()
    grad = task.model.clip.visual.conv1.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    params = list(task.decoder.parameters())
    assert len(params) > 0 and all(p.grad is None for p in params)  # the head reads the side, not the decoder
    assert {n for n, _ in aux_task.named_trainable()} >= {"aux.proj.weight", "aux.proj.bias"}
    assert "aux_head" in aux_task.extra_state()


def test_joint_run_with_aux_continues_a_decoder(data, tmp_path):
    """--init-decoder starts from that decoder's weights; --aux-weight reports the held-out per-frame accuracy;
    the head is training-only (the saved checkpoint and decoder have no aux weights)."""
    from hbi_export.tasks.decoder import load_decoder
    from hbi_runtime.errors import UsageError

    common = dict(data_dir=data, model_preset="tiny", batch_size=4, width=32, layers=1, heads=2,
                  train_eval_videos=0, progress=False)
    run_joint(JointSettings(out_dir=tmp_path / "a", steps=1, **common))
    start, _ = load_decoder(tmp_path / "a" / "decoder")
    summary = run_joint(JointSettings(out_dir=tmp_path / "b", steps=2, init=tmp_path / "a" / "final",
                                      init_decoder=tmp_path / "a" / "decoder", aux_weight=1.0, **common))
    val = summary["validations"][-1]
    assert 0 <= val["test_frame_present_accuracy"] <= 100 and 0 <= val["test_frame_class_accuracy"] <= 100
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2] and all(r["aux_class"] > 0 for r in train)  # (logged at the last step)
    after, _ = load_decoder(tmp_path / "b" / "decoder")
    assert after.config == start.config
    assert any(not torch.equal(a, b) for a, b in zip(after.state_dict().values(), start.state_dict().values()))
    names = json.dumps(sorted(p.name for p in (tmp_path / "b").rglob("*")))
    assert "aux" not in names
    with pytest.raises(UsageError, match="vocabulary or memory shape"):
        run_joint(JointSettings(out_dir=tmp_path / "c", steps=1, qa=False, init_decoder=tmp_path / "a" / "decoder",
                                **common))


def test_token_dropout_hides_only_caption_and_answer_words(data):
    """token_dropout=1: every input word that is itself a target reads as 'unknown'; SOT and question words stay."""
    from hbi_training.caption import teacher_forcing_loss

    task, seqs, _ = _task(data)
    task.decoder.eval()
    rows = np.array([0, 1, 2, 3])
    assert (seqs.prefix[rows] > 1).any() and (seqs.prefix[rows] == 1).any()  # captions and questions
    width = int(seqs.length[rows].max())
    ids, mask = task.ids[rows, :width], task.mask[rows, :width - 1]
    _, _, frames, fmask, _ = _batch(data, 4)
    with torch.no_grad():
        side = side_tuple(task.model.encode_video(frames, fmask))
        dropped = teacher_forcing_loss(task.decoder, side, ids, mask, token_dropout=1.0)
        manual = ids.clone()
        unknown = task.decoder.config.vocab_size
        for b, r in enumerate(rows):
            # inputs from the prefix's end up to EOT are caption / answer words (then EOT padding)
            manual[b, int(seqs.prefix[r]):int(seqs.length[r])] = unknown
        logp = task.decoder(side, manual[:, :-1])
        want = (-logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask).sum() / mask.sum()
        plain = teacher_forcing_loss(task.decoder, side, ids, mask)
    assert torch.isclose(dropped, want, atol=1e-5)
    assert not torch.isclose(dropped, plain)
