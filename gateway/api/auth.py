"""Bearer tokens: who calls (the person), for which organisation, in which role.

In the embedded mode the gateway signs its own tokens (Ed25519, key under the data dir;
``brygga token`` issues them). In production an OIDC/SITHS identity provider issues them and
only the verification key changes. Verification is strict: the algorithm is pinned to EdDSA,
every claim must be there with its exact type, and each refusal says which rule failed
without repeating what the token holds. What roles may do is :mod:`gateway.api.policy`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway import clock
from gateway.audit import AuditEntry
from gateway.keyfiles import ed25519_private_key

ISSUER = "brygga"
ALGORITHM = "EdDSA"
ROLES = frozenset({"staff", "ops", "auditor", "integration", "directory-admin", "consent-admin"})
LEEWAY_SECONDS = 60  # clock skew tolerated between the issuer and the gateway
_HSA = re.compile(r"SE[0-9]{10}-[0-9A-Za-z]{1,31}")  # fullmatch: no wildcard, no newline
_TEXT = re.compile(r"[^\x00-\x1f\x7f]+")  # one line of printable text


class TokenRefused(Exception):
    """A token the gateway does not accept; the text says which rule, never the contents."""


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified token: the person (``subject``, ``name``, ``title``) and their unit."""

    org: str
    role: str
    name: str
    title: str = ""
    subject: str = ""

    def audit_entry(
        self, action: str, purpose: str, patient_key: str, subject: str, detail: str = ""
    ) -> AuditEntry:
        """What this caller did, for the audit trail: always the token's person and unit."""
        return AuditEntry(
            actor=self.name,
            actor_org=self.org,
            role=self.role,
            action=action,
            purpose=purpose,
            patient_key=patient_key,
            subject=subject,
            detail=detail,
        )


def _text(claims: dict[str, Any], name: str, max_len: int, *, required: bool = True) -> str:
    value = claims.get(name)
    if value is None or (value == "" and not required):
        if required:
            raise TokenRefused(f"Token lacks the claim '{name}'.")
        return ""
    if not isinstance(value, str) or len(value) > max_len or not _TEXT.fullmatch(value):
        raise TokenRefused(
            f"Token claim '{name}' must be one line of text, 1 to {max_len} characters."
        )
    return value


def _seconds(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name)
    if value is None:
        raise TokenRefused(f"Token lacks the claim '{name}'.")
    if type(value) is not int:  # not a string, float or bool
        raise TokenRefused(f"Token claim '{name}' must be an integer (seconds since 1970).")
    return value


def check_claims(claims: dict[str, Any], now: int) -> Caller:
    """The claims as the gateway requires them, checked against ``now`` (epoch seconds)."""
    if claims.get("iss") != ISSUER:
        raise TokenRefused(f"Token issuer must be '{ISSUER}'.")
    exp, iat, nbf = (_seconds(claims, c) for c in ("exp", "iat", "nbf"))
    if exp <= now - LEEWAY_SECONDS:
        raise TokenRefused("Token expired; issue a new one.")
    if iat > now + LEEWAY_SECONDS or nbf > now + LEEWAY_SECONDS:
        raise TokenRefused("Token is not valid yet (iat or nbf in the future).")
    if exp <= iat:
        raise TokenRefused("Token expires before it was issued.")
    org = claims.get("org")
    if not isinstance(org, str) or not _HSA.fullmatch(org):
        raise TokenRefused("Token claim 'org' must be one HSA-id (SE + 10 digits + -local part).")
    role = claims.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise TokenRefused(f"Token claim 'role' must be one of {', '.join(sorted(ROLES))}.")
    return Caller(
        org=org,
        role=role,
        name=_text(claims, "name", 200),
        title=_text(claims, "title", 100, required=False),
        subject=_text(claims, "sub", 200),
    )


class TokenKeys:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self._public = private_key.public_key()

    @classmethod
    def from_dir(cls, keys_dir: Path, *, create: bool = True) -> TokenKeys:
        """Load the signing key; the gateway creates it on first start, tools must not."""
        path = keys_dir / "token-ed25519.pem"
        if not path.exists() and not create:
            raise FileNotFoundError(
                f"no token signing key at {path}: run this where the gateway runs, or set "
                "BRYGGA_DATA_DIR to the gateway's data directory"
            )
        return cls(ed25519_private_key(path, create=True))

    def issue(
        self,
        org: str,
        role: str,
        name: str,
        title: str = "",
        hours: float = 8,
        subject: str = "",
    ) -> str:
        """A token for one person (``name``, ``title``) at ``org``; ``subject`` is their
        stable id (HSA-id of the person, or a system's name), the name when not given."""
        now = int(clock.now().timestamp())
        claims = {
            "iss": ISSUER,
            "sub": subject or name,
            "org": org,
            "role": role,
            "name": name,
            "title": title,
            "iat": now,
            "nbf": now,
            "exp": now + int(timedelta(hours=hours).total_seconds()),
        }
        try:
            check_claims(claims, now)
        except TokenRefused as exc:
            raise ValueError(str(exc).replace("Token claim", "The")) from None
        return jwt.encode(claims, self._private, algorithm=ALGORITHM)

    def verify(self, token: str) -> Caller:
        """The caller, or :class:`TokenRefused` saying which rule the token breaks."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused(
                "Token is not a well-formed JWT (header.payload.signature)."
            ) from None
        if header.get("alg") != ALGORITHM:
            raise TokenRefused(f"Token algorithm not accepted: only {ALGORITHM} tokens are.")
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                # The claims are checked below, strictly, against the gateway's own clock.
                options={
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_iss": False,
                    "verify_aud": False,
                    "verify_sub": False,
                    "verify_jti": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise TokenRefused("Token signature does not verify with this gateway's key.") from None
        except jwt.PyJWTError:
            raise TokenRefused(
                "Token is not a well-formed JWT (header.payload.signature)."
            ) from None
        return check_claims(claims, int(clock.now().timestamp()))


_bearer = HTTPBearer(auto_error=False, description="A token from `brygga token`.")


def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Missing bearer token. Issue one with: brygga token --org HSA-ID --role staff "
            "--name NAME",
            headers={"WWW-Authenticate": "Bearer"},
        )
    keys: TokenKeys = request.app.state.token_keys
    try:
        return keys.verify(credentials.credentials)
    except TokenRefused as exc:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None
