#!/usr/bin/env python3
"""A CTR ranker on EmbArk: pretrained embeddings + a light online model.

The pattern EmbArk exists for: a ranker that does not run neural networks
itself asks EmbArk for the pretrained embeddings of its candidates' titles
(`minilm-l6-v2`) and images (`efficientnet-lite0`) and feeds them to a small
model trained on its click log. This example does all of it end to end:

1. builds a catalogue: product titles generated from templates (colour,
   material, category), each with an image URL, either of files it serves
   itself on a loopback HTTP server (`--serve-images DIR`) or given by the
   user (`--image-urls FILE`);
2. fetches both models' embeddings through `embark_client.EmbArk`, asking
   again while rows are pending, up to `--wait-secs`; what is still OOV then
   keeps `mask` False (a broken image link stays `OOV_FAILED` for good);
3. generates a click log from the items' *content*: four user segments with
   hidden tastes for categories, colour tones and what the picture shows;
4. trains logistic regressions in numpy: a baseline (segment, item id,
   OOV bits) and the same plus segment x embedding features;
5. scores a candidate slate online: one Lookup per model at request time,
   the mask turned into features, and the lookup latency measured;
6. reports AUC with and without embeddings, on held-out impressions and on
   cold-start items (`--json PATH` writes the report).

Run it against `scripts/up.sh` started with `--fetch-allow-nets 127.0.0.0/8`
(Retina refuses loopback image URLs otherwise):

    pip install ./clients/python
    python examples/ranker/ranker.py --serve-images tests/fixtures/photos

Everything random comes from `--seed`, so a run is reproducible up to
floating point.
"""

from __future__ import annotations

import argparse
import http.server
import json
import mimetypes
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
import numpy.typing as npt

from embark_client import TLS, EmbArk, EmbArkError, LookupResult, Source

TEXT_MODEL = "minilm-l6-v2"
IMAGE_MODEL = "efficientnet-lite0"

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

# ---------------------------------------------------------------------------
# The catalogue's vocabulary and the users' hidden tastes.
#
# The tastes are written in terms of hand-made content attributes (a
# category's group, a colour's tone) that the model never sees: it sees only
# the embeddings of the titles, so it can beat the baseline only if MiniLM's
# vectors carry that meaning.
# ---------------------------------------------------------------------------

SEGMENTS = ("athlete", "homebody", "trendsetter", "techie")
#: Share of impressions per segment.
SEGMENT_SHARE = (0.3, 0.25, 0.25, 0.2)

CATEGORIES = {
    "running shoes": "sport", "hiking boots": "sport", "yoga mat": "sport",
    "track jacket": "sport", "gym bag": "sport",
    "table lamp": "home", "coffee mug": "home", "throw blanket": "home",
    "armchair": "home", "cushion cover": "home",
    "handbag": "fashion", "evening dress": "fashion", "scarf": "fashion",
    "sunglasses": "fashion", "ankle boots": "fashion",
    "smartwatch": "tech", "wireless headphones": "tech", "laptop sleeve": "tech",
    "phone case": "tech", "mechanical keyboard": "tech",
}  # fmt: skip
COLOURS = {
    "red": "bright", "orange": "bright", "yellow": "bright", "lime green": "bright",
    "black": "dark", "navy": "dark", "charcoal": "dark",
    "white": "neutral", "beige": "neutral", "light grey": "neutral",
}  # fmt: skip
MATERIALS = ("leather", "cotton", "wool", "recycled plastic", "aluminium", "canvas", "bamboo")
ADJECTIVES = ("classic", "lightweight", "vintage", "premium", "everyday", "compact")

GROUP_TASTE = {
    "athlete": {"sport": 1.6, "home": -0.6, "fashion": -0.4, "tech": 0.3},
    "homebody": {"sport": -0.8, "home": 1.6, "fashion": 0.0, "tech": -0.4},
    "trendsetter": {"sport": -0.2, "home": -0.4, "fashion": 1.6, "tech": -0.5},
    "techie": {"sport": 0.0, "home": -0.6, "fashion": -0.8, "tech": 1.6},
}
TONE_TASTE = {
    "athlete": {"bright": 0.8, "dark": -0.2, "neutral": -0.5},
    "homebody": {"bright": -0.5, "dark": -0.1, "neutral": 0.7},
    "trendsetter": {"bright": 0.1, "dark": 0.8, "neutral": -0.3},
    "techie": {"bright": -0.4, "dark": 0.6, "neutral": 0.1},
}
#: Every segment's taste for what a picture shows is a hidden random
#: direction in the image model's space, scaled to this many logits per
#: standard deviation: near-duplicate pictures please alike.
IMAGE_TASTE_SCALE = 0.8
#: A listing whose picture cannot be shown (its URL is broken) is clicked
#: less: the OOV mask of the image model carries real signal.
BROKEN_IMAGE_LOGIT = -1.0
#: Item quality the content does not explain (the model can learn it only
#: through the item id, from the item's own clicks).
ITEM_NOISE = 0.4
BASE_LOGIT = -2.2

