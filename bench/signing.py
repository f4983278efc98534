"""Scenario: signed messages. What signing costs per message of ~1 KiB with typical fields
(priority, two tags, a small meta), each step timed in this process in bounded loops:
the client signing it (AgentKeys.sign: RFC 8785 encoding and Ed25519), the broker's
check (signing.envelope_text, then signing.verify against the sender's current key), a
reader's check against a key it pinned (Verifier.check: no broker call), and sealing and
opening a direct message (keys.seal, AgentKeys.open). Then end to end, on a real broker
with the publish scenario's defaults and load (wrk, 32 keep-alive clients): the same
body posted unsigned and signed, in runs of half the duration each, in the order unsigned,
signed, signed, unsigned (a drift of the machine weighs on both alike). The broker takes
a signature for one post only, so every signed post carries its own: signed beforehand
(each with its own ts), and put together by lua/posts.lua, which posts the unsigned body
the same way."""

import json
import tempfile
import time
from dataclasses import dataclass

import orjson

from agent_comms_broker import signing as broker_signing
from agent_comms_broker.store.model import Message, Post
from agent_comms_chat import keys
from brokers import Client, cpu_seconds, running_broker, stored_messages
from publish import CONNECTIONS, MESSAGE_BYTES, RATE_LIMITED, report_stored
from wrk_runner import run_wrk

CHANNEL = "bench-signed"
SIGNER = "bench-signer"
READER = "bench-reader"
PRIORITY = 2
TAGS = ["status", "deploy"]
META = {"host": "warp-ct200", "job": 4711}
# Each timed step: calls in batches of BATCH, until MICRO_SECONDS or MICRO_CALLS; the
# figure is the median batch's time per call.
MICRO_SECONDS = 1.0
PART_SECONDS = 0.5  # the parts of a step (encoding alone, Ed25519 alone)
MICRO_CALLS = 20_000
BATCH = 100
WARM_UP = 50
# End to end: runs of seconds / 2 each, in this order, so that a drift of the machine (or
# the store's growth) weighs on both kinds alike.
ORDER = ("unsigned", "signed", "signed", "unsigned")


@dataclass(frozen=True)
class Timing:
    median_us: float
    p90_us: float
    calls: int

    def as_dict(self):
        return {"median_us": round(self.median_us, 2), "p90_us": round(self.p90_us, 2), "calls": self.calls}


