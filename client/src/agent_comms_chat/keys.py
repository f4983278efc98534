"""Agent keys, signing, and sealed direct messages.

Each agent may hold two key pairs: Ed25519 to sign what it posts, X25519 to receive
direct messages only it can read. `agent-chat keys init` makes them (in the key
directory, 0600, optionally under a passphrase) and `keys publish` gives the broker the
public halves. The cryptography is libsodium's, through PyNaCl; the signed bytes are the
RFC 8785 (JSON Canonicalization Scheme) encoding of the message, by rfc8785. The broker
checks signatures with the same definition (agent_comms_broker/signing.py); the README
spells it out for other implementations.

Readers check signatures on their side, against keys they pinned the first time they
saw the sender (known.json in the key directory): a broker that changes what a message
says, or swaps an agent's key, is caught here, not believed. A message gets one mark:

    verified      signed with a key pinned for its sender, and the signature checks
    unsigned      it carries no signature
    bad           the signature does not check, or the key is none the sender ever had
    key-changed   it checks, with a key the broker lists for the sender but this reader
                  has not pinned (`agent-chat keys trust AGENT` accepts it)
"""

import base64
import json
import os
import time
from urllib.parse import quote

VERIFIED, UNSIGNED, BAD, KEY_CHANGED = "verified", "unsigned", "bad", "key-changed"
SIGNED_TYPE = "agent-comms/message"
BOX_KEY_TYPE = "agent-comms/box-key"
SEALED = "x25519-sealedbox"
DEFAULT_PRIORITY = 3
# Passphrase-protected keys: Argon2id at libsodium's "moderate" cost (about 0.5 s, 256 MiB).
PASSPHRASE_VARIABLE = "AGENT_COMMS_KEY_PASSPHRASE"


class KeysError(Exception):
    """A key that cannot be made, read or used; str() is the one line to print."""


def key_dir(environ=os.environ):
    """Where keys live: $AGENT_COMMS_KEY_DIR, else agent-comms/keys in the user's config
    directory ($XDG_CONFIG_HOME, else ~/.config)."""
    if environ.get("AGENT_COMMS_KEY_DIR"):
        return environ["AGENT_COMMS_KEY_DIR"]
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "agent-comms", "keys")


def key_path(directory, agent):
    return os.path.join(directory, quote(agent, safe="") + ".json")


def b64(raw):
    return base64.b64encode(bytes(raw)).decode()


def unb64(text, size, what):
    try:
        raw = base64.b64decode(text, validate=True)
    except (TypeError, ValueError):
        raw = b""
    if len(raw) != size:
        raise KeysError(f"{what} is not a base64 key of {size} bytes")
    return raw


