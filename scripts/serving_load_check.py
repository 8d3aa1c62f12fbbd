"""Load an artifact the way the serving replicas do and answer a few queries; prints times, recall and peak memory.

Usage: .venv/bin/python scripts/serving_load_check.py artifacts/big [--queries 20]
Steps, each timed: load_artifact (every sha256 verified), the retrieval replica's LoadedIndex.from_artifact (hnswlib
index + Catalogue), the encoder replica's load_encoder; then histories of real items → encode_histories → the
index's top 10, compared with exact inner-product search over the whole catalogue (recall@10). Torch threads: 1.
"""

import argparse
import resource
import time

import numpy as np
import torch

from seqrank.serving.retrieval import LoadedIndex
from seqrank.training.artifact import load_artifact
from seqrank.training.export import exact_top_k
from seqrank.training.model import encode_histories, load_encoder


def timed(label: str, call):
    started = time.perf_counter()
    result = call()
    print(f"{label:<48} {time.perf_counter() - started:8.2f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("artifact")
    parser.add_argument("--queries", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    artifact = timed("load_artifact (checksums verified)", lambda: load_artifact(args.artifact))
    loaded = timed("retrieval: LoadedIndex.from_artifact", lambda: LoadedIndex.from_artifact(artifact, None))
    model = timed("encoder: load_encoder", lambda: load_encoder(artifact.encoder_config, artifact.encoder_weights_path))
    rng = np.random.default_rng(0)
    popular = loaded.catalogue.popular_items[:1000]
    histories = [rng.choice(popular, size=rng.integers(3, 20), replace=False) for _ in range(args.queries)]
    user_vectors = timed(f"encode_histories ({args.queries} histories)", lambda: encode_histories(model, histories))
    labels, _ = timed(f"hnswlib knn_query k=10 ({args.queries} queries)", lambda: loaded.index.knn_query(user_vectors, k=10))
    exact = timed("exact top 10 over the catalogue (reference)", lambda: exact_top_k(user_vectors, artifact.item_vectors, 10))
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, exact)])
    print(f"items {loaded.catalogue.num_items:,}  dim {artifact.dim}  index {artifact.index_params}")
    print(f"recall@10 of the index against exact search: {recall:.3f}")
    print(f"first list: {[str(loaded.catalogue.item_ids[i]) for i in labels[0][:5]]} ...")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
