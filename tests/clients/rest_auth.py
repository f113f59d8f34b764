"""REST with --auth required: no token or a wrong one is a 401 problem that asks for a bearer
token and changes nothing; the bootstrap token (a superuser) may create and publish.

usage: rest_auth.py ADDR TOKEN
"""
import http.client
import json
import sys

addr, token = sys.argv[1], sys.argv[2]
host, port = addr.rsplit(":", 1)


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def call(method, path, body, auth):
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    h = {"Content-Type": "application/json"}
    if auth:
        h["Authorization"] = auth
    c.request(method, path, body=json.dumps(body).encode(), headers=h)
    r = c.getresponse()
    raw = r.read()
    return r.status, r.getheader("Content-Type", ""), r.getheader("WWW-Authenticate"), raw


for auth in [None, "Bearer tern_" + "0" * 64, "Basic abc"]:
    st, ctype, www, raw = call("POST", "/topics", {"name": "secret"}, auth)
    body = json.loads(raw)
    if st != 401 or ctype != "application/problem+json" or www != "Bearer" \
            or body["code"] != "UNAUTHENTICATED":
        fail(f"{auth!r}: {st} {ctype} {www} {raw!r}")
print("no token, a wrong one, another scheme: 401 problems with WWW-Authenticate: Bearer")
st, _, _, raw = call("POST", "/topics", {"name": "secret", "partitions": 1}, "Bearer " + token)
if st != 201:
    fail(f"with the token: {st} {raw!r}")
st, _, _, raw = call("POST", "/topics", {"name": "secret"}, None)
if st != 401:
    fail(f"again without: {st}")
st, _, _, raw = call("POST", "/topics/secret/publish", {"value": "x"}, "Bearer " + token)
if st != 200:
    fail(f"publish with the token: {st} {raw!r}")
st, _, _, raw = call("POST", "/topics/secret/publish", {"value": "x"}, None)
if st != 401:
    fail(f"publish without: {st} {raw!r}")
print("the bootstrap token creates and publishes; without it nothing is written")
print("OK")
