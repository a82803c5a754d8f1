"""Peer identities: an Ed25519 key pair per peer, the ids derived from it, allow-lists.

The swarm key (an HMAC secret) proves that a message comes from someone admitted to the
run; in a volunteer run every volunteer holds it. The identity key proves *which* peer
sent it: every envelope carries its sender's public key and an Ed25519 signature over the
bytes its MAC covers (`peer.envelope`), and every peer-table entry carries its owner's
signature over its content (`peer.keybook`), so no key holder can speak for another peer.

    --identity PATH     the private key (raw 32 bytes, hex, one line), created on first
                        run with mode 0600; a file that group or others may read is
                        refused. Without it the key is made in memory for this run only.
    --peer-id           default: derived from the public key, `p-` + the first 16 chars
                        of base32(sha256(public key)), lower case. A name given instead is
                        bound to the first key seen with it (`peer.keybook`); names of the
                        derived form are reserved: they must match their key.
    --allow-peers FILE  one public key a line (hex or base64 of the raw 32 bytes), `#`
                        comments: only these keys may join or send anything (403).

Fingerprints (dashboard, logs) are the first 16 hex digits of sha256(public key).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import stat
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_BYTES = 32
SIG_BYTES = 64
DERIVED_PREFIX = "p-"
DERIVED_CHARS = 16
DERIVED_ID = re.compile(f"{DERIVED_PREFIX}[a-z2-7]{{{DERIVED_CHARS}}}")


class IdentityError(ValueError):
    """A key file or allow-list that cannot be used (the message names the file and why)."""


def derived_id(public_key: bytes) -> str:
    """The peer id of `public_key`: `p-` + 16 chars of base32(sha256(key)), lower case."""
    digest = base64.b32encode(hashlib.sha256(public_key).digest()).decode().lower()
    return DERIVED_PREFIX + digest[:DERIVED_CHARS]


def is_derived(peer_id: str) -> bool:
    """Whether `peer_id` has the derived form (and so must match its key)."""
    return DERIVED_ID.fullmatch(peer_id) is not None


def fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


class CryptoClock:
    """Seconds and counts of this process's Ed25519 work (a peer's `report` carries them:
    `scripts/bench_outer.py` measures the share of a round they take)."""

    sign_s = verify_s = 0.0
    signs = verifies = 0

    @classmethod
    def as_dict(cls) -> dict[str, float]:
        return {
            "sign_s": cls.sign_s,
            "verify_s": cls.verify_s,
            "signs": cls.signs,
            "verifies": cls.verifies,
        }


def verify(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is `public_key`'s Ed25519 signature of `data`."""
    if len(public_key) != KEY_BYTES or len(signature) != SIG_BYTES:
        return False
    begin = time.perf_counter()
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    finally:
        CryptoClock.verify_s += time.perf_counter() - begin
        CryptoClock.verifies += 1
    return True


class Identity:
    """One peer's key pair."""

    def __init__(self, private_key: Ed25519PrivateKey, path: str | None = None) -> None:
        self._private = private_key
        self.path = path  # None: made in memory for this run
        self.public_key = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_hex = self.public_key.hex()
        self.derived_id = derived_id(self.public_key)
        self.fingerprint = fingerprint(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str) -> Identity:
        """The key in `path`, made there (mode 0600) if the file does not exist."""
        try:
            return cls._load_or_create(Path(path))
        except OSError as exc:
            raise IdentityError(f"--identity {path}: {exc.strerror or exc}") from None

    @classmethod
    def _load_or_create(cls, file: Path) -> Identity:
        path = str(file)
        if not file.exists():
            key = Ed25519PrivateKey.generate()
            raw = key.private_bytes_raw()
            # O_EXCL: two peers started at once with the same path do not both write it
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(raw.hex() + "\n")
            return cls(key, str(file))
        mode = file.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"--identity {path}: the key file is readable by group or others "
                f"(mode {stat.S_IMODE(mode):04o}); run `chmod 600 {path}`"
            )
        text = file.read_text(errors="replace").strip()
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = b""
        if len(raw) != KEY_BYTES:
            raise IdentityError(
                f"--identity {path}: not an Ed25519 private key (want {2 * KEY_BYTES} hex digits)"
            )
        return cls(Ed25519PrivateKey.from_private_bytes(raw), str(file))

    def sign(self, data: bytes) -> bytes:
        begin = time.perf_counter()
        signature = self._private.sign(data)
        CryptoClock.sign_s += time.perf_counter() - begin
        CryptoClock.signs += 1
        return signature

    def check_peer_id(self, peer_id: str) -> None:
        """A --peer-id of the derived form must be this key's (IdentityError otherwise)."""
        if is_derived(peer_id) and peer_id != self.derived_id:
            raise IdentityError(
                f"--peer-id {peer_id} has the form of an id derived from a key, but this "
                f"peer's key derives {self.derived_id}; leave --peer-id out or pick a name"
            )


def parse_public_key(text: str) -> bytes:
    """A raw 32-byte public key from hex (64 digits) or base64 (ValueError otherwise)."""
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ValueError(f"not a public key (hex or base64 of 32 bytes): {text[:48]!r}")
    return raw


def load_allow_list(path: str) -> frozenset[bytes]:
    """The keys of an --allow-peers file: one a line, `#` starts a comment."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as exc:
        raise IdentityError(f"--allow-peers {path}: {exc.strerror or exc}") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            keys.add(parse_public_key(text))
        except ValueError as exc:
            raise IdentityError(f"--allow-peers {path} line {number}: {exc}") from None
    if not keys:
        raise IdentityError(f"--allow-peers {path}: no public keys in the file")
    return frozenset(keys)
