#!/usr/bin/env python3
"""A local application of two facilities, written only from the protos.

Uses nothing but the stock gRPC library for Python (grpcio), its code
generator (grpcio-tools) and the standard health and reflection packages,
pinned in requirements.txt. The Python code for proto/exchange/v1/*.proto is
generated at run time into a temporary directory (nothing generated is
committed), so this file is also a check that the protos alone are enough.

What it does, as the sender's application and then the recipient's:

  1. health check of the sender's client service, and a reflection listing
  2. Send of a file (5 MiB of random bytes by default) in 256 KiB pieces
  3. Status until DELIVERED, printing every receipt and the provision boundary
  4. the recipient's inbox, Fetch (the bytes compared with what was sent), Ack
  5. Status at the sender until PROCESSED

Connection settings come from the `exchange` command's client config files
(client.toml: server, ca, cert, key; paths relative to the file), for
example those that `exchange demo --dir net` writes:

  python examples/python/exchange_client.py \\
      --sender net/clinic/app/client.toml \\
      --recipient net/hospital/app/client.toml \\
      --to urn:jp:mhlw:facility:1310000021

The daemon's client listener must present a certificate valid for the host
name dialled (`[listen] client_cert`, issued by `exchange ca issue-server`);
grpcio checks it as any TLS client does, with no override. Exits 0 when every
step passed, 1 with the reason otherwise.
"""

import argparse
import hashlib
import importlib
import os
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_tools import protoc

# The daemon's own slice size; any piece below the per-piece limit works.
PIECE = 256 * 1024
PROTO_ROOT = Path(__file__).resolve().parent.parent.parent / "proto"


class Failed(Exception):
    """A step did not give the expected answer."""


def generate(out: Path):
    """Generates the Python modules of proto/exchange/v1/*.proto into `out`."""
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "exchange" / "v1").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise Failed(f"grpc_tools.protoc failed on {protos}")
    sys.path.insert(0, str(out))
    pb = importlib.import_module("exchange.v1.daemon_pb2")
    rpc = importlib.import_module("exchange.v1.daemon_pb2_grpc")
    return pb, rpc


def enum_word(message, field: str) -> str:
    """A state, disposition or role as a word (DELIVERED, THIRD_PARTY, ...).

    Works whether the field is a string or an enum of receipt.proto: an enum
    number is named through the descriptor and its type prefix removed
    (DISPOSITION_DELIVERED -> DELIVERED)."""
    value = getattr(message, field)
    fd = message.DESCRIPTOR.fields_by_name[field]
    if fd.enum_type is None:
        return value
    v = fd.enum_type.values_by_number.get(value)
    if v is None:
        return str(value)
    name = fd.enum_type.name
    prefix = "".join("_" + c if c.isupper() and i else c for i, c in enumerate(name)).upper() + "_"
    return v.name[len(prefix):] if v.name.startswith(prefix) else v.name


class Settings:
    """One application's connection settings, read from a client.toml."""

    def __init__(self, path: Path, server=None):
        with open(path, "rb") as f:
            t = tomllib.load(f)
        base = path.parent

        def read(key):
            p = Path(t[key])
            return (p if p.is_absolute() else base / p).read_bytes()

        self.server = server or t["server"]
        self.ca = read("ca")
        self.cert = read("cert")
        self.key = read("key")

    def channel(self, target=None):
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        target = target or self.server
        # Messages up to 16 MiB: a Status with many receipts, a Fetch piece.
        options = [("grpc.max_receive_message_length", 16 << 20)]
        if target.startswith("unix:"):
            # Over the daemon's Unix socket the certificate is checked for
            # the name localhost (grpcio would otherwise send the socket
            # path as the TLS server name, which is not a host name).
            options.append(("grpc.default_authority", "localhost"))
        return grpc.secure_channel(target, creds, options=options)


def ms(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t / 1000)) + "Z" if t else "-"


def msg_id(b: bytes) -> str:
    return str(uuid.UUID(bytes=b)) if len(b) == 16 else b.hex()


def health(channel, label: str):
    stub = health_pb2_grpc.HealthStub(channel)
    for service in ("", "exchange.v1.Client"):
        r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        word = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
        print(f"  health {label} {service or '(server)'}: {word}")
        if r.status != health_pb2.HealthCheckResponse.SERVING:
            raise Failed(f"health check of {service or 'the server'} says {word}")


def reflection_services(channel) -> tuple[str, list[str]]:
    """Lists the services by server reflection (v1, else v1alpha: the two
    protocols' messages are the same on the wire)."""
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    last = None
    for version in ("v1", "v1alpha"):
        call = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        try:
            for response in call(iter([request]), timeout=10):
                return version, sorted(s.name for s in response.list_services_response.service)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            last = e
    raise Failed(f"the server offers no reflection: {last}")


def print_status(pb, s):
    print(f"  state {enum_word(s, 'state')}, created {ms(s.created_ms)}, expires {ms(s.expires_ms)}")
    for h in s.hops:
        print(f"    hop {h.party}: {enum_word(h, 'state')} after {h.attempts} attempt(s) {h.last_error}")
    for i, r in enumerate(s.receipts):
        mark = "  <- provision boundary (責任分界点)" if r.provision_boundary else ""
        print(
            f"    receipt {i}: {enum_word(r, 'disposition')} by {r.issuer} ({r.issuer_name}) "
            f"as {enum_word(r, 'role')} at {ms(r.issued_ms)}, {len(r.signed)} signed bytes{mark}"
        )
    for p in s.provisions:
        where = f" at {p.boundary} (receipt {p.receipt})" if p.HasField("receipt") else ""
        print(f"    provision to {p.recipient}: {enum_word(p, 'provision')}{where}")


