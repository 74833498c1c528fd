"""A real MCP client (the Python SDK) against a running Custodian gateway.

Usage: python_client.py URL [APPROVE_COMMAND...]
The agent token is read from CUSTODIAN_TOKEN, as Codex would.

Runs initialize -> tools/list -> tools/call list_environments and prints one JSON document with
what the client saw. With an APPROVE_COMMAND it then asks for a grant on the first environment,
runs the command with the user code appended (the human approving), and waits for the grant with
grant_status, then runs one command with it. Exits non-zero if any step fails.
"""

import asyncio
import json
import os
import subprocess
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str, approve: list[str]) -> None:
    token = os.environ["CUSTODIAN_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            result = await client.call_tool("list_environments", {})
            grant = status = run = None
            if approve:
                env = result.structured_content["environments"][0]["name"]
                requested = await client.call_tool(
                    "request_grant", {"environment": env, "purpose": "check the demo API"}
                )
                assert not requested.is_error, requested.content
                grant = requested.structured_content
                subprocess.run([*approve, grant["user_code"]], check=True, capture_output=True)
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
            print(
                json.dumps(
                    {
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
                    }
                )
            )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