class AgentKeys:
    """This agent's two private keys."""

    def __init__(self, agent, sign_seed, box_secret):
        from nacl.public import PrivateKey
        from nacl.signing import SigningKey

        self.agent = agent
        self.signing = SigningKey(sign_seed)
        self.box = PrivateKey(box_secret)

    @classmethod
    def generate(cls, agent):
        return cls(agent, os.urandom(32), os.urandom(32))

    @property
    def sign_public(self):
        return b64(self.signing.verify_key)

    @property
    def box_public(self):
        return b64(self.box.public_key)

    @property
    def box_sig(self):
        """The encryption key signed by the signing key: a sender who trusts the signing
        key can trust it (the broker cannot swap it for a key of its own)."""
        return b64(self.signing.sign(box_key_bytes(self.agent, self.box_public)).signature)

    def public(self):
        return {"sign": self.sign_public, "box": self.box_public, "box_sig": self.box_sig}

    def save(self, path, passphrase=None):
        """Write the keys, readable by the user only; with a passphrase, sealed by a key
        Argon2id derives from it."""
        secrets = {"sign": b64(self.signing), "box": b64(self.box)}
        document = {"agent": self.agent, "v": 1, "public": self.public()}
        if passphrase:
            from nacl import pwhash, secret, utils

            salt = utils.random(pwhash.argon2id.SALTBYTES)
            ops, mem = pwhash.argon2id.OPSLIMIT_MODERATE, pwhash.argon2id.MEMLIMIT_MODERATE
            key = pwhash.argon2id.kdf(secret.SecretBox.KEY_SIZE, passphrase.encode(), salt, opslimit=ops, memlimit=mem)
            sealed = secret.SecretBox(key).encrypt(json.dumps(secrets).encode())
            document["sealed"] = {"kdf": "argon2id", "salt": b64(salt), "ops": ops, "mem": mem, "box": b64(sealed)}
        else:
            document["secret"] = secrets
        _write_private(path, document)

    @staticmethod
    def public_of(path):
        """The public keys in a key file, without its passphrase: {"sign", "box", "box_sig"}."""
        try:
            with open(path) as file:
                public = json.load(file)["public"]
            unb64(public["sign"], 32, "sign")
        except (OSError, ValueError, KeyError, TypeError, KeysError) as error:
            raise KeysError(f"cannot read the keys at {path}: {error}") from None
        return public

    @classmethod
    def load(cls, path, passphrase=None):
        """The keys in `path` (KeysError if there are none, or they cannot be read)."""
        try:
            with open(path) as file:
                document = json.load(file)
            agent = document["agent"]
        except FileNotFoundError:
            raise KeysError(f"no keys at {path}: make them with `agent-chat keys init`") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise KeysError(f"cannot read the keys at {path}: {error}") from None
        if "sealed" in document:
            secrets = _unseal(document["sealed"], path, passphrase)
        else:
            secrets = document.get("secret") or {}
        try:
            return cls(agent, unb64(secrets.get("sign"), 32, "sign"), unb64(secrets.get("box"), 32, "box"))
        except KeysError as error:
            raise KeysError(f"the keys at {path} are damaged: {error}") from None

    def sign(self, post, channel):
        """The signature of a post (the dict the client sends to `channel`)."""
        ts = int(time.time() * 1000)
        signed = self.signing.sign(signed_bytes(post, channel, post.get("sender", self.agent), ts)).signature
        return {"v": 1, "alg": "ed25519", "key": self.sign_public, "ts": ts, "sig": b64(signed)}

    def open(self, message):
        """A sealed message opened: its text and meta as the sender wrote them; None if it
        is not sealed to this agent's key. KeysError if it is but does not open."""
        sealed = sealed_to(message)
        if sealed is None or sealed.get("key") != self.box_public:
            return None
        from nacl.exceptions import CryptoError
        from nacl.public import SealedBox

        try:
            inner = json.loads(SealedBox(self.box).decrypt(base64.b64decode(str(message.get("message")))))
        except (CryptoError, ValueError, TypeError):
            raise KeysError(f"message {message.get('id')} is sealed to this agent but does not open") from None
        if not isinstance(inner, dict) or not isinstance(inner.get("message"), str):
            raise KeysError(f"message {message.get('id')} is sealed to this agent but holds no message")
        if inner.get("from") != message.get("sender") or inner.get("to") != self.agent:
            raise KeysError(
                f"message {message.get('id')} was sealed by {inner.get('from')!r} for {inner.get('to')!r} "
                f"but posted by {message.get('sender')!r}: not opened (someone passed on another's words)"
            )
        meta = inner.get("meta") if isinstance(inner.get("meta"), dict) else {}
        return {**message, "message": inner["message"], "meta": meta, "sealed": "opened"}


def _write_private(path, document):
    """Write a JSON file readable by the user only (its directory too), in one step."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.new"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        json.dump(document, file, indent=1, sort_keys=True)
        file.write("\n")
    os.replace(temporary, path)


def box_key_bytes(agent, box_key):
    """What an agent's signing key signs to vouch for its encryption key."""
    import rfc8785

    return rfc8785.dumps({"type": BOX_KEY_TYPE, "v": 1, "agent": agent, "box": box_key})


