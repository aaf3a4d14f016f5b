#!/usr/bin/env python3
"""The tutorials' chat server, done the legacy way: a plain TCP service speaking
newline-delimited JSON, with no WebSocket code at all. wsgate (framing = "lines") turns each
browser WebSocket into one TCP connection here, each message into one line and each line
back into one message.

Messages, as the seed tutorials' PHP and Node servers had them:
  {"type": "system", "id": ID, "name": NAME}
      registers this connection as ID; answered {"type": "system", "message": "Initial message received"}
  {"type": "user", "id": ID, "to_id": TO, "name": NAME, "message": TEXT, "color": COLOR}
      delivered to TO only, as {"type": "usermsg", "name": NAME, "message": TEXT, "color": COLOR}

Usage: server.py [--host 127.0.0.1] [--port 9000]   (port 0: any free port, printed on start)
"""
import argparse
import asyncio
import json

MAX_LINE = 16 * 1024 * 1024  # as wsgate's default max_message_size

clients = {}  # id -> StreamWriter


async def send(writer, message):
    writer.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
    await writer.drain()


async def serve(reader, writer):
    me = None
    try:
        while True:
            try:
                line = await reader.readline()
            except (asyncio.LimitOverrunError, ValueError):
                break  # a line longer than MAX_LINE: this client is done
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue  # not JSON: ignored, as the tutorials' servers did
            if not isinstance(msg, dict):
                continue
            if msg.get("type") == "system" and "id" in msg:
                me = str(msg["id"])
                clients[me] = writer
                await send(writer, {"type": "system", "message": "Initial message received"})
            elif msg.get("type") == "user":
                to = clients.get(str(msg.get("to_id")))
                if to is not None:
                    await send(to, {"type": "usermsg", "name": msg.get("name"),
                                    "message": msg.get("message"), "color": msg.get("color")})
    except ConnectionError:
        pass
    finally:
        if me is not None and clients.get(me) is writer:
            del clients[me]
        writer.close()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    server = await asyncio.start_server(serve, args.host, args.port, limit=MAX_LINE)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"chat server listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
