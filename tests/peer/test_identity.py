"""Peer identities: key files, derived ids, signed envelopes and entries, allow-lists."""

import base64
import hashlib
import logging
import os
import random
import stat

import pytest

from shoal.peer.config import NetworkConfig
from shoal.peer.envelope import SIGNED, signed_bytes
from shoal.peer.errors import AuthError, Forbidden
from shoal.peer.gossip import Gossip
from shoal.peer.identity import (
    Identity,
    IdentityError,
    derived_id,
    is_derived,
    load_allow_list,
    parse_public_key,
    verify,
)
from shoal.peer.keybook import KeyBook
from shoal.peer.membership import Membership, PeerInfo, entry_bytes
from shoal.peer.wire import WireCodec


def test_key_file_is_created_0600_and_loads_back_the_same_key(tmp_path):
    path = tmp_path / "id.key"
    first = Identity.load_or_create(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = Identity.load_or_create(str(path))
    assert again.public_key == first.public_key and again.derived_id == first.derived_id
    assert Identity.generate().public_key != first.public_key  # no --identity: a fresh key


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_a_key_file_others_may_read_is_refused(tmp_path, mode):
    path = tmp_path / "id.key"
    Identity.load_or_create(str(path))
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match="readable by group or others.*chmod 600"):
        Identity.load_or_create(str(path))


def test_a_garbled_or_unreachable_key_file_is_a_clear_error(tmp_path):
    path = tmp_path / "id.key"
    path.write_text("not a key\n")
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not an Ed25519 private key"):
        Identity.load_or_create(str(path))
    with pytest.raises(IdentityError, match="--identity"):
        Identity.load_or_create(str(tmp_path / "missing-dir" / "id.key"))


def test_derived_ids_and_the_config_default():
    me = Identity.generate()
    assert me.derived_id == derived_id(me.public_key)
    assert is_derived(me.derived_id) and len(me.derived_id) == 18
    assert not is_derived("a") and not is_derived("peer-0")
    network = NetworkConfig(key=me)
    assert network.peer_id == me.derived_id
    assert NetworkConfig(key=me, peer_id="a").peer_id == "a"  # a name stays a name
    with pytest.raises(IdentityError, match="derives"):  # derived form, another key's
        NetworkConfig(key=me, peer_id=Identity.generate().derived_id)


def test_sign_and_verify():
    me = Identity.generate()
    signature = me.sign(b"message")
    assert verify(me.public_key, signature, b"message")
    assert not verify(me.public_key, signature, b"messagE")
    assert not verify(Identity.generate().public_key, signature, b"message")
    assert not verify(me.public_key, signature[:-1], b"message")


def test_allow_list_parsing(tmp_path):
    a, b = Identity.generate(), Identity.generate()
    path = tmp_path / "allow.txt"
    path.write_text(
        f"# the run's volunteers\n{a.public_hex}  # alice\n\n"
        f"{base64.b64encode(b.public_key).decode()}\n"
    )
    assert load_allow_list(str(path)) == {a.public_key, b.public_key}
    assert parse_public_key(a.public_hex.upper()) == a.public_key
    path.write_text(f"{a.public_hex}\nnot-a-key\n")
    with pytest.raises(IdentityError, match="line 2"):
        load_allow_list(str(path))
    path.write_text("# nobody\n")
    with pytest.raises(IdentityError, match="no public keys"):
        load_allow_list(str(path))


def test_missing_allow_list_file_is_a_config_error(tmp_path):
    with pytest.raises(IdentityError, match="--allow-peers"):
        NetworkConfig(allow_peers=str(tmp_path / "nope.txt"))


def codec(peer_id: str, identity: Identity | None = None, **kw) -> WireCodec:
    return WireCodec(peer_id, "swarm", "key", max_body_bytes=1 << 20, identity=identity, **kw)


def test_a_message_under_another_key_than_the_ids_is_refused():
    server = codec("server")
    real, impostor = codec("a"), codec("a")  # same name, different keys
    body, headers = real.encode("POST", "/gossip", {"x": 1})
    assert server.decode("POST", "/gossip", headers, body).key == real.identity.public_hex
    body, headers = impostor.encode("POST", "/gossip", {"x": 2})
    with pytest.raises(AuthError, match="bound to another key"):
        server.decode("POST", "/gossip", headers, body)
    # a derived id must be its own key's, even the first time it is seen
    me = Identity.generate()
    thief = codec(me.derived_id)
    body, headers = thief.encode("POST", "/gossip", {})
    with pytest.raises(AuthError, match="not derived from its key"):
        server.decode("POST", "/gossip", headers, body)


def test_a_tampered_or_unsigned_message_is_refused():
    server, sender = codec("server"), codec("a")
    body, headers = sender.encode("POST", "/gossip", {"x": 1})
    other_body, _ = sender.encode("POST", "/gossip", {"x": 2})
    # a swarm-key holder can re-MAC a changed body, but not re-sign it as "a"
    headers["X-Shoal-MAC"] = codec("mallory").seal("POST", "/gossip", headers, other_body)[
        "X-Shoal-MAC"
    ]
    with pytest.raises(AuthError, match="bad signature"):
        server.decode("POST", "/gossip", headers, other_body)
    body, headers = sender.encode("POST", "/gossip", {"x": 3})
    del headers["X-Shoal-Sig"]
    with pytest.raises(AuthError, match="unsigned"):
        server.decode("POST", "/gossip", headers, body)


