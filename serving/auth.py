"""Bearer-token authentication of RankingService calls: the config section, token loading, the metadata check.

Callers send gRPC metadata `authorization: Bearer <token>`. The accepted tokens come from an environment
variable (`env:NAME`, e.g. a Kubernetes Secret) or a file (`file:/path`, e.g. a mounted Secret), several at once
for rotation (comma or newline separated). Tokens are compared as sha256 digests with `hmac.compare_digest`
against every accepted token, so the time taken depends neither on where a presented token differs nor on which
token matched. A token never appears in an error message or a log line. Health `Check` is exempt (probes carry
no token; see `seqrank.serving.errors.rpc_method(public=True)`).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from seqrank.serving.errors import Unauthenticated

AUTHORIZATION_METADATA_KEY = "authorization"  # gRPC metadata keys are lower case
BEARER_SCHEME = "Bearer"
ENV_SOURCE_PREFIX = "env:"
FILE_SOURCE_PREFIX = "file:"
MIN_TOKEN_LENGTH = 16  # characters; shorter tokens are refused at start (guessable)
TOKEN_SEPARATORS = re.compile(r"[,\r\n]+")
_BEARER_VALUE = re.compile(r"^\s*(\S+)\s+(\S+)\s*$")


@dataclass(frozen=True)
class AuthConfig:
    """Serve-config section `ingress.auth`. `tokens`: "" = no authentication (the embedded quickstart),
    `env:NAME` = the tokens are the value of environment variable NAME, `file:/path` = the file's content."""

    tokens: str = ""

    def __post_init__(self) -> None:
        if self.tokens and not self.tokens.startswith((ENV_SOURCE_PREFIX, FILE_SOURCE_PREFIX)):
            raise ValueError(f"auth.tokens: must be '', 'env:NAME' or 'file:/path', got {self.tokens[:5]!r}...")
        if self.tokens in (ENV_SOURCE_PREFIX, FILE_SOURCE_PREFIX):
            raise ValueError(f"auth.tokens: {self.tokens!r} names no variable or file")

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)


def parse_tokens(text: str) -> tuple[str, ...]:
    """Tokens separated by commas or newlines; surrounding blanks and empty entries dropped."""
    return tuple(token.strip() for token in TOKEN_SEPARATORS.split(text) if token.strip())


def load_tokens(config: AuthConfig, environ: Mapping[str, str],
                read_text: Callable[[str], str] = lambda path: Path(path).read_text()) -> tuple[str, ...]:
    """The accepted tokens named by `config.tokens`; ValueError (naming the source, never a token) when the
    source is missing, holds none, or holds one shorter than MIN_TOKEN_LENGTH."""
    source = config.tokens
    if source.startswith(ENV_SOURCE_PREFIX):
        name = source[len(ENV_SOURCE_PREFIX):]
        if name not in environ:
            raise ValueError(f"auth.tokens: environment variable {name} is not set")
        tokens = parse_tokens(environ[name])
    else:
        try:
            tokens = parse_tokens(read_text(source[len(FILE_SOURCE_PREFIX):]))
        except OSError as error:
            raise ValueError(f"auth.tokens: cannot read {source}: {error.strerror}") from None
    if not tokens:
        raise ValueError(f"auth.tokens: {source} holds no token")
    short = sum(len(token) < MIN_TOKEN_LENGTH for token in tokens)
    if short:
        raise ValueError(f"auth.tokens: {source} holds {short} token(s) shorter than {MIN_TOKEN_LENGTH} characters")
    return tokens


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


class BearerAuth:
    """`check(metadata)` passes when the metadata carries `authorization: Bearer <one of the tokens>`."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if not tokens:
            raise ValueError("BearerAuth: at least one token is required")
        self._digests = tuple(_digest(token) for token in tokens)

    def matches(self, token: str) -> bool:
        """Constant time in the token's content: every accepted digest is compared, no early exit."""
        presented = _digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        return found

    def check(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        """Raises Unauthenticated naming `authorization` and why, never echoing the value received."""
        values = [value for key, value in metadata if key.lower() == AUTHORIZATION_METADATA_KEY]
        if not values:
            raise Unauthenticated(AUTHORIZATION_METADATA_KEY,
                                  f"missing; send metadata '{AUTHORIZATION_METADATA_KEY}: {BEARER_SCHEME} <token>'")
        if len(values) > 1:
            raise Unauthenticated(AUTHORIZATION_METADATA_KEY, f"sent {len(values)} times; send it once")
        value = values[0]
        parts = _BEARER_VALUE.match(value) if isinstance(value, str) else None
        if parts is None or parts.group(1).lower() != BEARER_SCHEME.lower():
            raise Unauthenticated(AUTHORIZATION_METADATA_KEY, f"must be '{BEARER_SCHEME} <token>'")
        if not self.matches(parts.group(2)):
            raise Unauthenticated(AUTHORIZATION_METADATA_KEY, "invalid or revoked bearer token")


def authenticator(config: AuthConfig, environ: Mapping[str, str]) -> Callable[[Sequence[tuple]], None] | None:
    """The `RpcHooks.authenticate` hook for this config, or None when authentication is off."""
    if not config.enabled:
        return None
    return BearerAuth(load_tokens(config, environ)).check
