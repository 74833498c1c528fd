"""A real MCP client (the Python SDK) against a running Custodian gateway.

Usage: python_client.py URL  (the agent token is read from CUSTODIAN_TOKEN, as Codex would)
Runs initialize -> tools/list -> tools/call list_environments and prints one JSON document with
what the client saw. Exits non-zero if any step fails.
"""

import asyncio
import json
import os
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main(url: str) -> None:
    token = os.environ["CUSTODIAN_TOKEN"]
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx2.AsyncClient(headers=headers) as http:
        async with Client(streamable_http_client(url, http_client=http)) as client:
            tools = await client.list_tools()
            result = await client.call_tool("list_environments", {})
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
                    }
                )
            )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