def wait_state(pb, stub, message_id: bytes, wanted: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        s = stub.Status(pb.StatusRequest(message_id=message_id), timeout=10)
        state = enum_word(s, "state")
        if state == wanted:
            return s
        if state == "FAILED":
            print_status(pb, s)
            raise Failed(f"the message failed while waiting for {wanted}")
        if time.monotonic() > deadline:
            print_status(pb, s)
            raise Failed(f"still {state} after {timeout:.0f} s, waiting for {wanted}")
        time.sleep(0.2)


def run(a) -> None:
    sender = Settings(Path(a.sender), a.sender_server)
    recipient = Settings(Path(a.recipient), a.recipient_server)
    with tempfile.TemporaryDirectory(prefix="exchange-pb-") as gen:
        pb, rpc = generate(Path(gen))
        print(f"generated Python code from {PROTO_ROOT}/exchange/v1/*.proto")

        with sender.channel() as ch:
            print(f"1. the sender's daemon at {sender.server}")
            health(ch, sender.server)
            version, services = reflection_services(ch)
            print(f"  reflection ({version}) lists: {', '.join(services)}")
            if "exchange.v1.Client" not in services:
                raise Failed("reflection does not list exchange.v1.Client")
        if a.sender_socket:
            with sender.channel(f"unix:{a.sender_socket}") as ch:
                print(f"  the same daemon on its Unix socket {a.sender_socket}")
                health(ch, "socket")
                c = rpc.ClientStub(ch)
                c.ListInbox(pb.ListInboxRequest(), timeout=10)
                print("  ListInbox over the socket: answered")

        payload = os.urandom(a.size)
        digest = hashlib.sha256(payload).hexdigest()
        with sender.channel() as ch:
            c = rpc.ClientStub(ch)
            print(f"2. Send {len(payload)} bytes (sha256 {digest[:16]}...) to {a.to} in {PIECE} byte pieces")

            def pieces():
                yield pb.SendRequest(
                    start=pb.SendStart(
                        recipients=[a.to],
                        content_type="application/octet-stream",
                        purpose=a.purpose,
                        title="Python example (synthetic data)",
                        file_name="example.bin",
                        size_hint=len(payload),
                        idempotency_key=str(uuid.uuid4()),
                    )
                )
                for i in range(0, len(payload), PIECE):
                    yield pb.SendRequest(chunk=payload[i : i + PIECE])

            sent = c.Send(pieces(), timeout=120)
            mid = sent.message_id
            print(f"  message {msg_id(mid)}, {sent.ciphertext_length} ciphertext bytes")

            print("3. Status until DELIVERED")
            s = wait_state(pb, c, mid, "DELIVERED", a.timeout)
            print_status(pb, s)
            if not any(enum_word(r, "disposition") == "DELIVERED" for r in s.receipts):
                raise Failed("DELIVERED without a DELIVERED receipt")

        with recipient.channel() as ch:
            c = rpc.ClientStub(ch)
            print(f"4. the recipient's daemon at {recipient.server}: inbox")
            items = c.ListInbox(pb.ListInboxRequest(), timeout=10).items
            for it in items:
                print(
                    f"    {msg_id(it.message_id)} from {it.sender}, {it.content_type}, "
                    f"{it.purpose}, {it.payload_length} bytes, received {ms(it.received_ms)}"
                )
            if not any(it.message_id == mid for it in items):
                raise Failed("the message is not in the recipient's inbox")
            header, got = None, bytearray()
            for part in c.Fetch(pb.FetchRequest(message_id=mid), timeout=120):
                if part.HasField("header"):
                    header = part.header
                else:
                    got += part.chunk
            if header is None:
                raise Failed("Fetch sent no header")
            print(
                f"  Fetch: {len(got)} bytes from {header.sender} ({header.sender_name}), "
                f"title {header.title!r}, file {header.file_name!r}"
            )
            if bytes(got) != payload:
                raise Failed(f"fetched bytes differ (sha256 {hashlib.sha256(got).hexdigest()})")
            print("  the fetched bytes are the bytes sent")
            ack = c.Ack(pb.AckRequest(message_id=mid), timeout=30)
            print(f"  Ack: PROCESSED receipt, {len(ack.receipt)} signed bytes")
            if not ack.receipt:
                raise Failed("Ack returned no receipt")

        with sender.channel() as ch:
            c = rpc.ClientStub(ch)
            print("5. Status at the sender until PROCESSED")
            s = wait_state(pb, c, mid, "PROCESSED", a.timeout)
            print_status(pb, s)
    print("OK: health, reflection, send, delivered, inbox, fetch, ack, processed")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sender", required=True, help="the sending application's client.toml")
    p.add_argument("--recipient", required=True, help="the receiving application's client.toml")
    p.add_argument("--to", required=True, help="the recipient facility's party URI")
    p.add_argument("--sender-server", help="override the sender's HOST:PORT")
    p.add_argument("--recipient-server", help="override the recipient's HOST:PORT")
    p.add_argument("--sender-socket", help="also check the sender daemon's Unix socket (PATH)")
    p.add_argument("--purpose", default="treatment")
    p.add_argument("--size", type=int, default=5 << 20, help="bytes to send (default 5 MiB)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each state")
    a = p.parse_args()
    try:
        run(a)
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"FAILED: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
