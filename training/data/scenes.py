"""Synthetic scenes: coloured shapes and the events that happen to them, and the held-out-combination split.

A :class:`Scene` is a few objects (each a distinct shape) and 2-3 events in sequence, one per object; an event
is one of :data:`ACTIONS` and happens in its own segment of whole seconds. Everything is in frame fractions
(x, y in [0, 1], y down), so one scene renders at any size. :func:`object_state` says where each object is, in
which colour, and whether it is visible at a time ``t``; rendering and tests both use it.

Timing (why whole seconds): the official sampling keeps one frame per second (frame ``k * fps`` shows time
``k`` s), so a ``seconds``-second video decoded with ``max_frames >= seconds`` sees every second. Each event
takes a segment ``[start, end)`` of at least 2 s: appear / disappear / turn switch at ``start + 0.5`` (the frame
at ``start`` shows the state before, the one at ``start + 1`` the state after), and a move goes from its
start position at ``start`` to its end position at ``end - 1``. So every event is visible in the sampled frames.

Split (:func:`plan_split`): held-out ``(colour, shape, action)`` triples - one per (colour, shape) object, chosen
so that every colour, shape and action, and every (colour, shape), (colour, action) and (shape, action) pair,
still occurs in train. Train scenes contain no held-out triple; every test scene contains at least one.

Evaluation splits (:data:`EVAL_SPLITS`): the test scenes of a seed come from one stream (its *held-out stream*:
position 0, 1, 2, ... in drawing order, every scene with a held-out triple and a caption of its own), and named
ranges of it are the splits the figures are quoted on. ``validation`` (positions 0-119) is the 120-video test set
of the demo, which chose among training variants; ``test`` (positions 360-719) was never used to train or to
choose anything. Positions 120-359 (:data:`DIAGNOSTIC_RANGE`) were used to diagnose the caption decoder and belong
to neither.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np

from hbi_runtime.errors import BadInputError, UsageError

# Vocabulary (each word is one CLIP BPE token). RGB values are far apart so they survive yuv420p chroma
# subsampling and a 32x32 resize.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
}
SHAPES = ("square", "circle", "triangle", "cross")
MOVES: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                         "down": (0.0, 1.0)}
ACTIONS = (*MOVES, "appear", "disappear", "turn")
BACKGROUND = (24, 24, 24)

RADIUS = 0.12  # half the side of an object's box, as a fraction of the frame
STEP = 0.30  # how far a move carries an object
MARGIN = 0.04  # least gap between objects' boxes (the whole path of a moving one) and to the frame edge
MIN_SEGMENT_S = 2  # an event needs the sampled frame before and after it
SWITCH_S = 0.5  # appear / disappear / turn happen this long into their segment
PLACEMENT_TRIES = 200

Triple = tuple[str, str, str]  # (colour, shape, action)


@dataclass(frozen=True)
class SceneObject:
    colour: str  # colour at the start (a "turn" changes it)
    shape: str
    x: float  # centre at the start, fraction of the width
    y: float  # centre at the start, fraction of the height (0 = top)


@dataclass(frozen=True)
class Event:
    obj: int  # index into Scene.objects
    action: str  # one of ACTIONS
    start: int  # seconds
    end: int  # seconds, exclusive
    colour_to: str | None = None  # the new colour of a "turn"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    events: tuple[Event, ...]  # in time order
    seconds: int

    def triples(self) -> tuple[Triple, ...]:
        """The (colour, shape, action) of each event, in order (colour: the one the object has before it)."""
        return tuple((self.objects[e.obj].colour, self.objects[e.obj].shape, e.action) for e in self.events)

    def key(self) -> tuple:
        """What a caption says about the scene (positions left out): two scenes with one key are one caption."""
        return tuple((*t, e.colour_to) for t, e in zip(self.triples(), self.events))

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "objects": [asdict(o) for o in self.objects],
                "events": [asdict(e) for e in self.events]}

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        try:
            scene = cls(objects=tuple(SceneObject(**o) for o in data["objects"]),
                        events=tuple(Event(**e) for e in data["events"]), seconds=int(data["seconds"]))
        except (KeyError, TypeError) as exc:
            raise BadInputError(f"scene: malformed entry ({exc})", hint="regenerate the data set") from None
        validate_scene(scene)
        return scene


def validate_scene(scene: Scene) -> None:
    """Refuse a scene that cannot be rendered or captioned unambiguously.

    Raises:
        UsageError: an unknown word, two objects of one shape, events overlapping or out of order, a segment
            shorter than MIN_SEGMENT_S, an object acted on twice, or a "turn" without a new colour.
    """
    shapes = [o.shape for o in scene.objects]
    bad = [o for o in scene.objects if o.colour not in COLOURS or o.shape not in SHAPES]
    if bad or len(set(shapes)) != len(shapes):
        raise UsageError(f"scene objects need known colours, known and distinct shapes; got {scene.objects}")
    previous_end = 0
    for e in scene.events:
        if e.action not in ACTIONS or not 0 <= e.obj < len(scene.objects):
            raise UsageError(f"event {e}: unknown action or object index")
        if e.start < previous_end or e.end - e.start < MIN_SEGMENT_S or e.end > scene.seconds:
            raise UsageError(f"event {e}: segments must be in order, >= {MIN_SEGMENT_S} s, within "
                             f"{scene.seconds} s")
        if (e.action == "turn") != (e.colour_to is not None) or (
                e.colour_to is not None and e.colour_to not in (set(COLOURS) - {scene.objects[e.obj].colour})):
            raise UsageError(f"event {e}: a turn needs a new known colour, other actions none")
        previous_end = e.end
    if len({e.obj for e in scene.events}) != len(scene.events):
        raise UsageError("scene: each object takes part in at most one event")


@dataclass(frozen=True)
class ObjectState:
    visible: bool
    colour: str
    x: float
    y: float


def object_state(scene: Scene, index: int, t: float) -> ObjectState:
    """Where object ``index`` is, in which colour, and whether it shows at time ``t`` seconds."""
    obj = scene.objects[index]
    event = next((e for e in scene.events if e.obj == index), None)
    visible, colour, x, y = True, obj.colour, obj.x, obj.y
    if event is None:
        return ObjectState(visible, colour, x, y)
    switched = t >= event.start + SWITCH_S
    if event.action == "appear":
        visible = switched
    elif event.action == "disappear":
        visible = not switched
    elif event.action == "turn" and switched:
        colour = event.colour_to
    elif event.action in MOVES:
        frac = min(max((t - event.start) / max(event.end - 1 - event.start, 1), 0.0), 1.0)
        dx, dy = MOVES[event.action]
        x, y = x + dx * STEP * frac, y + dy * STEP * frac
    return ObjectState(visible, colour, x, y)


def segments(n_events: int, seconds: int) -> list[tuple[int, int]]:
    """Split ``[0, seconds)`` into ``n_events`` consecutive whole-second segments, as even as possible."""
    if n_events < 1 or n_events * MIN_SEGMENT_S > seconds:
        raise UsageError(f"{n_events} events need at least {n_events * MIN_SEGMENT_S} s, got seconds={seconds}",
                         hint=f"give seconds >= {MIN_SEGMENT_S} x the most events per video")
    base, extra = divmod(seconds, n_events)
    bounds = np.cumsum([0] + [base + (1 if i < extra else 0) for i in range(n_events)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


# ----------------------------------------------------------------------------------------------------------------
# Random scenes


def _swept_box(x: float, y: float, action: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) covering an object over the whole video (its path, for a move)."""
    dx, dy = MOVES.get(action, (0.0, 0.0))
    x2, y2 = x + dx * STEP, y + dy * STEP
    return min(x, x2) - RADIUS, min(y, y2) - RADIUS, max(x, x2) + RADIUS, max(y, y2) + RADIUS


