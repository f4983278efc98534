"""Agents' public keys (GET and PUT /agents/{id}/keys), and the check of signed posts that
uses them: a signature must check against the sender's current key, and channels of
AGENT_COMMS_REQUIRE_SIGNED take signed posts only (signing.py says what is signed)."""

import functools

from bottle import HTTPError, response

from .. import auth
from ..access import caller
from ..signing import SignatureError, check_keys, verify
from ..store import KeysRefused
from ..store.agent_keys import FROM_AGENT
from .validate import bad_request, look_alike, optional_json_object, validate_agent_id

KEYS_PATH = "/agents/<agent>/keys"


def register(app, broker):
    app.get(KEYS_PATH, callback=functools.partial(get_keys, broker))
    app.put(KEYS_PATH, callback=functools.partial(put_keys, broker), access="write")


def keys_reply(agent, keys):
    current = keys[0] if keys and keys[0].replaced is None else None
    return {
        "agent": agent,
        "current": None if current is None else current.as_dict(),
        "keys": [key.as_dict() for key in keys],
        # A key change is never silent: every key before the current one stays listed.
        "changes": max(0, len(keys) - 1),
    }


def get_keys(broker, agent):
    validate_agent_id(agent, "agent id")
    broker.touch_reader()
    keys = broker.store.agent_keys(agent)
    if not keys:
        raise HTTPError(404, f"agent {agent!r} has published no keys")
    return keys_reply(agent, keys)


def put_keys(broker, agent):
    """Publish an agent's keys: {"sign": base64 Ed25519 public key, "box": base64 X25519
    public key (optional)}. With a token, only as its own agent, and it may replace keys;
    without one, an agent that holds no token may publish once (a change then needs its
    token, or the operator)."""
    validate_agent_id(agent, "agent id")
    who = caller()
    if who is not None and who.agent != agent:
        raise HTTPError(403, f"token {who.token_id} belongs to agent {who.agent!r}: it cannot publish {agent!r}'s keys")
    if who is None:
        # Fresh: keys are published rarely, and a token added a moment ago must hold.
        holder = broker.token_holder_like(agent, fresh=True)
        if holder is not None:
            raise HTTPError(403, f"agent {holder!r} has a token: publish its keys with it (Authorization: Bearer ...)")
    body = optional_json_object(broker.settings.max_body)
    unknown = set(body) - {"sign", "box", "box_sig"}
    if unknown:
        raise bad_request(f"unknown field(s) {', '.join(sorted(unknown))}: give sign, box and box_sig")
    if "sign" not in body:
        raise bad_request("missing field: sign (the base64 Ed25519 public key)")
    sign, box, box_sig = body["sign"], body.get("box"), body.get("box_sig")
    try:
        check_keys(agent, sign, box, box_sig)
    except SignatureError as error:
        raise bad_request(str(error)) from None
    store = broker.store
    # A name that looks like another agent with keys ('alice', 'Alice', 'alice\u00a0')
    # cannot get keys of its own: its signed words would pass for that agent's.
    other = next((name for name in store.key_agents() if name != agent and look_alike(name) == look_alike(agent)), None)
    if other is not None:
        raise HTTPError(409, f"agent {agent!r} looks like agent {other!r}, which has keys: choose another name")
    try:
        outcome, _ = store.publish_keys(agent, sign, box, box_sig, FROM_AGENT, who is not None)
    except KeysRefused as error:
        raise HTTPError(409, str(error)) from None
    response.status = 201 if outcome == "added" else 200
    return {"status": outcome, **keys_reply(agent, broker.store.agent_keys(agent))}


def check_signatures(broker, posts):
    """400 for a post whose signature does not check against its sender's current key,
    and for an unsigned post to a channel that takes signed posts only."""
    required = broker.settings.require_signed
    keys = {}
    for index, post in enumerate(posts):
        where = f"item {index}: " if len(posts) > 1 else ""
        if post.signature is None:
            if required and auth.matches(required, post.channel):
                raise bad_request(
                    f"{where}channel {post.channel!r} takes signed posts only: sign it "
                    "(agent-chat keys init, then keys publish); nothing was stored"
                )
            continue
        if post.sender not in keys:
            current = broker.store.current_key(post.sender)
            keys[post.sender] = None if current is None else current.sign
        try:
            verify(post, keys[post.sender])
        except SignatureError as error:
            raise bad_request(f"{where}{error}; nothing was stored") from None
