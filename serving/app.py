"""The Serve application: the only place deployments are bound together. Serve config `import_path:
serving.app:build_app`, its `args` parsed once into `AppArgs`.

    gRPC proxy -> RankingIngress [-> Encoder]    (user vectors; batched; own pool: autoscaling, GPU)
                                 [-> Retrieval]  (hnswlib search, batched, then MMR in the same replica)
                                      [-> RetrievalShard0..S-1]  (retrieval.num_shards > 1: the index split)
                                 [-> Reranker]   (MMR as its own stage)

Encoding, retrieval and re-ranking are classes of their own (serving/encoder.py, serving/retrieval.py,
serving/rerank.py); whether each runs as a deployment behind a hop or as a function call inside its caller is
`encoder.placement`, `retrieval.placement` and `rerank.placement`. A hop costs more latency and CPU than a tiny
model's forward pass, a batch of knn queries or of MMR, so on a small CPU machine the stages are fastest inside
the ingress (docs/benchmarks/serving.md); their own deployments are what scales them apart from the ingress: the
Encoder pool autoscales and takes GPUs (the Kubernetes configs), the index can be sharded (`retrieval.num_shards`
needs the Retrieval deployment). MMR runs inside retrieval by default. Replicas, autoscaling, queues and resources
come from the Serve config's `deployments:`; each model deployment's `user_config: {artifact_path}` loads the
model and changes it in place.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray.serve import Application

from seqrank.serving.config import OWN_DEPLOYMENT, AppArgs
from seqrank.serving.encoder import Encoder
from seqrank.serving.ingress import RankingIngress
from seqrank.serving.rerank import Reranker
from seqrank.serving.retrieval import Retrieval
from seqrank.serving.shards import RetrievalShard, shard_deployment_name


def build_app(args: Mapping[str, Any] | AppArgs) -> Application:
    app_args = AppArgs.parse(args)
    encoder = Encoder.bind(app_args.encoder) if app_args.encoder.placement == OWN_DEPLOYMENT else None
    shards = []
    if app_args.retrieval.num_shards > 1:  # one deployment per shard, each with its own replicas
        shards = [RetrievalShard.options(name=shard_deployment_name(shard)).bind(app_args.retrieval, shard)
                  for shard in range(app_args.retrieval.num_shards)]
    retrieval = None
    if app_args.retrieval.placement == OWN_DEPLOYMENT:
        retrieval = Retrieval.bind(app_args.retrieval, app_args.ingress.history, *shards)
    reranker = Reranker.bind(app_args.rerank) if app_args.rerank.placement == OWN_DEPLOYMENT else None
    return RankingIngress.bind(app_args.ingress, app_args.encoder, app_args.retrieval, encoder, retrieval, reranker)