#: Share of the catalogue held out of the click log: cold-start items.
NEW_ITEM_SHARE = 0.2
#: Share of the held-in items' impressions used for testing.
TEST_SHARE = 0.25
#: Share of training impressions served while the item was still OOV (its
#: first impressions, before EmbArk had filled it): the ranker logged OOV
#: rows for them, and this is what teaches the model what an OOV row means.
SERVED_OOV_SHARE = 0.1
#: One served item in this many gets a broken image link (404).
BROKEN_LINK_EVERY = 20

PCA_DIMS = 16
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
#: Requests of the online scoring loop (the first one is printed).
ONLINE_ROUNDS = 50
ONLINE_SLATE = 12
#: Pause between two asks while rows are pending: Retina needs ~15 ms per
#: input, so a round trip every 200 ms costs nothing and waits little.
POLL_SECS = 0.2


def rng_for(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per purpose, so that changing how one part
    draws (more items, more impressions) does not reshuffle the others."""
    return np.random.default_rng([seed, int.from_bytes(stream.encode(), "little")])


# ---------------------------------------------------------------------------
# Images: a loopback HTTP server for local files.
# ---------------------------------------------------------------------------


class ImageServer:
    """Serves the image files of some directories on 127.0.0.1 (a free port),
    in a thread, so that EmbArk's Retina can fetch them as URLs.

    Directory `i` is served under `/i/`; any other path is a 404, which is
    how the catalogue's broken links are made. Use it as a context manager.
    """

    def __init__(self, directories: Sequence[Path]) -> None:
        self.files: dict[str, Path] = {}
        for index, directory in enumerate(directories):
            for path in sorted(directory.iterdir()):
                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                    self.files[f"/{index}/{path.name}"] = path
        if not self.files:
            raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, directories))}")
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
                path = files.get(self.path)
                if path is None:
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", mimetypes.guess_type(path.name)[0] or "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Quiet: Retina's fetches are not the example's output."""

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="image-server", daemon=True)

    def urls(self) -> list[str]:
        return [self.base + path for path in self.files]

    def missing_url(self, name: str) -> str:
        """A URL this server answers 404."""
        return f"{self.base}/missing/{name}.jpg"

    def __enter__(self) -> "ImageServer":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# ---------------------------------------------------------------------------
# The catalogue.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Catalogue:
    """Items as parallel arrays: a title, an image URL, and the hidden
    content attributes the click log is generated from."""

    titles: list[str]
    image_urls: list[str]
    group: list[str]
    tone: list[str]

    def __len__(self) -> int:
        return len(self.titles)


def make_catalogue(
    n: int, image_urls: Sequence[str], broken_url: Optional[Callable[[str], str]], seed: int
) -> Catalogue:
    """`n` distinct titles "<adjective> <colour> <material> <category>",
    each with one of `image_urls` (taken in turns, in a shuffled order). With
    `broken_url` (name -> URL of a 404), one item in BROKEN_LINK_EVERY gets
    a broken link instead."""
    combos = len(ADJECTIVES) * len(COLOURS) * len(MATERIALS) * len(CATEGORIES)
    if n > combos:
        raise ValueError(f"--items {n}: the templates make only {combos} distinct titles")
    rng = rng_for(seed, "catalogue")
    colours, categories = list(COLOURS), list(CATEGORIES)
    picks = rng.choice(combos, size=n, replace=False)
    adjective, rest = np.divmod(picks, len(COLOURS) * len(MATERIALS) * len(CATEGORIES))
    colour, rest = np.divmod(rest, len(MATERIALS) * len(CATEGORIES))
    material, category = np.divmod(rest, len(CATEGORIES))
    order = rng.permutation(len(image_urls))
    titles, urls, groups, tones = [], [], [], []
    for i in range(n):
        name = categories[category[i]]
        titles.append(f"{ADJECTIVES[adjective[i]]} {colours[colour[i]]} {MATERIALS[material[i]]} {name}")
        broken = broken_url is not None and i % BROKEN_LINK_EVERY == BROKEN_LINK_EVERY - 1
        urls.append(broken_url(f"item-{i}") if broken else image_urls[order[i % len(order)]])
        groups.append(CATEGORIES[name])
        tones.append(COLOURS[colours[colour[i]]])
    return Catalogue(titles, urls, groups, tones)


