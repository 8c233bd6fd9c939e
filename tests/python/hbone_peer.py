"""An HBONE peer that is not Latch's code, for tests/tests/interop.rs: Python's `ssl` (TLS 1.3,
mutual authentication, ALPN h2) and PyPI's `h2` (the HTTP/2 state machine), written from RFC 9113
and Istio's HBONE description.

    hbone_peer.py server --listen IP:PORT --cert CHAIN --key KEY --ca BUNDLE
                         [--status PORT=CODE ...] [--max-streams N]
    hbone_peer.py client --connect IP:PORT --cert CHAIN --key KEY --ca BUNDLE --server-id SPIFFE

The server answers each CONNECT: the code `--status` gives the target's port, else 200 and the
bytes relayed to the target (connected from this network namespace), or 503 at once if the
target refuses. The client keeps one connection and opens streams as told.

Both print one JSON object per line on stdout for each event (`{"event": ...}`) and read one
JSON command per line on stdin (`{"cmd": ...}`):

- both: `ping` (a PING; `pong` when answered), events `ping-received`, `closed`;
- server: `goaway` (GOAWAY, NO_ERROR, then a PING, on every connection; open streams go on);
  events `listening`, `connection` (TCP peer, client SPIFFE ID), `connect` (method,
  authority, headers, TCP peer), `answered`, `stream-ended`, `goaway-sent`;
- client: `open` (id, authority, headers), `send` (id, data), `end` (id); events `connected`,
  `response` (id, status, headers), `data` (id, data), `ended` (id), `reset` (id, code),
  `goaway` (last stream ID, error code).

python-h2 takes any GOAWAY as the end of the connection (its state machine refuses every frame
after one), where RFC 9113 §6.8 lets the streams the GOAWAY covers go on. So this peer sends
its GOAWAY itself, and the client takes a received GOAWAY out of the bytes it gives python-h2;
both then open no new stream, as the RFC says.
"""

import argparse
import asyncio
import json
import ssl
import struct
import sys

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

GOAWAY = 0x7


def emit(event, **fields):
    fields["event"] = event
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def connection_event(conn, event):
    """Handle the events of the connection itself, the same for both sides (flow control
    windows, PINGs); whether `event` was one."""
    if isinstance(event, h2.events.WindowUpdated):
        conn.window_open.set()
    elif isinstance(event, h2.events.PingReceived):
        emit("ping-received")
    elif isinstance(event, h2.events.PingAckReceived):
        emit("pong")
    else:
        return False
    return True


def split_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def uri_san(cert):
    for kind, value in (cert or {}).get("subjectAltName", ()):
        if kind == "URI":
            return value
    return None


def tls_context(server, args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    ctx.load_verify_locations(args.ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    # SPIFFE IDs are URI SANs: there is no host name to check; the ID is checked here.
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def commands():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            return
        if line.strip():
            yield json.loads(line)


class Connection:
    """One HTTP/2 connection over TLS: python-h2's state, the socket, flow control."""

    def __init__(self, reader, writer, client_side, max_streams=None):
        config = h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        self.h2 = h2.connection.H2Connection(config=config)
        self.reader, self.writer = reader, writer
        self.window_open = asyncio.Event()
        self.going_away = False
        self.h2.initiate_connection()
        if max_streams is not None:
            self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams})
        self.flush()

    def flush(self):
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def send_goaway(self):
        """GOAWAY NO_ERROR naming the last stream opened, without closing python-h2's state."""
        last = self.h2.highest_inbound_stream_id
        payload = struct.pack(">II", last & 0x7FFFFFFF, 0)
        header = struct.pack(">I", len(payload))[1:] + bytes([GOAWAY, 0]) + struct.pack(">I", 0)
        self.flush()
        self.writer.write(header + payload)
        self.going_away = True

    async def send(self, stream_id, data):
        """Send `data` on the stream as flow control allows."""
        while data:
            window = self.h2.local_flow_control_window(stream_id)
            if window <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            chunk = data[: min(window, self.h2.max_outbound_frame_size)]
            data = data[len(chunk):]
            self.h2.send_data(stream_id, chunk)
            self.flush()
            await self.writer.drain()

    def end(self, stream_id):
        self.h2.end_stream(stream_id)
        self.flush()


