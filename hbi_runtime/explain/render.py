"""Showing an explanation: a text summary, one PNG heatmap per level (matplotlib, the ``plot`` extra) and one
self-contained HTML page with every level (no external assets: thumbnails are inline PNG data, written here with
zlib, so the page needs neither matplotlib nor Pillow)."""

from __future__ import annotations

import base64
import html
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from hbi_runtime import plotting
from hbi_runtime.explain.explainer import LevelMap, PairExplanation, Player
from hbi_runtime.names import printable

LEVEL_TITLES = {
    "entity": "Entity level: words and single frames",
    "action": "Action level: groups of words and groups of frames (the model's merged tokens)",
    "event": "Event level: the largest groups (the model's second merge)",
}
TOP_PAIRS = 5


# ----------------------------------------------------------------------------------------------------------------
# text


def text_report(e: PairExplanation) -> str:
    """What ``hbi-run explain`` prints without ``--format json``: per level the score and the strongest pairs."""
    lines = [f'query: "{printable(e.query)}"' + ("  (truncated)" if e.truncated else ""),
             f"video: {_display(e.video)}"]
    for m in e.levels:
        est = m.map
        how = "exact" if est.exact else f"{est.samples} samples, seed {est.seed}"
        acc = m.accuracy()
        lines.append(f"{m.level}: score {m.score:.4f}  ({len(m.rows)} x {len(m.cols)}, {how}; median standard error "
                     f"{100 * acc['median_stderr_ratio']:.1f} % of the largest |interaction|)")
        if m.level != "entity" and not m.clusters_known:
            lines.append("  (this package does not say which words / frames each cluster merged: re-export it to "
                         "see them)")
        if m.map.col_values is not None and len(m.cols):
            best = np.argsort(-m.map.col_values, kind="stable")[:3]
            lines.append("  moments that matter most on their own: " + "; ".join(
                f"{printable(m.cols[c].label)} {m.map.col_values[c]:+.4f}±{m.map.col_stderr[c]:.4f}" for c in best))
        for sign, what in ((1, "together"), (-1, "redundant")):
            pairs = _top(m, sign)
            if pairs:
                lines.append(f"  {what}: " + "; ".join(
                    f"{printable(m.rows[r].label)} x {printable(m.cols[c].label)} {m.values[r, c]:+.4f}"
                    f"±{m.stderr[r, c]:.4f}" for r, c in pairs))
    return "\n".join(lines) + "\n"


def _display(path) -> str:
    from hbi_runtime.names import display_path

    return display_path(path)


def _top(m: LevelMap, sign: int, k: int = TOP_PAIRS) -> list[tuple[int, int]]:
    """The ``k`` cells of largest ``sign * value`` that are clearly of that sign (beyond two standard errors)."""
    v = sign * m.values
    order = np.argsort(-v, axis=None, kind="stable")
    out = []
    for flat in order[:k]:
        r, c = np.unravel_index(flat, v.shape)
        if v[r, c] > 2 * m.stderr[r, c] and v[r, c] > 0:
            out.append((int(r), int(c)))
    return out


# ----------------------------------------------------------------------------------------------------------------
# PNG


def figure_class():
    """matplotlib's Figure for the heatmaps; MissingDependencyError without the ``plot`` extra."""
    return plotting.figure_class("the PNG heatmaps", "the JSON and the HTML page need nothing more")


