"""agent-chat's side of signed and sealed messages: the `keys` command, signing what it
sends, sealing direct messages, and checking (and opening) what it prints. The keys and
the cryptography are keys.py's."""

import os

from .keys import (
    BAD,
    KEY_CHANGED,
    UNSIGNED,
    VERIFIED,
    AgentKeys,
    KeysError,
    KnownKeys,
    Verifier,
    ask_passphrase,
    box_key_checks,
    key_dir,
    key_path,
    seal,
    sealed_to,
)


def _require_agent(agent):
    if not agent:
        raise KeysError("keys belong to an agent: give --agent-id (or AGENT_COMMS_AGENT_ID)")


def own_keys(agent, required=False):
    """This agent's keys from the key directory; None if it has none (KeysError if
    `required`, or if they are there but cannot be read)."""
    if required:
        _require_agent(agent)
    if not agent:
        return None
    path = key_path(key_dir(), agent)
    if not required and not os.path.exists(path):
        return None
    keys = AgentKeys.load(path)
    if keys.agent != agent:
        raise KeysError(f"the keys at {path} are agent {keys.agent}'s, not {agent}'s")
    return keys


def own_public(agent):
    """(agent, its public signing key) from its key file, without its passphrase; None if
    it has none."""
    path = key_path(key_dir(), agent) if agent else None
    if path is None or not os.path.exists(path):
        return None
    return agent, [AgentKeys.public_of(path)["sign"]]


def keys_command(args, agent, broker, out, say):
    """agent-chat keys init | publish | show [AGENT] | trust AGENT."""
    if args["init"]:
        return init_keys(args, agent, out, say)
    if args["publish"]:
        keys = own_keys(agent, required=True)
        answer = broker.publish_keys(keys.agent, keys.public())
        out.keys(answer, line=f"{answer['status']}: {keys.agent}'s keys on the broker")
        return 0
    if args["show"]:
        who = args["AGENT"] or agent
        if not who:
            raise KeysError("show whose keys? give AGENT, or --agent-id for your own")
        answer = broker.agent_keys(who)
        if answer is None:
            say(f"agent {who} has published no keys")
            return 2
        out.keys(answer, pinned=KnownKeys(key_dir()).keys_of(who))
        return 0
    who = args["AGENT"]
    answer = broker.agent_keys(who)
    if answer is None or not answer.get("current"):
        raise KeysError(f"agent {who} has no current keys on the broker to trust")
    key = answer["current"]["sign"]
    added = KnownKeys(key_dir()).pin(who, [key])
    out.line(f"trusted {key} for {who}" if added else f"{key} was already trusted for {who}")
    return 0


def init_keys(args, agent, out, say):
    _require_agent(agent)
    path = key_path(key_dir(), agent)
    if os.path.exists(path) and not args["--force"]:
        raise KeysError(f"{agent} has keys already ({path}): --force replaces them (then publish the new ones)")
    passphrase = None
    if args["--passphrase"]:
        passphrase = ask_passphrase("passphrase for the new keys: ", "--passphrase (no terminal to ask on)", True)
        if not passphrase:
            raise KeysError("--passphrase: the passphrase is empty")
    keys = AgentKeys.generate(agent)
    keys.save(path, passphrase)
    out.line(f"made {agent}'s keys in {path}")
    out.line(f"sign    {keys.sign_public}")
    out.line(f"box     {keys.box_public}")
    out.line(f"box-sig {keys.box_sig}")
    say("publish them with `agent-chat keys publish` (a key change is shown to everyone who pinned the old one)")
    return 0


def sealed_post(broker, channel, message, meta, say):
    """(text, meta) to post to `channel`: sealed to its agent when it is an inbox whose
    agent published an encryption key, else as they are (a sender with keys of its own is
    told so; one without, as before keys, is not). The encryption key must be signed by
    the agent's signing key as this sender pinned it (trust on first use, as for reading):
    a broker cannot swap it for a key of its own, or withdraw it, unnoticed (KeysError)."""
    if not channel.startswith("@"):
        return message, meta
    recipient = channel[1:]
    answer = broker.agent_keys(recipient)
    keys = [key for key in (answer or {}).get("keys") or [] if isinstance(key, dict)]
    current = (answer or {}).get("current") or {}
    box = current.get("box")
    if not box:
        if any(key.get("box") for key in keys):
            raise KeysError(f"{recipient} had an encryption key and the broker lists none now: not sent")
        if broker.keys is not None:
            say(f"{recipient} has published no encryption key: the message goes in the clear")
        return message, meta
    if current.get("sign") not in KnownKeys(key_dir()).first_use(recipient, [key.get("sign") for key in keys]):
        raise KeysError(
            f"{recipient}'s keys changed since you pinned them: not sent. Check with {recipient}, "
            f"then `agent-chat keys trust {recipient}`"
        )
    if not box_key_checks(recipient, current["sign"], box, current.get("box_sig")):
        raise KeysError(f"{recipient}'s encryption key is not signed by its signing key: not sent")
    sender = broker.agent_id or (broker.keys.agent if broker.keys is not None else None)
    if sender is None:  # a token's agent: the broker says which
        sender = broker.status().get("agent")
    return seal(sender, recipient, box, message, meta)


# Reading's keys: this agent's, from the key directory, once they are needed.
LOAD = object()


class Reading:
    """What agent-chat does to each message before it prints it: marks it (verified,
    unsigned, bad, key-changed: keys.py), opens it if it is sealed to this agent, and with
    `require_signed` drops (and reports) every message that is not verified. Returns the
    message to print, or None."""

    def __init__(self, broker, agent, say, require_signed=False, keys=LOAD):
        self.broker = broker
        self.agent = agent
        self.say = say
        self.require_signed = require_signed
        self._verifier = None
        # This agent's keys: LOAD, from the key directory when first needed; or given
        # (None for a server that reads for callers it cannot vouch for: mcp --http).
        self._keys = keys
        self._warned = set()

    @property
    def keys(self):
        if self._keys is LOAD:
            self._keys = own_keys(self.agent)
        return self._keys

    def verifier(self):
        if self._verifier is None:
            if self._keys is not LOAD:
                own = None if self._keys is None else (self._keys.agent, [self._keys.sign_public])
            else:
                own = own_public(self.agent)
            self._verifier = Verifier(self.broker.agent_keys, own=own)
        return self._verifier

    def __call__(self, message):
        mark = UNSIGNED if message.get("signature") is None else self.verifier().check(message)
        message = {**message, "verification": mark}
        sender = message.get("sender")
        if mark == KEY_CHANGED and sender not in self._warned:
            self._warned.add(sender)
            self.say(
                f"{sender}'s signing key is not the one you pinned: it changed. Check with {sender}, "
                f"then `agent-chat keys trust {sender}` (agent-chat keys show {sender})"
            )
        if self.require_signed and mark != VERIFIED:
            why = {UNSIGNED: "unsigned", BAD: "its signature is BAD", KEY_CHANGED: "signed with a changed key"}[mark]
            self.say(f"dropped message {message.get('id')} of {message.get('channel')} from {sender}: {why}")
            return None
        sealed = sealed_to(message)
        if sealed is not None:
            try:
                opened = self.keys.open(message) if self.keys is not None else None
            except KeysError as error:
                self.say(str(error))
                opened = None
            message = opened if opened is not None else {**message, "sealed": "locked"}
        return message
