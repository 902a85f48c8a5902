#!/usr/bin/env python3
"""Cosine scores of minilm-l6-v2 on labelled text pairs, as quoted in
docs/similarity.md. Against a running `embark up` (it fills the texts):

    examples/python/setup.sh
    ~/.cache/embark/venv-client/bin/python scripts/minilm_scores.py [host:port]
"""
import os, sys, time

import numpy as np
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples", "python"))
from lookup import lookup
TARGET = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
groups = {
 "paraphrase": [("a red bicycle for sale", "red bike for sale"), ("how do I reset my password", "I forgot my password, how can I change it"),
   ("the cat sleeps on the sofa", "a cat is sleeping on the couch"), ("cheap flights to Paris", "low-cost plane tickets to Paris"),
   ("waterproof hiking boots for men", "men's waterproof walking boots"), ("the stock market fell sharply today", "shares dropped steeply on the stock exchange today")],
 "same product, other colour/size": [("red bicycle for sale", "blue bicycle for sale"), ("men's running shoes size 42", "men's running shoes size 44"),
   ("white cotton t-shirt large", "black cotton t-shirt large"), ("iphone 14 case black", "iphone 14 case pink")],
 "same topic": [("a red bicycle for sale", "mountain bike helmet"), ("cheap flights to Paris", "hotels near the Eiffel tower"),
   ("the cat sleeps on the sofa", "dog food for puppies"), ("how do I reset my password", "two-factor authentication setup")],
 "unrelated": [("a red bicycle for sale", "how do I reset my password"), ("cheap flights to Paris", "waterproof hiking boots for men"),
   ("the cat sleeps on the sofa", "the stock market fell sharply today"), ("iphone 14 case black", "chocolate cake recipe"),
   ("men's running shoes size 42", "quarterly tax filing deadline"), ("white cotton t-shirt large", "cheap flights to Paris")],
}
texts = sorted({t for g in groups.values() for p in g for t in p})
for _ in range(60):
    m, real, _ = lookup(TARGET, "minilm-l6-v2", texts)
    if real.all(): break
    time.sleep(0.5)
vec = dict(zip(texts, m / np.linalg.norm(m, axis=1, keepdims=True)))
for name, pairs in groups.items():
    s = [float(vec[a] @ vec[b]) for a, b in pairs]
    print(f"{name:32} min {min(s):.3f} max {max(s):.3f} mean {np.mean(s):.3f}  {[round(x,2) for x in s]}")
