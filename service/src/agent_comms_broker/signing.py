"""Signed messages, as the broker checks them. An agent signs what it posts with its
Ed25519 key (agent-chat does, agent_comms_chat/keys.py); the signature travels with the
message, and the broker refuses a post whose signature does not check against the
sender's current published key. Readers check again on their side, against keys they
pinned, so they need not trust the broker.

What is signed: the UTF-8 bytes of the RFC 8785 (JSON Canonicalization Scheme) encoding of

    {"type": "agent-comms/message", "v": 1, "channel": ..., "sender": ..., "message": ...,
     "reply_to": ID or null, "priority": 1-5, "tags": [...], "meta": {...}, "ts": ...}

with the message's fields as the broker stores them (priority 3 when not given, tags
without repeats, meta {} when none) and `ts` the signer's clock in milliseconds. The
post carries {"v": 1, "alg": "ed25519", "key": base64 public key, "ts": ..., "sig":
base64 signature}. PyNaCl (libsodium) does the cryptography, rfc8785 the encoding."""

import base64
import binascii

import orjson

SIGNED_TYPE = "agent-comms/message"
BOX_KEY_TYPE = "agent-comms/box-key"
ALGORITHM = "ed25519"
ENVELOPE_FIELDS = frozenset({"v", "alg", "key", "ts", "sig"})
# A timestamp in milliseconds is a whole number JSON and RFC 8785 carry exactly.
TS_MAX = 2**53 - 1


class SignatureError(Exception):
    """A signature that is malformed, or does not check: str() says which."""


def public_key(text, what, size=32):
    """The raw bytes of a base64 key (`size` bytes), or ValueError."""
    if not isinstance(text, str) or len(text) > 4 * size:
        raise ValueError(f"{what} must be a base64 string of {size} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} must be a base64 string of {size} bytes") from None
    if len(raw) != size:
        raise ValueError(f"{what} must be a base64 string of {size} bytes, not {len(raw)}")
    return raw


def envelope_text(envelope):
    """A post's "signature" object, checked for form, as the JSON text the store keeps."""
    if not isinstance(envelope, dict) or set(envelope) != ENVELOPE_FIELDS:
        raise SignatureError('signature must be {"v": 1, "alg": "ed25519", "key": ..., "ts": ..., "sig": ...}')
    if type(envelope["v"]) is not int or envelope["v"] != 1 or envelope["alg"] != ALGORITHM:
        raise SignatureError('signature: only "v": 1 with "alg": "ed25519" is known')
    ts = envelope["ts"]
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= TS_MAX:
        raise SignatureError("signature: ts must be the signing time in whole milliseconds")
    try:
        public_key(envelope["key"], "signature: key")
        public_key(envelope["sig"], "signature: sig", 64)
    except ValueError as error:
        raise SignatureError(str(error)) from None
    # In one order of fields, so that a signature reads the same however it was sent.
    return orjson.dumps({name: envelope[name] for name in ("v", "alg", "key", "ts", "sig")}).decode()


def check_keys(agent, sign_key, box_key, box_sig):
    """Keys an agent (or the operator) publishes, checked: SignatureError says what is
    wrong."""
    try:
        public_key(sign_key, "sign")
        if box_key is not None:
            public_key(box_key, "box")
    except ValueError as error:
        raise SignatureError(str(error)) from None
    if box_key is None and box_sig is not None:
        raise SignatureError("box_sig without box")
    if box_key is not None:
        check_box_key(agent, sign_key, box_key, box_sig)


def check_box_key(agent, sign_key, box_key, box_sig):
    """An agent's encryption key must be signed by its signing key (over the RFC 8785 text
    of {"type": "agent-comms/box-key", "v": 1, "agent", "box"}), so a sender who trusts
    the signing key can trust the encryption key: SignatureError if it is not."""
    import rfc8785
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        signature = public_key(box_sig, "box_sig", 64)
    except ValueError as error:
        raise SignatureError(f"{error} (the box key signed by the sign key)") from None
    document = {"type": BOX_KEY_TYPE, "v": 1, "agent": agent, "box": box_key}
    try:
        VerifyKey(base64.b64decode(sign_key)).verify(rfc8785.dumps(document), signature)
    except BadSignatureError:
        raise SignatureError("box_sig does not check: the box key must be signed by the sign key") from None


def signed_bytes(post, ts):
    """What the author of a Post signed, at `ts`."""
    import rfc8785

    document = {
        "type": SIGNED_TYPE,
        "v": 1,
        "channel": post.channel,
        "sender": post.sender,
        "message": post.message,
        "reply_to": post.reply_to,
        "priority": post.priority,
        "tags": list(post.tags),
        "meta": orjson.loads(post.meta) if post.meta else {},
        "ts": ts,
    }
    try:
        return rfc8785.dumps(document)
    except rfc8785.CanonicalizationError as error:  # a number past what JSON carries exactly
        raise SignatureError(f"the message cannot be signed as it is: {error}") from None


def verify(post, current_key):
    """Check a Post's signature against the sender's current key (base64, None if it has
    published none): SignatureError if it does not check."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    envelope = orjson.loads(post.signature)
    if current_key is None:
        raise SignatureError(f"agent {post.sender!r} has published no signing key: publish one before signing")
    if envelope["key"] != current_key:
        raise SignatureError(f"the post is signed with a key that is not agent {post.sender!r}'s current key")
    try:
        VerifyKey(base64.b64decode(current_key)).verify(
            signed_bytes(post, envelope["ts"]), base64.b64decode(envelope["sig"])
        )
    except BadSignatureError:
        raise SignatureError(f"{post.sender!r}'s signature does not check: it was not made over this message") from None