def box_key_checks(agent, sign_key, box_key, box_sig):
    """Whether `box_sig` is `sign_key`'s signature over the agent's `box_key`."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        VerifyKey(unb64(sign_key, 32, "sign")).verify(box_key_bytes(agent, box_key), unb64(box_sig, 64, "box_sig"))
    except (KeysError, BadSignatureError, TypeError, ValueError):
        return False
    return True


def ask_passphrase(prompt, needed_for, confirm=False):
    """The passphrase: $AGENT_COMMS_KEY_PASSPHRASE, else asked on the terminal (KeysError
    without one; `needed_for` says what wants it); `confirm` asks for it twice."""
    passphrase = os.environ.get(PASSPHRASE_VARIABLE)
    if passphrase is not None:
        return passphrase
    import getpass
    import sys

    if not sys.stdin.isatty():
        raise KeysError(f"{needed_for}: give it in ${PASSPHRASE_VARIABLE}")
    passphrase = getpass.getpass(prompt)
    if confirm and getpass.getpass("the same again: ") != passphrase:
        raise KeysError("the two passphrases differ: nothing was written")
    return passphrase


def _unseal(sealed, path, passphrase):
    from nacl import pwhash, secret
    from nacl.exceptions import CryptoError

    if passphrase is None:
        passphrase = ask_passphrase(f"passphrase of {path}: ", f"the keys at {path} are under a passphrase")
    try:
        salt = unb64(sealed["salt"], pwhash.argon2id.SALTBYTES, "salt")
        key = pwhash.argon2id.kdf(
            secret.SecretBox.KEY_SIZE,
            passphrase.encode(),
            salt,
            opslimit=int(sealed["ops"]),
            memlimit=int(sealed["mem"]),
        )
        return json.loads(secret.SecretBox(key).decrypt(base64.b64decode(sealed["box"])))
    except CryptoError:
        raise KeysError(f"wrong passphrase for the keys at {path}") from None
    except (KeyError, TypeError, ValueError) as error:
        raise KeysError(f"the keys at {path} are damaged: {error}") from None


def signed_bytes(post, channel, sender, ts):
    """The bytes a message's signature is made over: RFC 8785 JSON of its fields as the
    broker stores them (priority 3 if none, tags without repeats, meta {} if none)."""
    import rfc8785

    document = {
        "type": SIGNED_TYPE,
        "v": 1,
        "channel": channel,
        "sender": sender,
        "message": post.get("message"),
        "reply_to": post.get("reply_to"),
        "priority": post.get("priority") or DEFAULT_PRIORITY,
        "tags": list(dict.fromkeys(post.get("tags") or [])),
        "meta": post.get("meta") or {},
        "ts": ts,
    }
    try:
        return rfc8785.dumps(document)
    except (rfc8785.CanonicalizationError, UnicodeError, ValueError, TypeError) as error:
        raise KeysError(f"this message cannot be signed: {error}") from None


def seal(sender, recipient, box_key, message, meta=None):
    """(text, meta) of a direct message only `recipient`'s X25519 key opens: the text and
    meta sealed together with who sends it to whom (a sealed box is anonymous: the
    recipient checks that the message's sender is the one sealed inside), and a meta that
    says to whom (the broker routes by the channel)."""
    from nacl.public import PublicKey, SealedBox

    inner = {"from": sender, "to": recipient, "message": message, "meta": meta or {}}
    inner = json.dumps(inner, ensure_ascii=False).encode()
    text = b64(SealedBox(PublicKey(unb64(box_key, 32, f"{recipient}'s box key"))).encrypt(inner))
    return text, {"sealed": {"v": 1, "alg": SEALED, "to": recipient, "key": box_key}}


def sealed_to(message):
    """The "sealed" record of a sealed message's meta, or None."""
    meta = message.get("meta")
    sealed = meta.get("sealed") if isinstance(meta, dict) else None
    return sealed if isinstance(sealed, dict) and sealed.get("alg") == SEALED else None


class KnownKeys:
    """The signing keys this reader has pinned, by agent (known.json in the key directory):
    the first time a sender is met, every key the broker lists for it; later ones only by
    `agent-chat keys trust`."""

    def __init__(self, directory):
        self.path = os.path.join(directory, "known.json")
        try:
            with open(self.path) as file:
                pinned = json.load(file)
        except FileNotFoundError:
            pinned = {}
        except (OSError, ValueError) as error:
            raise KeysError(f"cannot read the pinned keys at {self.path}: {error}") from None
        damaged = not isinstance(pinned, dict) or not all(
            isinstance(keys, list) and all(isinstance(key, str) for key in keys) for keys in pinned.values()
        )
        if damaged:  # never pin again from the broker what a damaged file held
            raise KeysError(f"the pinned keys at {self.path} are damaged: mend or remove the file")
        self.pinned = pinned

    def keys_of(self, agent):
        return self.pinned.get(agent)

    def first_use(self, agent, listed):
        """The keys pinned for `agent`; the first time it is met, `listed` (the broker's),
        pinned now: trust on first use."""
        if agent not in self.pinned:
            self.pin(agent, listed)
        return self.pinned[agent]

    def pin(self, agent, keys):
        known = self.pinned.setdefault(agent, [])
        added = [key for key in keys if key not in known]
        known.extend(added)
        if added:
            self.save()
        return added

    def save(self):
        _write_private(self.path, self.pinned)


class Verifier:
    """Marks messages verified, unsigned, bad or key-changed (see the module's text),
    asking the broker for a sender's keys only when a signed message of it comes and its
    key is not pinned. `fetch(agent)` is the broker's GET /agents/{agent}/keys (None if
    it has none)."""

    def __init__(self, fetch, directory=None, own=None):
        self.fetch = fetch
        self.known = KnownKeys(directory or key_dir())
        self.listed = {}  # agent: the sign keys the broker lists for it (this run)
        self.asked_again = set()  # (agent, key): listed again once, for a key published since
        if own is not None:  # an agent trusts its own key: (agent, its public sign key)
            self.known.pin(*own)

    def broker_keys(self, agent, key=None):
        """The sign keys the broker lists for `agent`; asked again once if `key` is not
        among them (the agent may have published it since)."""
        if agent in self.listed and key is not None and key not in self.listed[agent]:
            if (agent, key) not in self.asked_again:
                self.asked_again.add((agent, key))
                del self.listed[agent]
        if agent not in self.listed:
            answer = self.fetch(agent)
            keys = answer.get("keys") if isinstance(answer, dict) else None
            self.listed[agent] = [key.get("sign") for key in keys or [] if isinstance(key, dict)]
        return self.listed[agent]

    def check(self, message):
        envelope = message.get("signature")
        if envelope is None:
            return UNSIGNED
        if not _checks(message, envelope):
            return BAD
        sender, key = message.get("sender"), envelope.get("key")
        pinned = self.known.keys_of(sender)
        if pinned is not None and key in pinned:
            return VERIFIED
        listed = self.broker_keys(sender, key)
        if key not in listed:
            return BAD
        return VERIFIED if key in self.known.first_use(sender, listed) else KEY_CHANGED


def _checks(message, envelope):
    """Whether the envelope's signature checks over the message, with its own key."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    if not isinstance(envelope, dict) or envelope.get("alg") != "ed25519" or envelope.get("v") != 1:
        return False
    try:
        key = VerifyKey(unb64(envelope.get("key"), 32, "key"))
        signature = unb64(envelope.get("sig"), 64, "sig")
        key.verify(signed_bytes(message, message.get("channel"), message.get("sender"), envelope.get("ts")), signature)
    except (KeysError, BadSignatureError, TypeError, ValueError):
        return False
    return True
