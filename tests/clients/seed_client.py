"""The Raft seeds' client: publishes with expiry, fetches by id, sees the record expire (then
INVALID_ARGUMENT), and subscribes to new messages; each call through another node.

usage: seed_client.py GENERATED_DIR ADDR[,ADDR...]
"""
import sys
import threading
import time

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import broker_pb2 as pb  # noqa: E402
import broker_pb2_grpc as rpc  # noqa: E402

addrs = sys.argv[2].split(",")
stubs = [rpc.BrokerStub(grpc.insecure_channel(a)) for a in addrs]
subject = f"sensors-{int(time.time() * 1000)}"


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def stub(i):
    return stubs[i % len(stubs)]


def invalid(what, f):
    try:
        f()
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            fail(f"{what}: {e.code()} {e.details()}, want INVALID_ARGUMENT")
        return e.details()
    fail(f"{what}: accepted, want INVALID_ARGUMENT")


keep = stub(0).Publish(pb.PublishRequest(subject=subject, body=b"keep"), timeout=30).id
short = stub(1).Publish(
    pb.PublishRequest(subject=subject, body=b"short-lived", expirationSeconds=1), timeout=30
).id
if not (0 <= keep < short):
    fail(f"ids {keep}, {short} are not increasing offsets")
for i in range(3):
    got = stub(i).Fetch(pb.FetchRequest(subject=subject, id=short), timeout=30).body
    if got != b"short-lived":
        fail(f"fetch {short} through node {i}: {got!r}")
print(f"published ids {keep} and {short} (expires in 1 s); fetched {short} through every node")

time.sleep(2.5)
why = invalid("fetch of the expired record", lambda: stub(2).Fetch(
    pb.FetchRequest(subject=subject, id=short), timeout=30))
print(f"after expiry: INVALID_ARGUMENT ({why})")
if stub(2).Fetch(pb.FetchRequest(subject=subject, id=keep), timeout=30).body != b"keep":
    fail("the record without expiry is gone")
invalid("an id never written", lambda: stub(0).Fetch(
    pb.FetchRequest(subject=subject, id=short + 1000), timeout=30))
invalid("a negative id", lambda: stub(0).Fetch(pb.FetchRequest(subject=subject, id=-1), timeout=30))
invalid("an unknown subject", lambda: stub(1).Fetch(
    pb.FetchRequest(subject=subject + "-none", id=0), timeout=30))
invalid("a negative expiry", lambda: stub(1).Publish(
    pb.PublishRequest(subject=subject, body=b"x", expirationSeconds=-5), timeout=30))
print("unknown, negative and never-written ids, an unknown subject, a negative expiry: "
      "INVALID_ARGUMENT")

# Subscribe: new messages only, in order.
call = stub(2).Subscribe(pb.SubscribeRequest(subject=subject))
call.initial_metadata()
got = []


def read():
    try:
        for m in call:
            got.append(m.body)
    except grpc.RpcError:
        pass


threading.Thread(target=read, daemon=True).start()
bodies = [f"new-{i}".encode() for i in range(5)]
for i, body in enumerate(bodies):
    stub(i).Publish(pb.PublishRequest(subject=subject, body=body), timeout=30)
deadline = time.time() + 30
while len(got) < len(bodies) and time.time() < deadline:
    time.sleep(0.05)
time.sleep(1.0)
call.cancel()
if got != bodies:
    fail(f"subscription got {got}, want exactly {bodies}")
print("subscription: exactly the 5 new messages, in order")
print("OK")