class ClientFrames:
    """Splits the server's bytes into frames, taking GOAWAY out (see the module's docstring)."""

    def __init__(self):
        self.buf = b""

    def feed(self, data):
        self.buf += data
        passed, goaways = b"", []
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[0:3], "big")
            if len(self.buf) < 9 + length:
                break
            frame, self.buf = self.buf[: 9 + length], self.buf[9 + length:]
            if frame[3] == GOAWAY:
                last, code = struct.unpack(">II", frame[9:17])
                goaways.append((last & 0x7FFFFFFF, code))
            else:
                passed += frame
        return passed, goaways


async def serve(args):
    statuses = {}
    for item in args.status or []:
        port, code = item.split("=")
        statuses[int(port)] = int(code)
    ctx = tls_context(True, args)
    connections = []

    async def relay_from_target(conn, stream_id, target_reader):
        try:
            while True:
                data = await target_reader.read(65536)
                if not data:
                    break
                await conn.send(stream_id, data)
            conn.end(stream_id)
            await conn.writer.drain()
        except (h2.exceptions.StreamClosedError, ConnectionError):
            pass

    async def handle(reader, writer):
        peer = "%s:%d" % writer.get_extra_info("peername")[:2]
        sslobj = writer.get_extra_info("ssl_object")
        emit("connection", peer=peer, alpn=sslobj.selected_alpn_protocol(),
             client_id=uri_san(sslobj.getpeercert()))
        conn = Connection(reader, writer, client_side=False, max_streams=args.max_streams)
        connections.append(conn)
        targets = {}
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                events = conn.h2.receive_data(data)
                for event in events:
                    if isinstance(event, h2.events.RequestReceived):
                        headers = dict(event.headers)
                        emit("connect", stream=event.stream_id, peer=peer,
                             method=headers.get(":method"), authority=headers.get(":authority"),
                             headers={k: v for k, v in headers.items() if not k.startswith(":")})
                        await answer(conn, event.stream_id, headers, targets)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.h2.acknowledge_received_data(event.flow_controlled_length,
                                                          event.stream_id)
                        target = targets.get(event.stream_id)
                        if target is not None:
                            target.write(event.data)
                    elif isinstance(event, h2.events.StreamEnded):
                        emit("stream-ended", stream=event.stream_id)
                        target = targets.get(event.stream_id)
                        if target is not None and target.can_write_eof():
                            target.write_eof()
                    elif isinstance(event, h2.events.StreamReset):
                        target = targets.pop(event.stream_id, None)
                        if target is not None:
                            target.close()
                    elif connection_event(conn, event):
                        pass
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        emit("goaway-received", error=int(event.error_code))
                conn.flush()
                await writer.drain()
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError) as e:
            emit("error", peer=peer, error=str(e))
        finally:
            connections.remove(conn)
            emit("closed", peer=peer)
            writer.close()

    async def answer(conn, stream_id, headers, targets):
        def respond(code):
            conn.h2.send_headers(stream_id, [(":status", str(code))], end_stream=code != 200)
            conn.flush()
            emit("answered", stream=stream_id, status=code)

        if headers.get(":method") != "CONNECT":
            return respond(405)
        try:
            host, port = split_addr(headers.get(":authority", ""))
        except ValueError:
            return respond(400)
        if port in statuses:
            return respond(statuses[port])
        try:
            target_reader, target_writer = await asyncio.open_connection(host, port)
        except OSError:
            return respond(503)
        targets[stream_id] = target_writer
        respond(200)
        asyncio.ensure_future(relay_from_target(conn, stream_id, target_reader))

    host, port = split_addr(args.listen)
    server = await asyncio.start_server(handle, host, port, ssl=ctx)
    emit("listening", address=args.listen)
    async with server:
        async for command in commands():
            if command["cmd"] == "goaway":
                # A PING right behind it: its answer (`pong`) says the client has read the GOAWAY.
                for conn in connections:
                    conn.send_goaway()
                    conn.h2.ping(b"goawayok")
                    conn.flush()
                    await conn.writer.drain()
                emit("goaway-sent", connections=len(connections))
            elif command["cmd"] == "ping":
                for conn in connections:
                    conn.h2.ping(b"latchpng")
                    conn.flush()
                    await conn.writer.drain()