def _apart(a: tuple, b: tuple) -> bool:
    return a[2] + MARGIN <= b[0] or b[2] + MARGIN <= a[0] or a[3] + MARGIN <= b[1] or b[3] + MARGIN <= a[1]


def _place(actions: list[str], rng: np.random.Generator) -> list[tuple[float, float]] | None:
    """Start centres for objects doing ``actions`` so that no two paths come near; None if none found."""
    lo, hi = RADIUS + MARGIN, 1.0 - RADIUS - MARGIN
    for _ in range(PLACEMENT_TRIES):
        centres, boxes = [], []
        for action in actions:
            dx, dy = MOVES.get(action, (0.0, 0.0))
            x = rng.uniform(lo + max(-dx, 0) * STEP, hi - max(dx, 0) * STEP)
            y = rng.uniform(lo + max(-dy, 0) * STEP, hi - max(dy, 0) * STEP)
            box = _swept_box(x, y, action)
            if not all(_apart(box, other) for other in boxes):
                break
            centres.append((round(x, 4), round(y, 4)))
            boxes.append(box)
        else:
            return centres
    return None


def random_scene(rng: np.random.Generator, seconds: int, n_events: int) -> Scene:
    """One scene: ``n_events`` objects of distinct shapes, one event each, in consecutive segments."""
    spans = segments(n_events, seconds)
    while True:
        shapes = rng.choice(len(SHAPES), size=n_events, replace=False)
        colours = [list(COLOURS)[i] for i in rng.integers(len(COLOURS), size=n_events)]
        actions = [ACTIONS[i] for i in rng.integers(len(ACTIONS), size=n_events)]
        centres = _place(actions, rng)
        if centres is not None:
            break
    objects, events = [], []
    for i, ((start, end), action) in enumerate(zip(spans, actions)):
        objects.append(SceneObject(colours[i], SHAPES[shapes[i]], *centres[i]))
        colour_to = None
        if action == "turn":
            others = [c for c in COLOURS if c != colours[i]]
            colour_to = others[int(rng.integers(len(others)))]
        events.append(Event(i, action, start, end, colour_to))
    return Scene(tuple(objects), tuple(events), seconds)


