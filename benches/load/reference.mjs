// The load benchmark's reference: the official TypeScript MCP SDK's streamable-HTTP server
// (stateful sessions) with one tool, `list_environments`, answering the JSON document given as the
// second argument (the same answer Custodian gives, captured by run.sh).
//
// node reference.mjs PORT ANSWER.json
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { createServer } from "node:http";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import { isInitializeRequest } from "@modelcontextprotocol/sdk/types.js";

const [port, answerFile] = process.argv.slice(2);
const answer = JSON.parse(readFileSync(answerFile, "utf8"));
const transports = new Map();

function newServer() {
  const server = new McpServer({ name: "reference", version: "1" });
  server.registerTool(
    "list_environments",
    { description: "List the environments." },
    async () => ({
      content: [{ type: "text", text: JSON.stringify(answer) }],
      structuredContent: answer,
    }),
  );
  return server;
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return chunks.length ? JSON.parse(Buffer.concat(chunks).toString("utf8")) : undefined;
}

createServer(async (req, res) => {
  try {
    const body = req.method === "POST" ? await readJson(req) : undefined;
    const id = req.headers["mcp-session-id"];
    let transport = id ? transports.get(id) : undefined;
    if (!transport && req.method === "POST" && isInitializeRequest(body)) {
      transport = new StreamableHTTPServerTransport({
        sessionIdGenerator: () => randomUUID(),
        onsessioninitialized: (sid) => transports.set(sid, transport),
      });
      transport.onclose = () => transport.sessionId && transports.delete(transport.sessionId);
      await newServer().connect(transport);
    }
    if (!transport) {
      res.writeHead(404).end();
      return;
    }
    await transport.handleRequest(req, res, body);
  } catch (e) {
    res.writeHead(500).end(String(e));
  }
}).listen(Number(port), "127.0.0.1");
