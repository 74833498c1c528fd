//! Bad input gets a clear, specific error and changes nothing (no row, no session).

use crate::harness::{Backend, RawMcp, TestApp, snapshot};
use crate::on_both_backends;

on_both_backends!(
    malformed_messages_get_specific_errors_and_change_nothing,
    http_level_violations_get_specific_statuses_and_change_nothing,
);

struct Case {
    what: &'static str,
    body: String,
    status: u16,
    code: i64,
    says: &'static str,
}

fn case(what: &'static str, body: &str, status: u16, code: i64, says: &'static str) -> Case {
    Case {
        what,
        body: body.to_owned(),
        status,
        code,
        says,
    }
}

async fn malformed_messages_get_specific_errors_and_change_nothing(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &["DB_PASSWORD"]).await;
    let token = t.token(&acme, "codex").await;
    let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
    mcp.initialize().await;
    let before = snapshot(t.db()).await;

    let cases = [
        case(
            "not JSON",
            "{\"jsonrpc\": \"2.0\", ",
            400,
            -32700,
            "not valid JSON",
        ),
        case(
            "batch",
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#,
            400,
            -32600,
            "batches are not supported",
        ),
        case(
            "scalar",
            r#""tools/list""#,
            400,
            -32600,
            "one JSON-RPC message object",
        ),
        case(
            "no jsonrpc",
            r#"{"id":1,"method":"tools/list"}"#,
            400,
            -32600,
            "`jsonrpc` must be",
        ),
        case(
            "no method",
            r#"{"jsonrpc":"2.0","id":1}"#,
            400,
            -32600,
            "needs a `method`",
        ),
        case(
            "object id",
            r#"{"jsonrpc":"2.0","id":{},"method":"tools/list"}"#,
            400,
            -32600,
            "`id` must be",
        ),
        case(
            "array params",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":[]}"#,
            400,
            -32600,
            "`params` must be an object",
        ),
        case(
            "unknown method",
            r#"{"jsonrpc":"2.0","id":1,"method":"grants/steal"}"#,
            200,
            -32601,
            "grants/steal",
        ),
        case(
            "unknown tool",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_secret","arguments":{}}}"#,
            200,
            -32602,
            "unknown tool `get_secret`; available tools: grant_status, list_environments, request_grant, revoke_grant, run",
        ),
        case(
            "arguments not an object",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_environments","arguments":"staging"}}"#,
            200,
            -32602,
            "`params.arguments` must be an object",
        ),
        case(
            "tool name not a string",
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":["list_environments"]}}"#,
            200,
            -32602,
            "`params.name` must be a string",
        ),
    ];
    for c in cases {
        let (status, body) = mcp.send(&c.body).await;
        let body = body.unwrap_or_else(|| panic!("{}: no JSON-RPC answer", c.what));
        assert_eq!(status, c.status, "{}: {body}", c.what);
        assert_eq!(body["error"]["code"], c.code, "{}: {body}", c.what);
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(c.says), "{}: {message}", c.what);
    }

    // Over the body limit: 413, whatever the content.
    let huge = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{{"pad":"{}"}}}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    let response = mcp.post().body(huge).send().await.unwrap();
    assert_eq!(response.status(), 413);
    // The rest of the body was never read: the connection must not be reused for the next request.
    assert_eq!(response.headers()["connection"], "close");
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("exceeds 1048576 bytes")
    );

    // The session still works, and nothing in the store changed.
    let (status, ok) = mcp.send(r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"list_environments"}}"#).await;
    assert_eq!(status, 200);
    assert_eq!(
        ok.unwrap()["result"]["structuredContent"]["environments"][0]["name"],
        "staging"
    );
    assert_eq!(snapshot(t.db()).await, before);
    t.stop().await;
}

async fn http_level_violations_get_specific_statuses_and_change_nothing(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    let token = t.token(&acme, "codex").await;
    let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
    mcp.initialize().await;
    let before = snapshot(t.db()).await;
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let session = mcp.session.clone().unwrap();

    let expect =
        |what: &str, status: u16, error: &str, response: (u16, Option<serde_json::Value>)| {
            let body = response.1.unwrap_or_else(|| panic!("{what}: no JSON body"));
            assert_eq!(response.0, status, "{what}: {body}");
            assert_eq!(body["error"], error, "{what}: {body}");
            assert!(
                body["error_description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{what}"
            );
        };
    let send = |request: reqwest::RequestBuilder| async move {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<serde_json::Value>().await.ok())
    };

    // An absent protocol version inside a session means the negotiated one; unknown ones are
    // refused.
    let no_version = mcp
        .http
        .post(&mcp.url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &session)
        .body(list);
    assert_eq!(send(no_version).await.0, 200, "absent MCP-Protocol-Version");
    for version in ["1999-01-01", "2024-11-05"] {
        mcp.protocol = version.to_owned();
        expect(
            "wrong MCP-Protocol-Version",
            400,
            "unsupported_protocol_version",
            send(mcp.post().body(list)).await,
        );
    }
    mcp.protocol = crate::harness::PROTOCOL.to_owned();
    let twice = mcp
        .post()
        .header("mcp-protocol-version", "1999-01-01")
        .body(list);
    expect(
        "two MCP-Protocol-Version headers",
        400,
        "unsupported_protocol_version",
        send(twice).await,
    );
    // A foreign Origin, and a Host that is not ours (DNS rebinding).
    let foreign = mcp
        .post()
        .header("origin", "https://evil.example")
        .body(list);
    expect(
        "foreign Origin",
        403,
        "origin_not_allowed",
        send(foreign).await,
    );
    let rebound = mcp.post().header("host", "evil.example").body(list);
    expect("unknown Host", 403, "host_not_allowed", send(rebound).await);
    // Our own origin passes.
    let own = mcp.post().header("origin", &t.base_url).body(list);
    assert_eq!(send(own).await.0, 200);
    // An unknown tenant answers like a known one the token is not valid for (no enumeration);
    // a path that is not a tenant id at all is not found.
    let other = RawMcp::new(t.mcp_url("nobody"), Some(&token));
    expect(
        "unknown tenant",
        401,
        "unauthorized",
        other.send(list).await,
    );
    let other = RawMcp::new(t.mcp_url("Not_A_Slug"), Some(&token));
    expect("not a tenant id", 404, "not_found", other.send(list).await);
    // A request that is not initialize and has no session.
    let mut sessionless = RawMcp::new(t.mcp_url("acme"), Some(&token));
    sessionless.session = None;
    let (status, _) = sessionless.send(list).await;
    assert_eq!(status, 400, "non-initialize request without a session");

    assert_eq!(snapshot(t.db()).await, before);
    t.stop().await;
}
