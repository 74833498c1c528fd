"""A real MCP client (the Python SDK) against a running Custodian gateway.

Usage: python_client.py [--protocol VERSION] [--grant GRANT_ID --command CMD] URL [APPROVE_COMMAND...]
The agent token is read from CUSTODIAN_TOKEN, as Codex would.

Runs initialize -> tools/list -> tools/call list_environments and prints one JSON document with
what the client saw. With an APPROVE_COMMAND it then asks for a grant on the first environment,
runs the command with the user code appended (the human approving), and waits for the grant with
grant_status, then runs one command with it. With --grant it runs CMD under that (already active)
grant with the SDK's default limits. With --protocol it speaks that handshake-era protocol version
(the SDK otherwise picks its newest). Warnings the SDK logs (e.g. a failed session termination) are
reported under "warnings". Exits non-zero if any step fails.
"""

import argparse
import asyncio
import json
import logging
import os
import subprocess

import httpx2
import mcp.client.session
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


def tool_result(result) -> dict:
    return {
        "is_error": result.is_error,
        "structured": result.structured_content,
        "text": [c.text for c in result.content if getattr(c, "type", None) == "text"],
    }


async def main(args: argparse.Namespace) -> None:
    token = os.environ["CUSTODIAN_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    warnings = Collect()
    logging.getLogger("mcp").addHandler(warnings)
    mode = "auto"
    if args.protocol:
        # The SDK offers its newest handshake version; an older client offers an older one.
        mcp.client.session.LATEST_HANDSHAKE_VERSION = args.protocol
        mode = "legacy"
    async with httpx2.AsyncClient(headers=headers) as http:
        async with Client(streamable_http_client(args.url, http_client=http), mode=mode) as client:
            protocol = client.protocol_version
            tools = await client.list_tools()
            result = await client.call_tool("list_environments", {})
            grant = status = run = None
            if args.approve:
                env = result.structured_content["environments"][0]["name"]
                requested = await client.call_tool(
                    "request_grant", {"environment": env, "purpose": "check the demo API"}
                )
                assert not requested.is_error, requested.content
                grant = requested.structured_content
                subprocess.run([*args.approve, grant["user_code"]], check=True, capture_output=True)
                waited = await client.call_tool(
                    "grant_status", {"grant_id": grant["grant_id"], "wait_seconds": 30}
                )
                assert not waited.is_error, waited.content
                status = waited.structured_content
                ran = await client.call_tool(
                    "run", {"grant_id": grant["grant_id"], "command": 'echo "key=$DEMO_API_KEY"'}
                )
                assert not ran.is_error, ran.content
                run = ran.structured_content
            elif args.grant:
                ran = await client.call_tool(
                    "run", {"grant_id": args.grant, "command": args.command}
                )
                run = tool_result(ran)
    print(
        json.dumps(
            {
                "protocol": protocol,
                "tools": [
                    {
                        "name": t.name,
                        "read_only": bool(t.annotations and t.annotations.read_only_hint),
                        "has_output_schema": t.output_schema is not None,
                    }
                    for t in tools.tools
                ],
                "is_error": result.is_error,
                "structured": result.structured_content,
                "grant": grant,
                "status": status,
                "run": run,
                "warnings": warnings.records,
            }
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol")
    parser.add_argument("--grant")
    parser.add_argument("--command", default="true")
    parser.add_argument("url")
    parser.add_argument("approve", nargs=argparse.REMAINDER)
    asyncio.run(main(parser.parse_args()))