def write_png(m: LevelMap, e: PairExplanation, path: str | Path) -> Path:
    """A word x frame heatmap of one level, frame thumbnails along the time axis (member frames and time spans
    for clusters)."""
    Figure = figure_class()
    rows, cols = len(m.rows), len(m.cols)
    label_w = 0.09 * max((len(r.label) for r in m.rows), default=4) + 0.6
    width = max(6.0, label_w + 0.75 * cols + 1.6)
    height = 0.32 * rows + 2.6
    fig = Figure(figsize=(width, height), dpi=110)
    left = label_w / width
    top = 1 - 0.9 / height
    thumb_h = 1.0 / height
    bottom = 1.45 / height  # the thumbnail strip (0.25 .. 1.25 in) below
    heat = fig.add_axes((left, bottom, 1 - left - 1.3 / width, top - bottom))
    vmax = float(np.abs(m.values).max()) or 1e-9
    image = heat.imshow(m.values, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
    heat.set_yticks(range(rows), [r.label for r in m.rows], fontsize=8)
    heat.set_xticks(range(cols), [_short(c.label) for c in m.cols], fontsize=7, rotation=30, ha="right")
    heat.xaxis.set_ticks_position("top")
    heat.tick_params(axis="x", labeltop=True, labelbottom=False)
    if rows * cols <= 400:
        for r in range(rows):
            for c in range(cols):
                value, se = m.values[r, c], m.stderr[r, c]
                shade = "white" if abs(value) > 0.6 * vmax else "black"
                heat.text(c, r, f"{value:+.3f}", ha="center", va="center", fontsize=6, color=shade,
                          alpha=1.0 if abs(value) > 2 * se else 0.45)
    bar = fig.add_axes((1 - 1.05 / width, bottom, 0.18 / width, top - bottom))
    fig.colorbar(image, cax=bar).set_label("Banzhaf interaction", fontsize=8)
    fig.suptitle(f"{m.level} level: \"{_clip(e.query, 70)}\"  score {m.score:.3f}", fontsize=9)
    strip = fig.add_axes((left, 0.25 / height, 1 - left - 1.3 / width, thumb_h), sharex=heat)
    strip.set_ylim(0, 1)
    strip.axis("off")
    for c, player in enumerate(m.cols):
        frames = _frames_of(player)
        if not frames:
            strip.text(c, 0.5, "members\nunknown" if player.positions is None else "no frame", ha="center",
                       va="center", fontsize=6)
            continue
        shown = frames if len(frames) <= 3 else [frames[0], frames[len(frames) // 2], frames[-1]]
        w = 0.9 / len(shown)
        for k, j in enumerate(shown):
            slot = _slot_index(e, j)
            if slot is not None:
                x0 = c - 0.45 + k * w
                strip.imshow(e.thumbnails[slot], extent=(x0, x0 + w * 0.95, 0.05, 0.95), aspect="auto")
    strip.set_xlim(-0.5, cols - 0.5)
    strip.set_ylim(0, 1)
    path = Path(path)
    fig.savefig(path, format="png")
    return path


def _frames_of(p: Player) -> list[int]:
    if p.kind == "frame" or (p.kind == "cluster" and p.times is not None):
        return list(p.positions or ())
    return []


def _slot_index(e: PairExplanation, frame_slot: int) -> int | None:
    """Thumbnails hold the valid frame slots in order; valid slots are the first ones."""
    return frame_slot if 0 <= frame_slot < len(e.thumbnails) else None


def _short(label: str, n: int = 24) -> str:
    return label if len(label) <= n else label[:n - 1] + "…"


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


# ----------------------------------------------------------------------------------------------------------------
# HTML


def png_bytes(rgb: np.ndarray) -> bytes:
    """An ``(H, W, 3)`` uint8 image as PNG bytes (zlib, no image library)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _fit(rgb: np.ndarray, side: int) -> np.ndarray:
    """Every k-th pixel, so that the image is at most ``side`` pixels wide and high (keeps the page small)."""
    step = -(-max(rgb.shape[:2]) // side)
    return rgb[::step, ::step] if step > 1 else rgb


def _data_uri(rgb: np.ndarray, scale: int = 1) -> str:
    if scale > 1:
        rgb = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


def _colour(value: float, vmax: float) -> str:
    """Red for positive, blue for negative, white at 0 (the PNG's RdBu colours, roughly)."""
    x = max(-1.0, min(1.0, value / vmax)) if vmax > 0 else 0.0
    if x >= 0:
        r, g, b = 255, round(255 - 180 * x), round(255 - 200 * x)
    else:
        r, g, b = round(255 + 200 * x), round(255 + 140 * x), 255
    return f"rgb({r},{g},{b})"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;max-width:80em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:2em} .note{color:#555;font-size:.92em;max-width:60em}
table.map{border-collapse:collapse;margin:.6em 0} table.map td,table.map th{border:1px solid #ddd;padding:2px 5px;
font-size:.8em;text-align:center;min-width:3.6em} table.map th.row{text-align:right;font-weight:normal;
white-space:nowrap} td.weak{color:#999} img.thumb{display:block;margin:auto;image-rendering:pixelated}
.legend span{display:inline-block;width:2.2em;height:1em;vertical-align:middle;border:1px solid #ccc}
.span{font-size:.75em;color:#555} code{background:#f4f4f4;padding:0 .2em}
"""


def write_html(e: PairExplanation, path: str | Path) -> Path:
    """One page with every level's map, for someone who never read the paper."""
    esc = html.escape
    thumbs = [_data_uri(_fit(t, 96), scale=max(1, 64 // max(t.shape[0], 1))) for t in e.thumbnails]
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>Why this video matches: {esc(_clip(e.query, 60))}</title>", f"<style>{_CSS}</style></head><body>",
           f"<h1>Why does this video match &ldquo;{esc(e.query)}&rdquo;?</h1>",
           f'<p class="note">Video: <code>{esc(_display(e.video))}</code>. Model package '
           f"<code>{esc(e.model_sha256[:12])}</code>.</p>",
           '<p class="note">The model compares the words of the query with the moments of the video and adds up how '
           "well they match (the score). Each table below asks, for one word and one moment: <b>do they work "
           "together?</b> The number is the <i>Banzhaf interaction</i>: how much more the pair adds to the score "
           "when both are there than the two add separately, averaged over every combination of the other words "
           "and moments. <span style=\"color:#b22\">Red</span>: they cooperate (the word finds what it describes "
           "in that moment). <span style=\"color:#24b\">Blue</span>: they compete (the word is already matched "
           "elsewhere, so this moment adds less for it). White: no link. Faded numbers are within two standard "
           "errors of zero (the estimate cannot tell their sign). ⟨start⟩ and ⟨end⟩ are the two tokens the text "
           "encoder adds around every query; they take part like words.</p>",
           '<p class="note">The <i>alone</i> row and column (in italics) are each word\'s and each moment\'s own '
           "contribution (its Banzhaf value: what it adds to the score on average, whoever else is there). To find "
           "the moments the match rests on, read that row: a moment can matter a lot on its own and still show "
           "blue cells, when it makes other moments unnecessary.</p>",
           '<p class="note">The model works at three levels: single words and frames (entity), and twice-merged '
           "groups of them (action, then event), which the model forms itself by clustering similar tokens. A "
           "group lists the words or the frames (with their times) it merged when the package says so.</p>"]
    for m in e.levels:
        out += _html_level(m, e, thumbs)
    out.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _value_cell(values, stderr, k: int, label: str, vmax: float) -> str:
    if values is None:
        return "<td></td>"
    v, se = float(values[k]), float(stderr[k])
    tip = html.escape(f"{label} alone: {v:+.5f} ± {se:.5f}")
    return (f'<td class="value" style="background:{_colour(v, vmax)};font-style:italic" title="{tip}">'
            f"{v:+.3f}</td>")


def _html_level(m: LevelMap, e: PairExplanation, thumbs: Sequence[str]) -> list[str]:
    esc = html.escape
    est = m.map
    how = ("every combination counted (exact)" if est.exact
           else f"estimated from {est.samples} random combinations (seed {est.seed})")
    acc = m.accuracy()
    vmax = acc["max_abs_interaction"]
    out = [f"<h2>{esc(LEVEL_TITLES.get(m.level, m.level))}</h2>",
           f'<p class="note">Score at this level: <b>{m.score:.4f}</b>. Interactions {how}; the median standard '
           f"error is {100 * acc['median_stderr_ratio']:.1f} % of the largest interaction ({vmax:.4f}).</p>"]
    if m.level != "entity" and not m.clusters_known:
        out.append('<p class="note">This model package does not record which words and frames each group merged '
                   "(it was exported before that was added), so the groups are shown by number only.</p>")
    vals = np.concatenate([m.map.row_values, m.map.col_values]) if m.map.row_values is not None else np.zeros(1)
    vmax_value = float(np.abs(vals).max()) or 1e-9
    out.append('<table class="map"><tr><th></th>')
    for c in m.cols:
        frames = _frames_of(c)
        imgs = "".join(f'<img class="thumb" src="{thumbs[j]}" alt="frame at {c.times[k]:.1f} s" width="48">'
                       for k, j in enumerate(frames[:3]) if 0 <= j < len(thumbs))
        spans = c.spans()
        span = ("" if not spans else '<div class="span">'
                + ", ".join(f"{a:.1f} s" if a == b else f"{a:.1f}&ndash;{b:.1f} s" for a, b in spans) + "</div>")
        name = esc(c.label.split(":")[0]) if c.kind == "cluster" else esc(c.label)
        out.append(f"<th>{imgs}{name}{span}</th>")
    out.append('<th class="value" title="what the word adds to the score on its own, on average">alone</th></tr>')
    for r, row in enumerate(m.rows):
        out.append(f'<tr><th class="row">{esc(row.label)}</th>')
        for c, col in enumerate(m.cols):
            value, se = float(m.values[r, c]), float(m.stderr[r, c])
            weak = abs(value) <= 2 * se
            tip = f"{row.label} × {col.label}: {value:+.5f} ± {se:.5f}"
            out.append(f'<td style="background:{_colour(value, vmax)}" class="{"weak" if weak else ""}" '
                       f'title="{esc(tip)}">{value:+.3f}</td>')
        out.append(_value_cell(m.map.row_values, m.map.row_stderr, r, row.label, vmax_value) + "</tr>")
    out.append('<tr><th class="row" title="what the moment adds to the score on its own, on average">alone</th>')
    out += [_value_cell(m.map.col_values, m.map.col_stderr, c, col.label, vmax_value) for c, col in enumerate(m.cols)]
    out.append("<td></td></tr></table>")
    out.append(f'<p class="legend note"><span style="background:{_colour(-vmax, vmax)}"></span> {-vmax:+.3f} '
               f'<span style="background:#fff"></span> 0 <span style="background:{_colour(vmax, vmax)}"></span> '
               f"{vmax:+.3f}</p>")
    return out