def per_call(step, seconds=MICRO_SECONDS, max_calls=MICRO_CALLS):
    """The time of one call of `step`, from batches of BATCH calls (bounded in count and time)."""
    for _ in range(WARM_UP):
        step()
    per_batch = []
    calls = 0
    deadline = time.perf_counter() + seconds
    while calls < max_calls and time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(BATCH):
            step()
        per_batch.append((time.perf_counter() - started) / BATCH * 1e6)
        calls += BATCH
    per_batch.sort()
    return Timing(per_batch[len(per_batch) // 2], per_batch[int(len(per_batch) * 0.9)], calls)


def message_text(size=MESSAGE_BYTES):
    """publish.lua's message text: `size` bytes of ASCII."""
    return ("agent status update: all systems nominal. " * size)[:size]


def typical_post(size=MESSAGE_BYTES):
    return {"sender": SIGNER, "message": message_text(size), "priority": PRIORITY, "tags": TAGS, "meta": META}


def as_read(post, envelope, channel=CHANNEL, message_id=1):
    """The message as a reader gets it from the broker (Message.as_dict, through JSON)."""
    stored = Message(
        message_id,
        channel,
        post["sender"],
        post["message"],
        time.time(),
        priority=post.get("priority") or keys.DEFAULT_PRIORITY,
        tags=tuple(post.get("tags") or ()),
        meta=orjson.dumps(post["meta"]).decode() if post.get("meta") else None,
        signature=broker_signing.envelope_text(envelope),
    )
    return orjson.loads(orjson.dumps(stored.as_dict()))


def measure_steps(workdir):
    """{name: Timing} of each step, in this process; every step checked to succeed first."""
    from nacl.signing import VerifyKey

    signer = keys.AgentKeys.generate(SIGNER)
    reader = keys.AgentKeys.generate(READER)
    post = typical_post()
    envelope = signer.sign(post, CHANNEL)
    key = signer.sign_public
    raw_key, raw_sig = keys.unb64(key, 32, "key"), keys.unb64(envelope["sig"], 64, "sig")
    ts = envelope["ts"]
    meta_text = orjson.dumps(META).decode()
    signed = keys.signed_bytes(post, CHANNEL, SIGNER, ts)

    def broker_check():
        stored = Post(
            CHANNEL,
            SIGNER,
            post["message"],
            priority=PRIORITY,
            tags=tuple(TAGS),
            meta=meta_text,
            signature=broker_signing.envelope_text(envelope),
        )
        broker_signing.verify(stored, key)

    broker_check()  # raises SignatureError if the broker would refuse it

    fetched = []

    def fetch(agent):  # the broker's GET /agents/{agent}/keys; never called for a pinned key
        fetched.append(agent)
        return {"agent": agent, "keys": [signer.public()]}

    read = as_read(post, envelope)
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        verifier = keys.Verifier(fetch, directory)
        verifier.known.pin(SIGNER, [key])
        if verifier.check(read) != keys.VERIFIED:
            raise RuntimeError("the reader's Verifier does not mark the signed message verified")
        tampered = {**read, "message": read["message"] + "!"}
        if verifier.check(tampered) != keys.BAD:
            raise RuntimeError("the reader's Verifier does not mark a changed message bad")
        reader_check = per_call(lambda: verifier.check(read))
        if fetched:
            raise RuntimeError(f"the reader's Verifier asked the broker for keys of a pinned sender: {fetched}")

    text, sealed_meta = keys.seal(SIGNER, READER, reader.box_public, post["message"], {"job": 4711})
    direct = {
        "id": 2,
        "channel": f"@{READER}",
        "sender": SIGNER,
        "message": text,
        "timestamp": time.time(),
        "meta": sealed_meta,
    }
    if (reader.open(direct) or {}).get("message") != post["message"]:
        raise RuntimeError("a sealed message does not open to its text")

    return {
        "sign": per_call(lambda: signer.sign(post, CHANNEL)),
        "sign: RFC 8785 encoding": per_call(lambda: keys.signed_bytes(post, CHANNEL, SIGNER, ts), PART_SECONDS),
        "sign: Ed25519": per_call(lambda: signer.signing.sign(signed), PART_SECONDS),
        "broker check": per_call(broker_check),
        "broker check: Ed25519": per_call(lambda: VerifyKey(raw_key).verify(signed, raw_sig), PART_SECONDS),
        "reader check": reader_check,
        "seal": per_call(lambda: keys.seal(SIGNER, READER, reader.box_public, post["message"], {"job": 4711})),
        "open": per_call(lambda: reader.open(direct)),
        "sealed_bytes": len(text),
    }


def check_broker_accepts(broker, signer, signed_body, bodies):
    """The broker takes the signed body (201, the signature stored), refuses it changed
    (400), and a reader marks what it stored verified; it takes a post of posts.lua's
    template too: the load below is checked posts."""
    client = Client(broker.port)
    try:
        status, raw = client.request("PUT", f"/agents/{SIGNER}/keys", signer.public())
        if status not in (200, 201):
            raise RuntimeError(f"PUT /agents/{SIGNER}/keys: {status} {raw[:200]!r}")
        stored = client.post_json(f"/messages/{CHANNEL}", signed_body)
        changed = {**signed_body, "message": signed_body["message"][:-1] + "?"}
        status, raw = client.request("POST", f"/messages/{CHANNEL}", changed)
        if status != 400:
            raise RuntimeError(f"the broker took a signed post whose text was changed: {status} {raw[:200]!r}")
        client.post_json(f"/messages/{CHANNEL}", json.loads(bodies.text(*bodies.sign(1)[0])))
        read = client.get_json(f"/messages/{CHANNEL}/{stored['id']}")
        if read.get("signature") != signed_body["signature"]:
            raise RuntimeError(f"the broker did not store the signature: {read.get('signature')!r}")
        with tempfile.TemporaryDirectory() as directory:
            verifier = keys.Verifier(lambda agent: client.get_json(f"/agents/{agent}/keys"), directory)
            if verifier.check(read) != keys.VERIFIED:
                raise RuntimeError("a reader does not mark the stored signed message verified")
    finally:
        client.close()


# The text put in place of a signature's ts and sig in the template of posts.lua.
TS_MARK = 2**53 - 1
SIG_MARK = "SIG-MARK"
# Pre-signed posts of a signed run: twice as many as the first unsigned run's rate would
# post, and more; of the warm-up.
HEADROOM = 2
SPARE = 1000
WARM_UP_POSTS = 3000


class SignedBodies:
    """The signed body as posts.lua puts it together: its text around the envelope's ts and
    sig; and signatures made as AgentKeys.sign makes them, each at its own ts."""

    def __init__(self, signer, post):
        self.signer, self.post = signer, post
        envelope = {"v": 1, "alg": "ed25519", "key": signer.sign_public, "ts": TS_MARK, "sig": SIG_MARK}
        text = json.dumps({**post, "signature": envelope})
        self.prefix, rest = text.split(str(TS_MARK))
        self.middle, self.suffix = rest.split(SIG_MARK)
        # Counting down from a second ago: never the ts of a post AgentKeys.sign signed just
        # before (the same message at the same ts has the same signature).
        self.next_ts = int(time.time() * 1000) - 1000

    def sign(self, count):
        """`count` (ts, sig) pairs, none made before."""
        pairs = []
        for _ in range(count):
            ts, self.next_ts = self.next_ts, self.next_ts - 1
            signed = self.signer.signing.sign(keys.signed_bytes(self.post, CHANNEL, SIGNER, ts))
            pairs.append((ts, keys.b64(signed.signature)))
        return pairs

    def text(self, ts, sig):
        return f"{self.prefix}{ts}{self.middle}{sig}{self.suffix}"

    def write(self, path, pairs):
        write_posts(path, (self.prefix, self.middle, self.suffix), pairs)


def write_posts(path, template, pairs):
    with open(path, "w") as out:
        out.write("".join(f"{part}\n" for part in template))
        out.writelines(f"{ts} {sig}\n" for ts, sig in pairs)


@dataclass(frozen=True)
class PublishRun:
    wrk: object  # WrkResult
    accepted: int
    stored: int
    cpu_us: float  # the workers' CPU time per stored post
    presigned: int = 0  # the signed posts it had (0: unsigned)

    def as_dict(self):
        return {
            "wrk": self.wrk.as_dict(),
            "accepted": self.accepted,
            "stored": self.stored,
            "worker_cpu_us_per_post": round(self.cpu_us, 1),
            "presigned": self.presigned,
        }


def measure_publish(workdir, seconds, threads):
    """wrk runs of the same ~1 KiB body posted unsigned and signed, in the order of ORDER,
    each seconds / 2 long: ({"unsigned"|"signed": [PublishRun, ...]}, details)."""
    signer = keys.AgentKeys.generate(SIGNER)
    unsigned_body = typical_post()
    signed_body = {**unsigned_body, "signature": signer.sign(unsigned_body, CHANNEL)}
    bodies = SignedBodies(signer, unsigned_body)
    home = workdir / "signing-posts"
    home.mkdir(parents=True, exist_ok=True)
    unsigned_file = home / "unsigned.txt"
    write_posts(unsigned_file, (json.dumps(unsigned_body), "", ""), [("", "")])
    run_seconds = max(1, seconds // 2)
    runs = {"unsigned": [], "signed": []}
    signing_seconds = 0.0
    with running_broker(workdir, "signing", env=RATE_LIMITED) as broker:
        url = f"{broker.url}/messages/{CHANNEL}"
        check_broker_accepts(broker, signer, signed_body, bodies)
        # Both workers load PyNaCl and rfc8785 (imported on the first signed post).
        bodies.write(home / "warm-up.txt", bodies.sign(WARM_UP_POSTS))
        run_wrk(url, "posts.lua", [home / "warm-up.txt", 1], connections=CONNECTIONS, seconds=1)
        time.sleep(0.5)
        workers = broker.worker_pids()
        for number, kind in enumerate(ORDER):
            posts, presigned = unsigned_file, 0
            if kind == "signed":
                fastest = max(half.accepted / half.wrk.seconds for half in runs["unsigned"])
                presigned = int(fastest * run_seconds * HEADROOM) + SPARE
                started = time.perf_counter()
                posts = home / f"signed-{number}.txt"
                bodies.write(posts, bodies.sign(presigned))
                signing_seconds += time.perf_counter() - started
            before = stored_messages(broker.port)
            cpu_before = sum(cpu_seconds(pid) for pid in workers)
            result = run_wrk(
                url, "posts.lua", [posts, threads], connections=CONNECTIONS, threads=threads, seconds=run_seconds
            )
            time.sleep(1.0)  # posts still in flight when wrk stopped counting
            cpu = sum(cpu_seconds(pid) for pid in workers) - cpu_before
            stored = stored_messages(broker.port) - before
            accepted = result.requests - result.errors["status"]
            runs[kind].append(PublishRun(result, accepted, stored, cpu / max(stored, 1) * 1e6, presigned))
    details = {
        "body_bytes": {"unsigned": len(json.dumps(unsigned_body)), "signed": len(bodies.text(*bodies.sign(1)[0]))},
        "presigning_seconds": round(signing_seconds, 2),
    }
    return runs, details


def run(report, workdir, seconds=10, threads=1):
    steps = measure_steps(workdir)
    sealed_bytes = steps.pop("sealed_bytes")
    details = {"message_bytes": MESSAGE_BYTES, "steps": {name: timing.as_dict() for name, timing in steps.items()}}
    report.details["signing"] = details

    def add(label, name, note):
        timing = steps[name]
        spread = f"p90 of batches {timing.p90_us:.1f} µs, {timing.calls:,} calls"
        note = f"{note}; {spread}" if note else spread
        report.add(f"signing: {label}", timing.median_us, "µs/msg", None, at_least=False, note=note)

    def part(name):
        return f"{steps[name].median_us:.1f} µs"

    add(
        "sign a ~1 KiB post (AgentKeys.sign)",
        "sign",
        f"RFC 8785 encoding {part('sign: RFC 8785 encoding')}, Ed25519 {part('sign: Ed25519')}",
    )
    add(
        "the broker's check (envelope_text + verify)",
        "broker check",
        f"Ed25519 verify {part('broker check: Ed25519')}",
    )
    add("a reader's check, key pinned (Verifier.check)", "reader check", "no broker call")
    add("seal a ~1 KiB direct message (keys.seal)", "seal", f"{sealed_bytes:,} B of base64 on the wire")
    add("open it (AgentKeys.open)", "open", "")

    runs, publish_details = measure_publish(workdir, seconds, threads)
    details["publish"] = {
        "order": list(ORDER),
        "connections": CONNECTIONS,
        "wrk_threads": threads,
        **publish_details,
        **{kind: [half.as_dict() for half in kind_runs] for kind, kind_runs in runs.items()},
    }
    summary = {kind: summarise(kind_runs) for kind, kind_runs in runs.items()}
    details["publish"]["summary"] = summary
    signed, unsigned = summary["signed"], summary["unsigned"]
    for kind, label, note in (
        (
            "signed",
            f"publish signed ~1 KiB posts, {CONNECTIONS} clients",
            f"{signed['rate'] / unsigned['rate']:.2f}x the same body unsigned, in the same run; the workers' CPU "
            f"{signed['cpu_us']:.0f} µs a post, unsigned {unsigned['cpu_us']:.0f}; ",
        ),
        ("unsigned", "publish the same body unsigned", ""),
    ):
        figures = summary[kind]
        report.add(
            f"{label}: rate",
            figures["rate"],
            "msg/s",
            None,
            at_least=True,
            note=f"{note}{figures['accepted']} accepted in {figures['seconds']:.1f} s "
            f"({len(runs[kind])} runs, order {'-'.join(ORDER)}), {figures['failed']} errors",
        )
        report.add(
            f"publish {kind}: p99 latency",
            figures["p99_ms"],
            "ms",
            None,
            at_least=False,
            note=f"the higher of its runs' ({', '.join(f'{p99:.1f}' for p99 in figures['p99s_ms'])}); "
            f"p50 {', '.join(f'{p50:.1f}' for p50 in figures['p50s_ms'])} ms",
        )
    accepted = sum(half.accepted for kind_runs in runs.values() for half in kind_runs)
    stored = sum(half.stored for kind_runs in runs.values() for half in kind_runs)
    report_stored(report, "publish signed and unsigned", accepted, stored)
    for half in runs["signed"]:
        if half.wrk.errors["status"]:
            used_up = " (the run used up its pre-signed posts)" if half.wrk.requests >= half.presigned - threads else ""
            report.errors.append(f"signing: the broker refused {half.wrk.errors['status']} signed posts{used_up}")


def summarise(runs):
    """One kind's runs together: its rate over all of them, the higher of their p99s, the
    workers' CPU µs per stored post over all of them."""
    accepted = sum(half.accepted for half in runs)
    seconds = sum(half.wrk.seconds for half in runs)
    return {
        "rate": accepted / seconds,
        "accepted": accepted,
        "seconds": seconds,
        "failed": sum(half.wrk.failed for half in runs),
        "p99_ms": max(half.wrk.latency_ms["99"] for half in runs),
        "p99s_ms": [half.wrk.latency_ms["99"] for half in runs],
        "p50s_ms": [half.wrk.latency_ms["50"] for half in runs],
        "cpu_us": sum(half.cpu_us * half.stored for half in runs) / max(1, sum(half.stored for half in runs)),
    }