# ---------------------------------------------------------------------------
# Embeddings from EmbArk.
# ---------------------------------------------------------------------------


@dataclass
class Embeddings:
    """One model's rows for the catalogue: the matrix (OOV rows as EmbArk
    answered them), the sources, and the mask (True: a real vector)."""

    matrix: npt.NDArray[np.float32]
    sources: npt.NDArray[np.int32]

    @property
    def mask(self) -> Bools:
        return np.isin(self.sources, (Source.CACHE, Source.STORE))


def fetch_embeddings(
    client: EmbArk, keys: dict[str, list[str]], wait_secs: float
) -> tuple[dict[str, Embeddings], float]:
    """Every model's rows for its keys, asking again for the pending rows
    until none is left or `wait_secs` have passed.

    Both models are asked first, so that EmbArk queues all misses at once
    and fills them in parallel; later asks send only the rows still
    pending. What is pending at the deadline stays OOV (mask False): the
    ranker must cope with it anyway, as it will with tomorrow's new items.
    Returns the rows and the seconds waited.
    """
    started = time.monotonic()
    found = {}
    for model, model_keys in keys.items():
        first = client.lookup(model, model_keys)
        found[model] = Embeddings(first.matrix.copy(), first.sources.copy())
    while True:
        pending = {
            m: np.flatnonzero(np.isin(e.sources, (Source.OOV_PENDING, Source.OOV_UNAVAILABLE)))
            for m, e in found.items()
        }
        if not any(len(rows) for rows in pending.values()) or time.monotonic() - started >= wait_secs:
            return found, time.monotonic() - started
        time.sleep(POLL_SECS)
        for model, rows in pending.items():
            if len(rows):
                again = client.lookup(model, [keys[model][r] for r in rows])
                found[model].matrix[rows] = again.matrix
                found[model].sources[rows] = again.sources


# ---------------------------------------------------------------------------
# The click log.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClickLog:
    """Impressions: who (segment), what (catalogue index), clicked or not."""

    segment: Ints
    item: Ints
    click: Bools

    def take(self, rows: Ints) -> "ClickLog":
        return ClickLog(self.segment[rows], self.item[rows], self.click[rows])

    def __len__(self) -> int:
        return len(self.item)


def hidden_logits(catalogue: Catalogue, image: Embeddings, seed: int) -> Floats:
    """The click logit of every (segment, item): what users actually like.

    Tastes for the category's group and the colour's tone come from the
    hand-made tables; the taste for the picture is a per-segment random
    direction in the image model's space (a stand-in for "what the photo
    shows"), standardised over the catalogue. An item whose picture is
    broken gets BROKEN_IMAGE_LOGIT; one still pending after the wait (its
    content unknown here) gets no picture term. Each item also has a
    quality the content does not explain.
    """
    rng = rng_for(seed, "tastes")
    n = len(catalogue)
    logits = np.full((len(SEGMENTS), n), BASE_LOGIT)
    for s, segment in enumerate(SEGMENTS):
        logits[s] += [GROUP_TASTE[segment][g] + TONE_TASTE[segment][t] for g, t in zip(catalogue.group, catalogue.tone)]
    real = image.mask
    if real.sum() > 1:
        vectors = image.matrix[real].astype(np.float64)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True) + 1e-12
        vectors -= vectors.mean(axis=0)
        appeal = rng.standard_normal((len(SEGMENTS), vectors.shape[1])) @ vectors.T
        appeal -= appeal.mean(axis=1, keepdims=True)
        appeal /= appeal.std(axis=1, keepdims=True) + 1e-12
        logits[:, real] += IMAGE_TASTE_SCALE * appeal
    logits[:, image.sources == Source.OOV_FAILED] += BROKEN_IMAGE_LOGIT
    logits += ITEM_NOISE * rng.standard_normal(n)
    return logits


