"""How the CLI prints metrics and responses; only the CLI's own modules import this."""

from __future__ import annotations

import json
from pathlib import Path


def print_metrics(report: dict, title: str) -> None:
    print(title)
    ks = sorted({int(key.split("@")[1]) for key in report if key.startswith("NDCG@")})
    names = [n for n in ("HR", "NDCG", "coverage", "ILD") if f"{n}@{ks[0]}" in report] if ks else []
    print("  K    " + "  ".join(f"{n:>9}" for n in names))
    for k in ks:
        print(f"  {k:<4} " + "  ".join(f"{report[f'{n}@{k}']:9.4f}" for n in names))
    if "MRR" in report:
        print(f"  MRR  {report['MRR']:.4f}")


def format_response(response) -> str:
    from seqrank.v1 import ranking_pb2

    if isinstance(response, ranking_pb2.RankResponse):
        source = ranking_pb2.HistorySource.Name(response.history_source).removeprefix("HISTORY_SOURCE_").lower()
        timings = ", ".join(f"{t.stage} {t.ms:.1f}" for t in response.timings)
        lines = [f"model {response.model_version}, history {source}, request {response.request_id}",
                 f"ms: {timings}", f"{'#':>3}  {'item':<20} {'score':>8} {'relevance':>10}  explanation"]
        lines += [f"{rank:>3}  {item.item_id:<20} {item.score:8.4f} {item.relevance:10.4f}  {item.explanation}"
                  for rank, item in enumerate(response.items, start=1)]
        if response.unknown_candidate_ids:
            lines.append(f"unknown candidates (not ranked): {', '.join(response.unknown_candidate_ids)}")
        return "\n".join(lines)
    if isinstance(response, ranking_pb2.UpsertItemsResponse):
        unknown = ", ".join(response.unknown_attribute_values) or "none"
        replay = " (idempotent replay: nothing written)" if response.idempotent_replay else ""
        return (f"created {response.created}, updated {response.updated}, catalogue version "
                f"{response.catalogue_version}; attribute values the model does not know: {unknown}{replay}")
    if isinstance(response, ranking_pb2.SetItemAvailabilityResponse):
        replay = " (idempotent replay: nothing written)" if response.idempotent_replay else ""
        return f"changed {response.changed}, catalogue version {response.catalogue_version}{replay}"
    if isinstance(response, ranking_pb2.CatalogueInfo):
        return (f"items {response.items} (upserted {response.upserted}), hidden {response.hidden}, "
                f"catalogue version {response.version}")
    if isinstance(response, ranking_pb2.RecordEventsResponse):
        replay = " (idempotent replay: nothing written)" if response.idempotent_replay else ""
        return (f"accepted {response.accepted}, stored {response.stored}, "
                f"duplicates ignored {response.duplicates_ignored}{replay}")
    rows = [("model_version", response.model_version), ("created_at", response.created_at),
            ("items", response.num_items), ("dim", response.dim),
            ("index", f"{response.index.space} M={response.index.m} ef_construction={response.index.ef_construction} "
                      f"ef_search={response.index.ef_search}"),
            ("behaviours", ", ".join(response.behavior_names) or "-"),
            ("max_history_length", response.max_history_length),
            ("data_fingerprint", response.data_fingerprint)]
    rows += [(f"metric {name}", f"{value:.4f}") for name, value in sorted(response.metrics.items())]
    return "\n".join(f"{name:<20} {value}" for name, value in rows)


def write_json_report(path: str | None, payload) -> None:
    """The bench commands' --json FILE: the printed table's numbers, machine-readable."""
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
