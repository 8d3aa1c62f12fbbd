"""protoc output for protos/, committed. Never edit; regenerate: `python -m serving.protogen`."""
