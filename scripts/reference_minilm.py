#!/usr/bin/env python3
"""Independent reference for `minilm-l6-v2`: all-MiniLM-L6-v2 in numpy.

Shares no code with the Rust side: the WordPiece tokenizer is written here
from the vocabulary in tokenizer.json (lowercase, accent stripping, split
on whitespace and punctuation, greedy longest match with "##"), and the
BERT forward pass, mean pooling and L2 norm are plain numpy over the
safetensors file parsed by hand.

    scripts/reference-vectors.sh   # makes a venv with numpy and runs this

writes tests/fixtures/minilm_reference.json, which the tests compare with.
"""
import json
import math
import os
import struct
import sys
import unicodedata

import numpy as np

MAX_TOKENS = 256
SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog!",
    "EmbArk serves embeddings in about a millisecond, even for unknown keys.",
    "Café crème, s'il vous plaît.",
    "cheap running shoes size 42",
]


def load_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":  # e.g. the I64 position_ids buffer
            continue
        a, b = meta["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(meta["shape"]).astype(np.float64)
    return out


def is_punct(ch):
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def basic_tokens(text):
    text = unicodedata.normalize("NFD", text.lower())
    text = "".join(c for c in text if unicodedata.category(c) != "Mn")
    words, cur = [], ""
    for ch in text:
        if ch.isspace():
            if cur:
                words.append(cur)
            cur = ""
        elif is_punct(ch):
            if cur:
                words.append(cur)
            words.append(ch)
            cur = ""
        else:
            cur += ch
    if cur:
        words.append(cur)
    return words


def wordpiece(word, vocab):
    pieces, start = [], 0
    while start < len(word):
        end = len(word)
        while end > start:
            sub = word[start:end] if start == 0 else "##" + word[start:end]
            if sub in vocab:
                pieces.append(sub)
                break
            end -= 1
        if end == start:
            return ["[UNK]"]
        start = end
    return pieces


def tokenize(text, vocab):
    toks = [p for w in basic_tokens(text) for p in wordpiece(w, vocab)]
    toks = ["[CLS]"] + toks[: MAX_TOKENS - 2] + ["[SEP]"]
    return [vocab[t] for t in toks]


def layer_norm(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def embed(ids, w, cfg):
    p = lambda n: w[n] if n in w else w["bert." + n]  # noqa: E731
    n = len(ids)
    h = p("embeddings.word_embeddings.weight")[ids]
    h = h + p("embeddings.position_embeddings.weight")[:n] + p("embeddings.token_type_embeddings.weight")[0]
    eps = cfg["layer_norm_eps"]
    h = layer_norm(h, p("embeddings.LayerNorm.weight"), p("embeddings.LayerNorm.bias"), eps)
    heads = cfg["num_attention_heads"]
    d = cfg["hidden_size"] // heads
    for i in range(cfg["num_hidden_layers"]):
        L = f"encoder.layer.{i}."
        lin = lambda x, name: x @ p(L + name + ".weight").T + p(L + name + ".bias")  # noqa: E731
        q = lin(h, "attention.self.query").reshape(n, heads, d).transpose(1, 0, 2)
        k = lin(h, "attention.self.key").reshape(n, heads, d).transpose(1, 0, 2)
        v = lin(h, "attention.self.value").reshape(n, heads, d).transpose(1, 0, 2)
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.exp(s - s.max(-1, keepdims=True))
        a = (s / s.sum(-1, keepdims=True)) @ v
        a = a.transpose(1, 0, 2).reshape(n, heads * d)
        h = layer_norm(
            lin(a, "attention.output.dense") + h,
            p(L + "attention.output.LayerNorm.weight"),
            p(L + "attention.output.LayerNorm.bias"),
            eps,
        )
        f = lin(gelu(lin(h, "intermediate.dense")), "output.dense")
        h = layer_norm(f + h, p(L + "output.LayerNorm.weight"), p(L + "output.LayerNorm.bias"), eps)
    mean = h.mean(0)  # one sentence, no padding: every token counts
    return mean / max(np.linalg.norm(mean), 1e-12)


def main():
    models = os.environ.get("EMBARK_MODELS_DIR", os.path.expanduser("~/.cache/embark/models"))
    d = os.path.join(models, "minilm-l6-v2")
    cfg = json.load(open(os.path.join(d, "config.json")))
    vocab = json.load(open(os.path.join(d, "tokenizer.json")))["model"]["vocab"]
    w = load_safetensors(os.path.join(d, "model.safetensors"))
    out = {
        "model": "minilm-l6-v2",
        "made_by": "scripts/reference_minilm.py (numpy, float64)",
        "cases": [],
    }
    for s in SENTENCES:
        ids = tokenize(s, vocab)
        out["cases"].append({"text": s, "token_ids": ids, "vector": [round(float(x), 7) for x in embed(ids, w, cfg)]})
    dest = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "minilm_reference.json")
    with open(dest, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {len(out['cases'])} reference vectors to {dest}")


if __name__ == "__main__":
    main()