async def connect(args):
    ctx = tls_context(False, args)
    host, port = split_addr(args.connect)
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=None)
    sslobj = writer.get_extra_info("ssl_object")
    server_id = uri_san(sslobj.getpeercert())
    if server_id != args.server_id:
        emit("refused", reason="server is %s, not %s" % (server_id, args.server_id))
        writer.close()
        return
    emit("connected", alpn=sslobj.selected_alpn_protocol(), server_id=server_id,
         version=sslobj.version())
    conn = Connection(reader, writer, client_side=True)
    await writer.drain()
    frames = ClientFrames()
    ids, names = {}, {}

    async def receive():
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                passed, goaways = frames.feed(data)
                for last, code in goaways:
                    conn.going_away = True
                    emit("goaway", last_stream_id=last, error=code)
                for event in conn.h2.receive_data(passed) if passed else []:
                    name = names.get(getattr(event, "stream_id", None))
                    if isinstance(event, h2.events.ResponseReceived):
                        headers = dict(event.headers)
                        emit("response", id=name, status=int(headers[":status"]),
                             headers={k: v for k, v in headers.items() if not k.startswith(":")})
                    elif isinstance(event, h2.events.DataReceived):
                        conn.h2.acknowledge_received_data(event.flow_controlled_length,
                                                          event.stream_id)
                        if event.data:
                            emit("data", id=name, data=event.data.decode("utf-8", "replace"))
                    elif isinstance(event, h2.events.StreamEnded):
                        emit("ended", id=name)
                    elif isinstance(event, h2.events.StreamReset):
                        emit("reset", id=name, code=int(event.error_code))
                    elif connection_event(conn, event):
                        pass
                conn.flush()
                await writer.drain()
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError) as e:
            emit("error", error=str(e))
        emit("closed")

    receiving = asyncio.ensure_future(receive())
    async for command in commands():
        cmd = command["cmd"]
        try:
            if cmd == "open":
                if conn.going_away:
                    emit("not-opened", id=command["id"], reason="the server sent GOAWAY")
                    continue
                stream_id = conn.h2.get_next_available_stream_id()
                ids[command["id"]], names[stream_id] = stream_id, command["id"]
                headers = [(":method", "CONNECT"), (":authority", command["authority"])]
                headers += list(command.get("headers", {}).items())
                conn.h2.send_headers(stream_id, headers)
                conn.flush()
            elif cmd == "send":
                await conn.send(ids[command["id"]], command["data"].encode())
            elif cmd == "end":
                conn.end(ids[command["id"]])
            elif cmd == "ping":
                conn.h2.ping(b"latchpng")
                conn.flush()
            await writer.drain()
        except (h2.exceptions.ProtocolError, ConnectionError) as e:
            emit("error", error="%s: %s" % (cmd, e))
    receiving.cancel()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("server", "client"):
        p = sub.add_parser(mode)
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--ca", required=True)
        if mode == "server":
            p.add_argument("--listen", required=True)
            p.add_argument("--status", action="append")
            p.add_argument("--max-streams", type=int)
        else:
            p.add_argument("--connect", required=True)
            p.add_argument("--server-id", required=True)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args) if args.mode == "server" else connect(args))
    except (OSError, ssl.SSLError) as e:
        emit("error", error=str(e))
        sys.exit(1)


if __name__ == "__main__":
    main()
