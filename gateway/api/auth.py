"""Bearer tokens: who calls, for which organisation, in which role.

In the embedded mode the gateway signs its own tokens (Ed25519, key under the data dir;
``brygga token`` issues them). In production an OIDC/SITHS identity provider issues them and
only the verification key changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway import clock
from gateway.audit import AuditEntry
from gateway.keyfiles import ed25519_private_key
from gateway.model.identifiers import is_hsa_id

ISSUER = "brygga"
ROLES = frozenset({"staff", "ops", "auditor", "integration", "directory-admin"})


@dataclass(frozen=True, slots=True)
class Caller:
    org: str
    role: str
    name: str

    def audit_entry(
        self, action: str, purpose: str, patient_key: str, subject: str, detail: str = ""
    ) -> AuditEntry:
        """What this caller did, for the audit trail (the person is the token's name, or
        its subject when the token has none)."""
        return AuditEntry(
            actor=self.name or f"{self.role}@{self.org}",
            actor_org=self.org,
            role=self.role,
            action=action,
            purpose=purpose,
            patient_key=patient_key,
            subject=subject,
            detail=detail,
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

    def issue(self, org: str, role: str, name: str = "", hours: float = 8) -> str:
        if not is_hsa_id(org):
            raise ValueError("--org must be an HSA-id, e.g. SE5566778899-HT01")
        if role not in ROLES:
            raise ValueError(f"--role must be one of {', '.join(sorted(ROLES))}")
        now = clock.now()
        claims = {
            "iss": ISSUER,
            "sub": name or f"{role}@{org}",
            "org": org,
            "role": role,
            "name": name,
            "iat": int(now.timestamp()),
            "exp": int((now + timedelta(hours=hours)).timestamp()),
        }
        return jwt.encode(claims, self._private, algorithm="EdDSA")

    def verify(self, token: str) -> Caller:
        claims = jwt.decode(
            token,
            self._public,
            algorithms=["EdDSA"],
            issuer=ISSUER,
            # Expiry is checked against the gateway's own clock, the one that issued it.
            options={"require": ["exp", "org", "role"], "verify_exp": False, "verify_iat": False},
        )
        if int(claims["exp"]) <= clock.now().timestamp():
            raise jwt.ExpiredSignatureError("Signature has expired")
        return Caller(org=claims["org"], role=claims["role"], name=claims.get("name", ""))


_bearer = HTTPBearer(auto_error=False, description="A token from `brygga token`.")


def caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    if credentials is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Missing bearer token. Issue one with: brygga token --org HSA-ID --role staff",
            headers={"WWW-Authenticate": "Bearer"},
        )
    keys: TokenKeys = request.app.state.token_keys
    try:
        return keys.verify(credentials.credentials)
    except jwt.ExpiredSignatureError:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Token expired; issue a new one.",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None
    except jwt.PyJWTError:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Token not valid for this gateway (signature, issuer or claims).",
            headers={"WWW-Authenticate": "Bearer"},
        ) from None


def require_role(*roles: str):  # type: ignore[no-untyped-def]
    def check(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if who.role not in roles:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"This needs the role {' or '.join(roles)}; the token has '{who.role}'.",
            )
        return who

    return check
