"""One MCP session of the Python SDK, driven step by step by a test that acts between the steps.

Usage: python_session.py [--protocol VERSION] URL
The agent token is read from CUSTODIAN_TOKEN, as Codex would.

After the handshake it prints {"protocol": ...}. Then it reads one JSON command a line from stdin,
{"tool": NAME, "args": {...}, "timeout": SECONDS}, calls the tool in the same session and prints one
JSON line: {"is_error", "structured", "text", "progress"} (progress: how many progress notifications
the call received), or {"exception": "..."} when the call itself failed. At end of input the
session ends (the SDK sends DELETE) and it prints {"closed": true}.
"""

import argparse
import asyncio
import json
import os
import sys

import httpx2
import mcp.client.session
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


def say(document: dict) -> None:
    print(json.dumps(document), flush=True)


async def main(args: argparse.Namespace) -> None:
    headers = {"Authorization": f"Bearer {os.environ['CUSTODIAN_TOKEN']}"}
    mode = "auto"
    if args.protocol:
        mcp.client.session.LATEST_HANDSHAKE_VERSION = args.protocol
        mode = "legacy"
    loop = asyncio.get_running_loop()
    async with httpx2.AsyncClient(headers=headers) as http:
        async with Client(streamable_http_client(args.url, http_client=http), mode=mode) as client:
            say({"protocol": client.protocol_version})
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                command = json.loads(line)
                progress = []

                async def on_progress(done, total, message) -> None:
                    progress.append(done)

                try:
                    result = await client.call_tool(
                        command["tool"],
                        command.get("args", {}),
                        read_timeout_seconds=command.get("timeout", 60),
                        progress_callback=on_progress,
                    )
                except Exception as e:  # the test reads what failed
                    say({"exception": f"{type(e).__name__}: {e}"})
                    continue
                say(
                    {
                        "is_error": result.is_error,
                        "structured": result.structured_content,
                        "text": [c.text for c in result.content if getattr(c, "type", None) == "text"],
                        "progress": len(progress),
                    }
                )
    say({"closed": True})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol")
    parser.add_argument("url")
    asyncio.run(main(parser.parse_args()))
