"""An ingress replica that has not polled a catalogue change yet still accepts writes naming the changed items.

Two replicas share one store; an item upserted through the other one (here: written to the store directly) is
known to the store before this replica's next poll. RecordEvents and SetItemAvailability naming it must read the
store and accept, not answer "unknown item id". The ingress runs outside Ray with stand-in deployments.
"""

from __future__ import annotations

import asyncio

import grpc

from seqrank.serving.config import EncoderArgs, IngressArgs, RetrievalArgs
from seqrank.serving.history import HistoryConfig, ItemChange, SQLiteHistoryStore
from seqrank.serving.ingress import RankingIngress
from seqrank.v1 import ranking_pb2 as pb
from tests.serving.artifacts import write_small_artifact
from tests.support import FakeContext


def test_writes_naming_an_item_upserted_elsewhere_are_accepted_before_the_next_poll(tmp_path):
    history = HistoryConfig(url=f"sqlite:///{tmp_path / 'history.db'}", catalogue_sync_ms=3_600_000)  # no poll
    ingress = RankingIngress.func_or_class(IngressArgs(history=history), EncoderArgs(placement="deployment"),
                                           RetrievalArgs(placement="deployment"), object(), object(), None)
    ingress.reconfigure({"artifact_path": str(write_small_artifact(tmp_path / "v1"))})
    other_replica = SQLiteHistoryStore(tmp_path / "history.db", 200)
    other_replica.write_items([ItemChange("sku-new", attributes=("promo",))])

    async def calls():
        record, hide = FakeContext(), FakeContext()
        await ingress.RecordEvents(pb.RecordEventsRequest(users=[pb.UserEvents(
            user_id="u1", events=[pb.Event(item_id="sku-new")])]), grpc_context=record)
        answer = await ingress.SetItemAvailability(pb.SetItemAvailabilityRequest(item_ids=["sku-new"],
                                                                                 available=False), grpc_context=hide)
        unknown = FakeContext()
        await ingress.SetItemAvailability(pb.SetItemAvailabilityRequest(item_ids=["never-upserted"],
                                                                        available=False), grpc_context=unknown)
        return record, hide, answer, unknown

    record, hide, answer, unknown = asyncio.run(calls())
    assert record.code is None and hide.code is None and answer.changed == 1
    assert unknown.code == grpc.StatusCode.INVALID_ARGUMENT  # still refused when the store does not know it either
    assert unknown.details.startswith("item_ids[0]: unknown item id 'never-upserted'")
    other_replica.close()