def make_click_log(logits: Floats, items: Ints, impressions: int, rng: np.random.Generator) -> ClickLog:
    """`impressions` random (segment, item) pairs over `items`, the items
    drawn with a skewed popularity, clicked with the hidden probability."""
    popularity = np.exp(0.7 * rng.standard_normal(len(items)))
    segment = rng.choice(len(SEGMENTS), size=impressions, p=SEGMENT_SHARE)
    item = items[rng.choice(len(items), size=impressions, p=popularity / popularity.sum())]
    click = rng.random(impressions) < 1.0 / (1.0 + np.exp(-logits[segment, item]))
    return ClickLog(segment.astype(np.int64), item.astype(np.int64), click)


# ---------------------------------------------------------------------------
# Features.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Projection:
    """PCA of one model's real rows, whitened: the ranker's compact view of
    a 384- or 1280-d vector. Fitted on the catalogue's real rows only, with
    no labels, so cold-start items may take part."""

    mean: Floats
    basis: Floats  # (k, dim), rows scaled so that projections have unit variance

    @classmethod
    def fit(cls, embeddings: Embeddings, dims: int) -> "Projection":
        rows = np.unique(embeddings.matrix[embeddings.mask].astype(np.float64), axis=0)
        mean = rows.mean(axis=0)
        _, singular, vt = np.linalg.svd(rows - mean, full_matrices=False)
        k = min(dims, len(rows) - 1)
        scale = singular[:k] / np.sqrt(len(rows) - 1)
        return cls(mean, vt[:k] / scale[:, None])

    def __call__(self, matrix: npt.ArrayLike) -> Floats:
        return np.asarray((np.asarray(matrix, dtype=np.float64) - self.mean) @ self.basis.T)


@dataclass(frozen=True)
class FeatureSet:
    """Which features a model gets. Every model gets the user segment and
    the item id (learnt popularity; unknown items have none).

    `embeddings`: segment x projected text and image vectors.
    `mask`: segment x "this row is OOV" bits, per embedding model; an OOV
    row's projection is then zero (the mean item), and the bit gives it a
    learnt bias. Without it, an OOV row is projected as if the OOV vector
    (zeros) were a real item's vector.
    """

    name: str
    embeddings: bool
    mask: bool


BASELINE = FeatureSet("without_embeddings", embeddings=False, mask=True)
WITH_EMBEDDINGS = FeatureSet("with_embeddings", embeddings=True, mask=True)
NO_MASK = FeatureSet("zero_vector_no_mask", embeddings=True, mask=False)


@dataclass(frozen=True)
class Rows:
    """What the ranker knows of each row to score: the segment, the item id
    (-1: never seen in training), each model's projected vector (of the row
    EmbArk answered) and whether that row is real."""

    segment: Ints
    item_id: Ints
    text: Floats
    text_real: Bools
    image: Floats
    image_real: Bools


