"""The Serve application: the only place deployments are bound together. Serve config `import_path:
serving.app:build_app`, its `args` parsed once into `AppArgs`.

    gRPC proxy -> RankingIngress -> Encoder            (user vector, batched)
                                 -> Retrieval          (hnswlib search, batched, then MMR in the same replica)
                                    [-> Reranker]      (rerank.placement: deployment: MMR as its own hop)

Keeping the re-ranker inside retrieval is the default: it saves one deployment hop (about 2-4 ms on a small
machine) for MMR work of well under a millisecond; its own deployment only pays off when MMR needs its own
resources. Replicas, autoscaling, queues and resources come from the Serve config's `deployments:` list;
each deployment's `user_config: {artifact_path}` loads the model and changes it in place.
"""

from __future__ import annotations

from typing import Any, Mapping

from ray.serve import Application

from serving.config import RERANK_OWN_DEPLOYMENT, AppArgs
from serving.encoder import Encoder
from serving.ingress import RankingIngress
from serving.rerank import Reranker
from serving.retrieval import Retrieval


def build_app(args: Mapping[str, Any] | AppArgs) -> Application:
    app_args = AppArgs.parse(args)
    encoder = Encoder.bind(app_args.encoder)
    retrieval = Retrieval.bind(app_args.retrieval)
    reranker = Reranker.bind(app_args.rerank) if app_args.rerank.placement == RERANK_OWN_DEPLOYMENT else None
    return RankingIngress.bind(app_args.ingress, encoder, retrieval, reranker)
