"""protoc output for protos/, installed as seqrank.v1. Never edit; regenerate: `python -m seqrank.serving.ops.protogen`."""
