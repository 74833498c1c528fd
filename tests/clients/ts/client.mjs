// A real MCP client (the TypeScript SDK, in its default configuration) against a running Custodian
// gateway.
//
// Usage: node client.mjs URL [APPROVE_COMMAND...]
// The agent token is read from CUSTODIAN_TOKEN, as Codex would.
//
// Runs initialize -> tools/list -> tools/call list_environments. With an APPROVE_COMMAND it then
// asks for a grant on the first environment, runs the command with the user code appended (the
// human approving), waits for the grant with grant_status, runs one command with it, revokes the
// grant and runs once more (which must be refused). It ends the session with DELETE and prints one
// JSON document with what the client saw. The SDK checks every structured result against the
// tool's output schema. Exits non-zero if any step fails.

import { execFileSync } from "node:child_process";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, ...approve] = process.argv.slice(2);
const token = process.env.CUSTODIAN_TOKEN;
if (!url || !token) {
  console.error("usage: CUSTODIAN_TOKEN=... node client.mjs URL [APPROVE_COMMAND...]");
  process.exit(2);
}

const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { Authorization: `Bearer ${token}` } },
});
const client = new Client({ name: "custodian-ts-test", version: "1.0.0" });
await client.connect(transport);

const seen = {
  protocol: transport.protocolVersion ?? null,
  session: Boolean(transport.sessionId),
  tools: [],
  listing: null,
  grant: null,
  status: null,
  run: null,
  revoked: null,
  after_revoke: null,
};
const tools = await client.listTools();
seen.tools = tools.tools.map((t) => ({
  name: t.name,
  read_only: Boolean(t.annotations?.readOnlyHint),
  has_output_schema: Boolean(t.outputSchema),
}));
const listing = await client.callTool({ name: "list_environments", arguments: {} });
seen.listing = { is_error: Boolean(listing.isError), structured: listing.structuredContent };

if (approve.length > 0) {
  const env = listing.structuredContent.environments[0].name;
  const requested = await client.callTool({
    name: "request_grant",
    arguments: { environment: env, purpose: "check the demo API" },
  });
  if (requested.isError) throw new Error(`request_grant: ${JSON.stringify(requested.content)}`);
  seen.grant = requested.structuredContent;
  execFileSync(approve[0], [...approve.slice(1), seen.grant.user_code], { stdio: "ignore" });
  const waited = await client.callTool({
    name: "grant_status",
    arguments: { grant_id: seen.grant.grant_id, wait_seconds: 30 },
  });
  if (waited.isError) throw new Error(`grant_status: ${JSON.stringify(waited.content)}`);
  seen.status = waited.structuredContent;
  const ran = await client.callTool({
    name: "run",
    arguments: { grant_id: seen.grant.grant_id, command: 'echo "key=$DEMO_API_KEY"' },
  });
  if (ran.isError) throw new Error(`run: ${JSON.stringify(ran.content)}`);
  seen.run = ran.structuredContent;
  const revoked = await client.callTool({
    name: "revoke_grant",
    arguments: { grant_id: seen.grant.grant_id },
  });
  seen.revoked = revoked.structuredContent;
  const after = await client.callTool({
    name: "run",
    arguments: { grant_id: seen.grant.grant_id, command: 'echo "key=$DEMO_API_KEY"' },
  });
  seen.after_revoke = {
    is_error: Boolean(after.isError),
    text: (after.content ?? []).filter((c) => c.type === "text").map((c) => c.text),
  };
}

await transport.terminateSession();
await client.close();
console.log(JSON.stringify(seen));
