"""Payload encryption: what Temporal stores of runbook inputs, results and details is ciphertext.

AES-256-GCM, one key per key id, keys by reference (``temporal.codec`` in the config). The
active key encrypts; every listed key decrypts, so a key is rotated by adding a new one, making
it active, and removing the old one only once no history a worker or the UI still reads was
written with it (retention of the namespace).

Search attributes and memo are not passed through codecs (Temporal indexes them): nothing
secret goes there, only names, regions and outcomes.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
_NONCE = 12


class CodecKeyError(ValueError):
    """A payload this codec cannot decrypt (unknown key id, tampered or wrong key)."""


def key_bytes(secret: str) -> bytes:
    """A 32-byte AES key from the referenced secret: 32 bytes of base64 (``openssl rand -base64 32``)
    are used as they are; anything else (a passphrase) goes through SHA-256, so a key file written
    by any tool works and is always AES-256."""
    try:
        raw = base64.b64decode(secret.strip(), validate=True)
        if len(raw) == 32:
            return raw
    except ValueError:
        pass
    return hashlib.sha256(secret.strip().encode()).digest()


class EncryptionCodec(PayloadCodec):
    """Encrypts every payload with the active key; decrypts only payloads it encrypted.

    Payloads without ``binary/encrypted`` pass through decode untouched: histories recorded
    before encryption was on (tests/histories, old runs) and anything the HTTP API wrote still
    read. The whole original payload, metadata included, is encrypted, so not even its
    encoding or type shows; the key id travels in clear in the metadata (it is not secret) and
    is bound to the ciphertext as associated data."""

    def __init__(self, keys: Mapping[str, bytes], active: str):
        if active not in keys:
            raise ValueError(f"active key id {active!r} is not among the keys ({', '.join(keys)})")
        self._ciphers = {kid: AESGCM(k) for kid, k in keys.items()}
        self.active = active

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self._decrypt(p) if p.metadata.get("encoding") == ENCODING else p for p in payloads]

    def _encrypt(self, p: Payload) -> Payload:
        nonce = os.urandom(_NONCE)
        kid = self.active.encode()
        # The key id is associated data: moving a payload under another id fails authentication.
        data = nonce + self._ciphers[self.active].encrypt(nonce, p.SerializeToString(), kid)
        return Payload(metadata={"encoding": ENCODING, KEY_ID: kid}, data=data)

    def _decrypt(self, p: Payload) -> Payload:
        kid = p.metadata.get(KEY_ID, b"").decode()
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise CodecKeyError(f"payload encrypted with key id {kid!r}, which is not configured "
                                f"(known: {', '.join(self._ciphers)})")
        try:
            plain = cipher.decrypt(p.data[:_NONCE], p.data[_NONCE:], kid.encode())
        except Exception as e:  # cryptography's InvalidTag: wrong key material or tampered data
            raise CodecKeyError(f"payload under key id {kid!r} does not authenticate "
                                f"(wrong key for that id, or altered)") from e
        return Payload.FromString(plain)

    @property
    def key_ids(self) -> Iterable[str]:
        return self._ciphers.keys()


def codec_from_config(codec_cfg) -> EncryptionCodec | None:
    """The codec ``temporal.codec`` asks for, its keys resolved now (None: encryption off)."""
    from eagle_dr.config import SecretUnavailable

    if codec_cfg is None:
        return None
    keys = {}
    for kid, ref in codec_cfg.keys.items():
        try:
            keys[kid] = key_bytes(ref.resolve())
        except SecretUnavailable as e:
            # Which key of which setting: "secret file ...: No such file" alone does not say.
            raise SecretUnavailable(f"temporal.codec.keys.{kid}: {e}") from None
    return EncryptionCodec(keys, codec_cfg.active)


def payloads_in(msg, out: list[Payload]) -> None:
    """Every Payload inside a protobuf message (events, failures, headers), depth first."""
    if isinstance(msg, Payload):
        out.append(msg)
        return
    for field, value in msg.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].type == field.TYPE_MESSAGE:
                for v in value.values():
                    payloads_in(v, out)
        elif isinstance(value, Message):
            payloads_in(value, out)
        else:  # a repeated field
            for v in value:
                payloads_in(v, out)


async def decode_in_place(codec: PayloadCodec | None, messages: Iterable) -> None:
    """Decrypt, in place, every payload of these history events (or any protobuf messages):
    ``fetch_history`` returns what the server stores, which the data converter's codec never
    sees. Without a codec, or for plain payloads, nothing changes."""
    if codec is None:
        return
    found: list[Payload] = []
    for m in messages:
        payloads_in(m, found)
    encrypted = [p for p in found if p.metadata.get("encoding") == ENCODING]
    if encrypted:
        for p, plain in zip(encrypted, await codec.decode(encrypted)):
            p.CopyFrom(plain)