def test_a_key_not_on_the_allow_list_is_forbidden():
    a, b = Identity.generate(), Identity.generate()
    server = codec("server", allowed=frozenset({a.public_key}))
    body, headers = codec("a", a).encode("POST", "/join", {})
    server.decode("POST", "/join", headers, body)
    body, headers = codec("b", b).encode("POST", "/join", {})
    with pytest.raises(Forbidden, match="--allow-peers") as refused:
        server.decode("POST", "/join", headers, body)
    assert refused.value.status == 403


def signed_membership(peer_id: str, identity: Identity, book: KeyBook | None = None):
    me = PeerInfo(peer_id, f"http://{peer_id}:1", incarnation=1.0)
    check = book.check_entry if book is not None else None
    return Membership(me, signer=identity, check=check)


def test_signed_entries_merge_and_forged_ones_are_dropped(caplog):
    a_key = Identity.generate()
    a = signed_membership("a", a_key)
    b = signed_membership("b", Identity.generate(), KeyBook("b"))
    entry = a.wire(a.me)
    assert b.merge([entry]) == 1 and b.peers["a"].address == "http://a:1"
    # a relayer alters a's entry (its address, to steal its traffic): dropped
    a.me.revision += 1
    forged = {**a.wire(a.me), "address": "http://mallory:1"}
    with caplog.at_level(logging.WARNING, logger="shoal.peer.keybook"):
        assert b.merge([forged]) == 0
    assert b.peers["a"].address == "http://a:1"
    assert "dropped the entry of 'a'" in caplog.text and "bad signature" in caplog.text
    # re-signed by the relayer's own key: signature fine, key not a's
    mallory = Identity.generate()
    resigned = PeerInfo.from_wire({**forged, "pubkey": mallory.public_hex})
    resigned.sig = mallory.sign(entry_bytes(resigned)).hex()
    assert b.merge([resigned.to_wire()]) == 0 and b.peers["a"].address == "http://a:1"
    unsigned = {**forged, "sig": None}
    assert b.merge([unsigned]) == 0
    assert b.check.__self__.dropped_entries == 3
    # the genuine revision, with a newer heartbeat (not signed: it travels bare too), is taken
    a.me.heartbeat += 5
    assert b.merge([a.wire(a.me)]) == 1 and b.peers["a"].revision == 1


def test_our_entry_is_re_signed_when_its_content_changes():
    a = signed_membership("a", Identity.generate())
    b = signed_membership("b", Identity.generate(), KeyBook("b"))
    first = a.wire(a.me)
    a.me.weights_hash = "abc"
    a.me.bytes_sent = 123  # counters change without a revision: still signed
    a.revise()
    second = a.wire(a.me)
    assert first["sig"] != second["sig"]
    assert b.merge([second]) == 1 and b.peers["a"].weights_hash == "abc"


def test_a_forged_entry_in_gossip_is_dropped_and_the_rest_taken():
    keys = {name: Identity.generate() for name in "ac"}
    a, c = (signed_membership(n, keys[n]) for n in "ac")
    b = signed_membership("b", Identity.generate(), KeyBook("b"))
    forged_c = {**c.wire(c.me), "role": "stage", "stage": 0}
    message = {"peers": [a.wire(a.me), forged_c]}
    assert Gossip(b, random.Random(0)).answer(message) == {"peers": []}
    assert "a" in b.peers and "c" not in b.peers


def test_listening_openly_without_a_key_or_allow_list_warns(tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text(Identity.generate().public_hex + "\n")
    assert (
        "no --swarm-key and no --allow-peers" in NetworkConfig(listen="0.0.0.0:7000").open_warning()
    )
    assert NetworkConfig(listen="10.1.2.3:7000").open_warning() is not None
    assert NetworkConfig(listen="127.0.0.1:7000").open_warning() is None
    assert NetworkConfig(listen="localhost:7000").open_warning() is None
    assert NetworkConfig(listen="0.0.0.0:7000", swarm_key="k").open_warning() is None
    assert NetworkConfig(listen="0.0.0.0:7000", allow_peers=str(allow)).open_warning() is None


def test_the_public_key_is_under_the_mac():
    """Someone on the path without the swarm key cannot re-sign a message with a key of its
    own (which would bind a name it has not yet been seen with to that key)."""
    body, headers = codec("a").encode("POST", "/gossip", {"x": 1})
    other = Identity.generate()
    headers["X-Shoal-Key"] = other.public_hex
    fields = [headers[h] for h in SIGNED]
    data = signed_bytes("POST", "/gossip", fields, hashlib.sha256(body).digest())
    headers["X-Shoal-Sig"] = other.sign(data).hex()
    with pytest.raises(AuthError, match="HMAC"):
        codec("server").decode("POST", "/gossip", headers, body)


def test_signing_and_verifying_are_timed_for_the_reports():
    from shoal.peer.demo import identity_share
    from shoal.peer.identity import CryptoClock, verify

    key = Identity.generate()
    before = CryptoClock.as_dict()
    signature = key.sign(b"data")
    assert verify(bytes.fromhex(key.public_hex), signature, b"data")
    assert not verify(bytes.fromhex(key.public_hex), signature, b"other")
    after = CryptoClock.as_dict()
    assert after["signs"] == before["signs"] + 1 and after["verifies"] == before["verifies"] + 2
    assert after["sign_s"] > before["sign_s"] and after["verify_s"] > before["verify_s"]
    report = {"identity": {"sign_s": 0.1, "verify_s": 0.3}, "train_started_at": 100.0}
    assert identity_share({**report, "finished_at": 120.0}) == pytest.approx(0.02)
    assert identity_share({**report, "finished_at": 100.0}) is None
    assert identity_share({"finished_at": 120.0, "train_started_at": None}) is None