def design(
    features: FeatureSet, rows: Rows, n_ids: int, text: Projection, image: Projection
) -> npt.NDArray[np.float32]:
    """The design matrix of `rows` (`n_ids` item-id columns; `text` and
    `image`, the projections that made the rows' vectors)."""
    n = len(rows.segment)
    segment = np.eye(len(SEGMENTS))[rows.segment]
    ids = np.zeros((n, n_ids))
    known = rows.item_id >= 0
    ids[np.flatnonzero(known), rows.item_id[known]] = 1.0
    blocks = [segment, ids]
    if features.mask:
        oov = np.stack([~rows.text_real, ~rows.image_real], axis=1).astype(np.float64)
        blocks.append((segment[:, :, None] * oov[:, None, :]).reshape(n, -1))
    if features.embeddings:
        # An OOV row: the mean item (zero) when the mask bits say what it
        # is, else EmbArk's default OOV row (zeros) projected like a real one.
        if features.mask:
            stand_in_text, stand_in_image = np.zeros(1), np.zeros(1)
        else:
            stand_in_text, stand_in_image = text(np.zeros((1, text.mean.size))), image(np.zeros((1, image.mean.size)))
        item = np.concatenate(
            [
                np.where(rows.text_real[:, None], rows.text, stand_in_text),
                np.where(rows.image_real[:, None], rows.image, stand_in_image),
            ],
            axis=1,
        )
        blocks.append((segment[:, :, None] * item[:, None, :]).reshape(n, -1))
    return np.concatenate(blocks, axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# The model and the metric.
# ---------------------------------------------------------------------------


class LogisticRegression:
    """Logistic regression with L2, trained by minibatch Adam: small enough
    to retrain every few minutes on fresh clicks, which is the point of
    pairing it with pretrained embeddings."""

    def __init__(self, l2: float = 1e-3, learning_rate: float = 0.02, epochs: int = 20, batch: int = 256) -> None:
        self.l2, self.learning_rate, self.epochs, self.batch = l2, learning_rate, epochs, batch
        self.weights: Floats = np.zeros(0)
        self.bias = 0.0

    def fit(self, x: npt.NDArray[np.float32], y: Bools, rng: np.random.Generator) -> "LogisticRegression":
        n, d = x.shape
        target = y.astype(np.float64)
        self.bias = float(np.log((target.mean() + 1e-6) / (1 - target.mean() + 1e-6)))
        params = np.concatenate([np.zeros(d), [self.bias]])
        m, v = np.zeros_like(params), np.zeros_like(params)
        beta1, beta2, step = 0.9, 0.999, 0
        for _ in range(self.epochs):
            for rows in np.array_split(rng.permutation(n), max(1, n // self.batch)):
                xb = x[rows]
                error = 1.0 / (1.0 + np.exp(-(xb @ params[:-1] + params[-1]))) - target[rows]
                grad = np.concatenate([xb.T @ error / len(rows) + self.l2 * params[:-1], [error.mean()]])
                step += 1
                m = beta1 * m + (1 - beta1) * grad
                v = beta2 * v + (1 - beta2) * grad**2
                params -= self.learning_rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + 1e-8)
        self.weights, self.bias = params[:-1], float(params[-1])
        return self

    def predict(self, x: npt.NDArray[np.float32]) -> Floats:
        """Click probabilities."""
        return np.asarray(1.0 / (1.0 + np.exp(-(x @ self.weights + self.bias))))


def auc(scores: Floats, labels: Bools) -> float:
    """ROC AUC as the Mann-Whitney U statistic: the probability that a
    random click is scored above a random non-click (ties count half, via
    average ranks)."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties averaged
    ranks = average_rank[inverse]
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


# ---------------------------------------------------------------------------
# The experiment.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ranker:
    """A trained model with what scoring needs besides it."""

    features: FeatureSet
    model: LogisticRegression
    text: Projection
    image: Projection
    n_ids: int

    def score(self, rows: Rows) -> Floats:
        return self.model.predict(design(self.features, rows, self.n_ids, self.text, self.image))


def log_rows(log: ClickLog, known: Bools, text: Floats, image: Floats, real: dict[str, Bools], withheld: Bools) -> Rows:
    """The rows of the impressions of `log` as the ranker saw them: item ids
    only for `known` items, vectors withheld (OOV) where `withheld`."""
    return Rows(
        segment=log.segment,
        item_id=np.where(known[log.item], log.item, -1),
        text=text[log.item],
        text_real=real[TEXT_MODEL][log.item] & ~withheld,
        image=image[log.item],
        image_real=real[IMAGE_MODEL][log.item] & ~withheld,
    )


def experiment(
    catalogue: Catalogue, found: dict[str, Embeddings], impressions: int, seed: int
) -> tuple[dict[str, Any], Ranker, Bools]:
    """Generates the click log, trains the three models and evaluates them.

    Returns the AUC part of the report, the ranker with embeddings, and
    which items are cold-start (never in the training log)."""
    n = len(catalogue)
    new = np.zeros(n, dtype=bool)
    new[rng_for(seed, "cold-start").choice(n, size=max(1, round(NEW_ITEM_SHARE * n)), replace=False)] = True
    logits = hidden_logits(catalogue, found[IMAGE_MODEL], seed)
    held_in = make_click_log(logits, np.flatnonzero(~new), impressions, rng_for(seed, "clicks"))
    cold_impressions = max(1, round(impressions * NEW_ITEM_SHARE))
    cold = make_click_log(logits, np.flatnonzero(new), cold_impressions, rng_for(seed, "cold-clicks"))
    test = rng_for(seed, "test-split").random(len(held_in)) < TEST_SHARE
    train_log, test_log = held_in.take(np.flatnonzero(~test)), held_in.take(np.flatnonzero(test))

    text_projection = Projection.fit(found[TEXT_MODEL], PCA_DIMS)
    image_projection = Projection.fit(found[IMAGE_MODEL], PCA_DIMS)
    text = text_projection(found[TEXT_MODEL].matrix)
    image = image_projection(found[IMAGE_MODEL].matrix)
    real = {m: e.mask for m, e in found.items()}
    known = ~new
    served_oov = rng_for(seed, "served-oov").random(len(train_log)) < SERVED_OOV_SHARE
    train = log_rows(train_log, known, text, image, real, served_oov)
    sets = {
        "test": (log_rows(test_log, known, text, image, real, np.zeros(len(test_log), bool)), test_log.click),
        "new_items": (log_rows(cold, known, text, image, real, np.zeros(len(cold), bool)), cold.click),
        "new_items_oov": (log_rows(cold, known, text, image, real, np.ones(len(cold), bool)), cold.click),
    }

    rankers = {}
    for features in (BASELINE, WITH_EMBEDDINGS, NO_MASK):
        x = design(features, train, n, text_projection, image_projection)
        model = LogisticRegression().fit(x, train_log.click, rng_for(seed, f"sgd-{features.name}"))
        rankers[features.name] = Ranker(features, model, text_projection, image_projection, n)

    report: dict[str, Any] = {}
    for name, (rows, clicks) in sets.items():
        report[name] = {
            "impressions": len(clicks),
            "ctr": round(float(clicks.mean()), 4),
            **{f.name: round(auc(rankers[f.name].score(rows), clicks), 4) for f in (BASELINE, WITH_EMBEDDINGS)},
        }
    # The mask's role: a slate mixes known items with new ones that are
    # still OOV. With the mask bits an OOV row is the mean item plus a
    # learnt bias; without them EmbArk's zero row is scored as if it were
    # a real item's vector.
    mixed_rows = concat_rows(sets["test"][0], sets["new_items_oov"][0])
    mixed_clicks = np.concatenate([test_log.click, cold.click])
    oov_rows = slice(len(test_log), None)
    report["mask_ablation"] = {
        "impressions": len(mixed_clicks),
        "oov_impressions": len(cold),
        "observed_ctr_of_oov_rows": round(float(cold.click.mean()), 4),
    }
    for features in (WITH_EMBEDDINGS, NO_MASK):
        scores = rankers[features.name].score(mixed_rows)
        report["mask_ablation"][features.name] = {
            "auc": round(auc(scores, mixed_clicks), 4),
            "log_loss": round(log_loss(scores, mixed_clicks), 4),
            "predicted_ctr_of_oov_rows": round(float(scores[oov_rows].mean()), 4),
        }
    report["train"] = {
        "impressions": len(train_log),
        "ctr": round(float(train_log.click.mean()), 4),
        "served_oov": int(served_oov.sum()),
    }
    return report, rankers[WITH_EMBEDDINGS.name], new


def log_loss(probabilities: Floats, labels: Bools) -> float:
    """Mean negative log-likelihood: unlike AUC, it also judges whether the
    predicted click rates are right, which is what an OOV row's fallback
    is about."""
    p = np.clip(probabilities, 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(labels, np.log(p), np.log(1 - p))))


def concat_rows(a: Rows, b: Rows) -> Rows:
    return Rows(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in Rows.__dataclass_fields__))


# ---------------------------------------------------------------------------
# Online scoring.
# ---------------------------------------------------------------------------


def percentile_ms(samples: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(samples) * 1e3, q)), 3)


class Scored(NamedTuple):
    """One online request: the scores, both lookups, and each lookup's
    latency in seconds."""

    scores: Floats
    text: LookupResult
    image: LookupResult
    text_secs: float
    image_secs: float


def score_slate(
    client: EmbArk, ranker: Ranker, segment: int, titles: list[str], urls: list[str], item_ids: Ints
) -> Scored:
    """What a ranker does per request: one Lookup per model for the
    candidates, the mask as features, one matrix product."""
    started = time.perf_counter()
    text = client.lookup(TEXT_MODEL, titles)
    text_done = time.perf_counter()
    image = client.lookup(IMAGE_MODEL, urls)
    image_done = time.perf_counter()
    rows = Rows(
        segment=np.full(len(titles), segment),
        item_id=item_ids,
        text=ranker.text(text.matrix),
        text_real=text.mask,
        image=ranker.image(image.matrix),
        image_real=image.mask,
    )
    return Scored(ranker.score(rows), text, image, text_done - started, image_done - text_done)


def online(client: EmbArk, ranker: Ranker, catalogue: Catalogue, new: Bools, seed: int) -> dict[str, Any]:
    """Scores a slate for one segment ONLINE_ROUNDS times: known and
    cold-start items plus one listing created just now, which EmbArk has
    never seen (its rows come back OOV_PENDING: the mask makes it a fair
    candidate rather than an error). Reports the first request's ranking
    and the lookup latencies over all rounds."""
    rng = rng_for(seed, "online")
    segment = int(rng.integers(len(SEGMENTS)))
    picks = rng.choice(len(catalogue), size=min(ONLINE_SLATE - 1, len(catalogue)), replace=False)
    titles = [catalogue.titles[i] for i in picks]
    urls = [catalogue.image_urls[i] for i in picks]
    item_ids = np.where(new[picks], -1, picks)
    # A unique title, so it is new to EmbArk on every run; its picture is
    # a catalogue image (a listing reusing a photo).
    titles.append(f"{catalogue.titles[picks[0]]} (listed {uuid.uuid4().hex[:8]})")
    urls.append(catalogue.image_urls[picks[0]])
    item_ids = np.append(item_ids, -1)

    answers, total_secs = [], []
    for _ in range(ONLINE_ROUNDS):
        started = time.perf_counter()
        answers.append(score_slate(client, ranker, segment, titles, urls, item_ids))
        total_secs.append(time.perf_counter() - started)
    first = answers[0]
    scores, text_sources, image_sources = first.scores, first.text.source_names(), first.image.source_names()
    text_secs, image_secs = [a.text_secs for a in answers], [a.image_secs for a in answers]
    order = np.argsort(-scores, kind="stable")
    return {
        "segment": SEGMENTS[segment],
        "candidates": len(titles),
        "rounds": ONLINE_ROUNDS,
        "lookup_ms": {
            TEXT_MODEL: {"p50": percentile_ms(text_secs, 50), "p95": percentile_ms(text_secs, 95)},
            IMAGE_MODEL: {"p50": percentile_ms(image_secs, 50), "p95": percentile_ms(image_secs, 95)},
        },
        "request_ms": {"p50": percentile_ms(total_secs, 50), "p95": percentile_ms(total_secs, 95)},
        "ranking": [
            {
                "title": titles[r],
                "image_url": urls[r],
                "score": round(float(scores[r]), 4),
                "text_source": text_sources[r],
                "image_source": image_sources[r],
                "cold_start": bool(item_ids[r] < 0),
            }
            for r in order
        ],
    }


# ---------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("EMBARK_ADDR", "127.0.0.1:50051"),
        help="EmbArk's address (default $EMBARK_ADDR, else %(default)s): host:port, http(s)://host:port or unix:///path",
    )
    parser.add_argument("--token-file", type=Path, help="bearer token file (default: $EMBARK_TOKEN)")
    parser.add_argument("--ca", type=Path, help="CA of the server's TLS certificate (turns TLS on)")
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument(
        "--serve-images",
        type=Path,
        action="append",
        metavar="DIR",
        help="serve the images of DIR on 127.0.0.1 (repeatable); the server needs --fetch-allow-nets 127.0.0.0/8",
    )
    images.add_argument("--image-urls", type=Path, metavar="FILE", help="image URLs, one per line")
    parser.add_argument("--items", type=int, default=300, help="catalogue size (default %(default)s)")
    parser.add_argument(
        "--impressions", type=int, default=20000, help="impressions of held-in items (default %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of everything random (default %(default)s)")
    parser.add_argument(
        "--wait-secs", type=float, default=120.0, help="how long to wait for pending embeddings (default %(default)s)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the report here")
    args = parser.parse_args(argv)
    if args.items < 10 or args.impressions < 100:
        parser.error("--items must be at least 10 and --impressions at least 100")
    return args


def client_for(args: argparse.Namespace) -> EmbArk:
    token = args.token_file.read_text().strip() if args.token_file else None
    tls = TLS(ca=str(args.ca)) if args.ca else None
    return EmbArk(args.target, token=token, tls=tls, timeout=30.0)


def check_learnable(found: dict[str, Embeddings], loopback_images: bool) -> None:
    """Exits with the reason when a model has fewer than two distinct real
    vectors: there is nothing to learn from, and the cause is nearly always
    the server's setup, not the example."""
    for model, embeddings in found.items():
        distinct = len(np.unique(embeddings.matrix[embeddings.mask], axis=0))
        if distinct < 2:
            codes, counts = np.unique(embeddings.sources, return_counts=True)
            sources = ", ".join(f"{Source(c).name} {n}" for c, n in zip(codes, counts))
            if (embeddings.sources == Source.OOV_PENDING).any():
                hint = "; raise --wait-secs"
            elif model == IMAGE_MODEL and loopback_images:
                hint = "; Retina fetches loopback URLs only if EmbArk runs with --fetch-allow-nets 127.0.0.0/8"
            else:
                hint = ""
            raise SystemExit(f"{model}: {distinct} distinct vectors, too few to learn from ({sources}){hint}")


def run(args: argparse.Namespace, image_urls: list[str], broken_url: Optional[Callable[[str], str]]) -> dict[str, Any]:
    """The whole example; `broken_url` (the image server's 404 URLs) is
    None when the image URLs are the user's."""
    catalogue = make_catalogue(args.items, image_urls, broken_url, args.seed)
    with client_for(args) as client:
        keys = {TEXT_MODEL: catalogue.titles, IMAGE_MODEL: catalogue.image_urls}
        found, waited = fetch_embeddings(client, keys, args.wait_secs)
        check_learnable(found, loopback_images=broken_url is not None)
        auc_report, ranker, new = experiment(catalogue, found, args.impressions, args.seed)
        online_report = online(client, ranker, catalogue, new, args.seed)
    return {
        "seed": args.seed,
        "catalogue": {
            "items": len(catalogue),
            "distinct_images": len(set(catalogue.image_urls)),
            "new_items": int(new.sum()),
            "embedding_wait_secs": round(waited, 2),
            "oov": {
                m: {
                    name: int((e.sources == Source[name]).sum())
                    for name in ("OOV_PENDING", "OOV_FAILED", "OOV_UNAVAILABLE")
                }
                for m, e in found.items()
            },
        },
        "auc": auc_report,
        "online": online_report,
    }


def print_report(report: dict[str, Any]) -> None:
    c, a, o = report["catalogue"], report["auc"], report["online"]
    oov = ", ".join(f"{m} {sum(counts.values())}" for m, counts in c["oov"].items())
    print(
        f"catalogue: {c['items']} items, {c['distinct_images']} distinct images, {c['new_items']} cold-start; "
        f"embedded in {c['embedding_wait_secs']} s; still OOV: {oov}"
    )
    t = a["train"]
    print(f"train: {t['impressions']} impressions, CTR {t['ctr']:.3f}, {t['served_oov']} of them served while OOV")
    print(f"{'AUC':<28}{'without emb.':>14}{'with emb.':>12}")
    for name, label in (
        ("test", "held-out impressions"),
        ("new_items", "cold-start items"),
        ("new_items_oov", "cold-start items, OOV"),
    ):
        print(f"{label:<28}{a[name]['without_embeddings']:>14.4f}{a[name]['with_embeddings']:>12.4f}")
    m = a["mask_ablation"]
    print(
        f"OOV rows: held-out + cold-start items still OOV (observed CTR of those {m['observed_ctr_of_oov_rows']:.3f})"
    )
    for name, label in (("with_embeddings", "mask bits"), ("zero_vector_no_mask", "zero vectors, no mask")):
        r = m[name]
        predicted = r["predicted_ctr_of_oov_rows"]
        print(f"  {label:<24}AUC {r['auc']:.4f}  log-loss {r['log_loss']:.4f}  predicted {predicted:.3f}")
    latency = ", ".join(f"{m} p50 {v['p50']} ms p95 {v['p95']} ms" for m, v in o["lookup_ms"].items())
    print(
        f"online: {o['candidates']} candidates x {o['rounds']} requests; Lookup {latency}; "
        f"whole request p50 {o['request_ms']['p50']} ms"
    )
    print(f"a slate ranked for a '{o['segment']}' user:")
    for row in o["ranking"]:
        flags = (
            ""
            if row["text_source"] in ("CACHE", "STORE") and row["image_source"] in ("CACHE", "STORE")
            else f"  [text {row['text_source']}, image {row['image_source']}]"
        )
        print(f"  {row['score']:.3f}  {row['title']}{'  (cold start)' if row['cold_start'] else ''}{flags}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.image_urls:
            urls = [line.strip() for line in args.image_urls.read_text().splitlines() if line.strip()]
            report = run(args, urls, None)
        else:
            with ImageServer(args.serve_images) as server:
                report = run(args, server.urls(), server.missing_url)
    except EmbArkError as e:
        # The server's message names the flag or limit to change.
        print(f"ranker: {e}", file=sys.stderr)
        return 1
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