# ----------------------------------------------------------------------------------------------------------------
# The held-out split


def all_triples() -> list[Triple]:
    return [(c, s, a) for c in COLOURS for s in SHAPES for a in ACTIONS]


def _pairs_covered(held_out: set[Triple]) -> bool:
    """True when every (colour, shape), (colour, action) and (shape, action) pair keeps a triple in train."""
    train = [t for t in all_triples() if t not in held_out]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        seen = {(t[i], t[j]) for t in train}
        if len(seen) != len({(t[i], t[j]) for t in all_triples()}):
            return False
    return True


def choose_held_out(rng: np.random.Generator) -> frozenset[Triple]:
    """One held-out action per (colour, shape) object, every action held out about equally often.

    Returns:
        The held-out triples; every single word and every pair of attributes keeps training examples.
    """
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    while True:
        actions = np.resize(np.arange(len(ACTIONS)), len(objects))  # balanced: each action ~ equally often
        rng.shuffle(actions)
        held = {(c, s, ACTIONS[a]) for (c, s), a in zip(objects, actions)}
        if _pairs_covered(held):
            return frozenset(held)


@dataclass(frozen=True)
class HeldOutRange:
    """Positions ``[start, stop)`` of a seed's held-out stream (the test scenes :func:`plan_split` draws, in order)."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def overlaps(self, other: HeldOutRange) -> bool:
        return self.start < other.stop and other.start < self.stop


# The named evaluation splits (the same positions for every seed; the demo's figures are seed 0's).
# validation: the demo's 120 test videos (DemoRecipe.n_test), which chose among training variants.
# test: never used to train or to choose; the figures are quoted on it.
EVAL_SPLITS: dict[str, HeldOutRange] = {"validation": HeldOutRange(0, 120), "test": HeldOutRange(360, 720)}
DIAGNOSTIC_RANGE = HeldOutRange(120, 360)  # used to diagnose the caption decoder (docs/captioning.md): neither


def eval_split(name: str) -> HeldOutRange:
    """The held-out range of a named evaluation split (:data:`EVAL_SPLITS`).

    Raises:
        UsageError: an unknown name."""
    try:
        return EVAL_SPLITS[name]
    except KeyError:
        raise UsageError(f"unknown evaluation split {name!r}", hint=f"one of {', '.join(EVAL_SPLITS)}") from None


@dataclass(frozen=True)
class SplitPlan:
    held_out: frozenset[Triple]
    train: tuple[Scene, ...]
    test: tuple[Scene, ...]


def _draw(rng: np.random.Generator, n: int, seconds: int, events: tuple[int, int], keep, taken: set) -> list[Scene]:
    """``n`` random scenes with distinct keys (not in ``taken``) for which ``keep(scene)`` holds."""
    scenes = []
    tries = 0
    while len(scenes) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise UsageError(f"could not draw {n} distinct scenes (got {len(scenes)})",
                             hint="ask for fewer videos")
        scene = random_scene(rng, seconds, int(rng.integers(events[0], events[1] + 1)))
        if keep(scene) and scene.key() not in taken:
            taken.add(scene.key())
            scenes.append(scene)
    return scenes


def plan_split(n_train: int, n_test: int, seed: int, seconds: int = 8, events: tuple[int, int] = (2, 3), *,
               test_start: int = 0) -> SplitPlan:
    """The held-out triples and the train / test scenes, all from ``seed``.

    Independent random streams are used for the held-out set, train and test, so the test gallery of a seed
    does not change with ``n_train``. Captions (scene keys) are distinct across both splits.

    ``test_start``: the test scenes are positions ``[test_start, test_start + n_test)`` of the seed's held-out
    stream (the positions before are drawn and skipped), so a range is the same scenes whatever else is asked
    for, and two disjoint ranges share no scene (nor caption).

    Raises:
        UsageError: negative sizes or ``test_start``, a bad ``events`` range, or too few seconds for the events.
    """
    if n_train < 0 or n_test < 0 or test_start < 0 or not 1 <= events[0] <= events[1]:
        raise UsageError(f"plan_split: need n_train, n_test, test_start >= 0 and 1 <= events[0] <= events[1], got "
                         f"{n_train}, {n_test}, {test_start}, {events}")
    segments(events[1], seconds)  # the longest scene must fit: raises the UsageError that explains it
    held_rng, train_rng, test_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    held_out = choose_held_out(held_rng)
    taken: set = set()
    test = _draw(test_rng, test_start + n_test, seconds, events, lambda s: any(t in held_out for t in s.triples()),
                 taken)[test_start:]
    train = _draw(train_rng, n_train, seconds, events, lambda s: not any(t in held_out for t in s.triples()),
                  taken)
    return SplitPlan(held_out, tuple(train), tuple(test))


def words(captions: Iterable[str]) -> set[str]:
    """The words of some captions (lower case, punctuation dropped)."""
    return {w for c in captions for w in c.lower().replace(",", " ").replace(".", " ").split()}
