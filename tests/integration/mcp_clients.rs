//! Real MCP clients against the gateway: rmcp and the official Python SDK at every protocol
//! version, the tool listing (snapshot), structured results, session ends, and the loopback host
//! spellings.

use rmcp::ServiceExt;
use rmcp::model::{
    CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation, ProtocolVersion,
};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use serde_json::json;

use crate::harness::{Backend, RawMcp, TestApp, parse_mcp_body};
use crate::on_both_backends;
use crate::processes::{python, python_client_args};

on_both_backends!(rmcp_client_lists_tools_and_environments);

pub type Client = rmcp::service::RunningService<rmcp::RoleClient, ClientConfig>;

pub async fn connect(
    url: &str,
    token: &str,
) -> rmcp::service::RunningService<rmcp::RoleClient, ClientConfig> {
    let transport = StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token.to_owned()),
    );
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("test", "1"),
    )
    .serve(transport)
    .await
    .expect("connect")
}

async fn rmcp_client_lists_tools_and_environments(backend: Backend) {
    let Some(t) = TestApp::builder(backend).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &["DB_PASSWORD", "API_KEY"])
        .await;
    t.environment(&acme, "analytics", &[]).await;
    let token = t.token(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;

    let tools = client.list_tools(Default::default()).await.unwrap();
    insta::assert_json_snapshot!("tool_listing", tools.tools);

    let result = client
        .call_tool(CallToolRequestParams::new("list_environments"))
        .await
        .unwrap();
    assert_eq!(result.is_error, Some(false));
    insta::assert_json_snapshot!("list_environments_result", result.structured_content);
    client.cancel().await.unwrap();
    t.stop().await;
}

/// The handshake-era protocol versions every client must be able to use.
const VERSIONS: [&str; 3] = ["2025-03-26", "2025-06-18", "2025-11-25"];

/// An rmcp client offering `version`.
async fn connect_at(url: &str, token: &str, version: &str) -> Client {
    let transport = StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token.to_owned()),
    );
    let version: ProtocolVersion = serde_json::from_value(json!(version)).unwrap();
    ClientConfig::new(
        ClientCapabilities::default(),
        Implementation::new("test", "1"),
    )
    .with_protocol_version(version)
    .serve(transport)
    .await
    .expect("connect")
}

/// Tenant `acme` with one environment and a token.
async fn seeded(t: &TestApp) -> String {
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &["API_KEY"]).await;
    t.token(&acme, "codex").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_clients_work_at_every_protocol_version() {
    let Some(t) = TestApp::builder(Backend::Sqlite).start().await else {
        return;
    };
    let token = seeded(&t).await;
    for version in VERSIONS {
        let client = connect_at(&t.mcp_url("acme"), &token, version).await;
        let negotiated = &client.peer_info().unwrap().protocol_version;
        assert_eq!(negotiated.as_str(), version);
        let tools = client.list_tools(Default::default()).await.unwrap();
        assert!(tools.tools.iter().any(|t| t.name == "run"), "{version}");
        let result = client
            .call_tool(CallToolRequestParams::new("list_environments"))
            .await
            .unwrap();
        assert_eq!(result.is_error, Some(false), "{version}");
        let structured = result.structured_content.unwrap();
        assert_eq!(
            structured["environments"][0]["name"], "staging",
            "{version}"
        );
        client.cancel().await.unwrap();
    }
    // Each client ended its session with DELETE: nothing is left open.
    assert_eq!(t.app.sessions.len(), 0);
    assert_eq!(t.app.sessions.transport_len().await, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_works_at_every_protocol_version_and_ends_sessions_cleanly() {
    let Some(python) = python() else {
        return;
    };
    let Some(t) = TestApp::builder(Backend::Sqlite).start().await else {
        return;
    };
    let token = seeded(&t).await;
    let url = t.mcp_url("acme");
    for version in VERSIONS {
        let seen = python_client_args(&python, &token, &["--protocol", version, &url]);
        assert_eq!(seen["protocol"], version, "{seen}");
        assert_eq!(seen["is_error"], false, "{version}: {seen}");
        assert_eq!(
            seen["structured"]["environments"][0]["name"], "staging",
            "{version}: {seen}"
        );
        assert!(
            seen["tools"].as_array().unwrap().len() >= 5,
            "{version}: {seen}"
        );
        // No "Session termination failed: 202" (or any other warning) from the SDK.
        assert_eq!(seen["warnings"], json!([]), "{version}: {seen}");
    }
    // And with the SDK's own choice of version.
    let seen = python_client_args(&python, &token, &[&url]);
    assert_eq!(seen["warnings"], json!([]), "{seen}");
    assert_eq!(t.app.sessions.len(), 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_protocol_header_use_the_negotiated_version() {
    let Some(t) = TestApp::builder(Backend::Sqlite).start().await else {
        return;
    };
    let token = seeded(&t).await;
    for version in VERSIONS {
        let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
        mcp.protocol = version.to_owned();
        let init = format!(
            r#"{{"jsonrpc":"2.0","id":0,"method":"initialize","params":{{"protocolVersion":"{version}","capabilities":{{}},"clientInfo":{{"name":"old","version":"1"}}}}}}"#
        );
        let response = mcp.post().body(init).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let session = response.headers()["mcp-session-id"]
            .to_str()
            .unwrap()
            .to_owned();
        let answer = parse_mcp_body(&response.text().await.unwrap()).unwrap();
        assert_eq!(answer["result"]["protocolVersion"], version);
        // Every later request leaves the header out, as 2025-03-26 clients do.
        let bare = |body: &'static str| {
            mcp.http
                .post(&mcp.url)
                .header("authorization", format!("Bearer {token}"))
                .header("content-type", "application/json")
                .header("accept", "application/json, text/event-stream")
                .header("mcp-session-id", &session)
                .body(body)
        };
        let ack = bare(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(ack.status(), 202, "{version}");
        let call = bare(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_environments","arguments":{}}}"#,
        )
        .send()
        .await
        .unwrap();
        assert_eq!(call.status(), 200, "{version}");
        let answer = parse_mcp_body(&call.text().await.unwrap()).unwrap();
        assert_eq!(
            answer["result"]["structuredContent"]["environments"][0]["name"], "staging",
            "{version}: {answer}"
        );
    }
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_delete_answers_204_and_ends_the_session() {
    let Some(t) = TestApp::builder(Backend::Sqlite).start().await else {
        return;
    };
    let token = seeded(&t).await;
    let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
    mcp.initialize().await;
    assert_eq!(t.app.sessions.len(), 1);
    let session = mcp.session.clone().unwrap();
    let deleted = mcp
        .http
        .delete(&mcp.url)
        .header("authorization", format!("Bearer {token}"))
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", &mcp.protocol)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(deleted.text().await.unwrap(), "");
    let (status, _) = mcp
        .send(r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#)
        .await;
    assert_eq!(status, 404, "the session is gone");
    assert_eq!(t.app.sessions.len(), 0);
    assert_eq!(t.app.sessions.transport_len().await, 0);
    t.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_spellings_are_accepted_and_foreign_hosts_refused() {
    let Some(t) = TestApp::builder(Backend::Sqlite).start().await else {
        return;
    };
    let token = seeded(&t).await;
    let port = t.app.config.server.public_url.port().unwrap();
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    // The public URL is http://127.0.0.1:PORT; every loopback spelling of it works end to end
    // (the gateway's own check and rmcp's).
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("LocalHost:{port}"),
    ] {
        let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
        mcp.initialize().await;
        let request = mcp
            .post()
            .header("host", &host)
            .header("origin", format!("http://{host}"))
            .body(list);
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "{host}");
        let answer = parse_mcp_body(&response.text().await.unwrap()).unwrap();
        assert!(answer["result"]["tools"].is_array(), "{host}: {answer}");
    }
    // A client configured with `localhost` connects.
    let client = connect(&format!("http://localhost:{port}/t/acme/mcp"), &token).await;
    client.list_tools(Default::default()).await.unwrap();
    client.cancel().await.unwrap();
    // Other hosts, other ports and other schemes stay refused.
    let other = port.wrapping_add(1);
    let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
    mcp.initialize().await;
    for (host, origin) in [
        ("evil.example".to_owned(), None),
        (format!("evil.example:{port}"), None),
        (format!("localhost:{other}"), None),
        (format!("[::1]:{other}"), None),
        (format!("127.0.0.2:{port}"), None),
        (
            format!("localhost:{port}"),
            Some("https://evil.example".to_owned()),
        ),
        (
            format!("localhost:{port}"),
            Some(format!("http://localhost:{other}")),
        ),
        (
            format!("localhost:{port}"),
            Some(format!("https://localhost:{port}")),
        ),
        (
            format!("localhost:{port}"),
            Some(format!("http://[::2]:{port}")),
        ),
    ] {
        let mut request = mcp.post().header("host", &host).body(list);
        if let Some(origin) = &origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 403, "{host} {origin:?}");
    }
    t.stop().await;
}

/// The gateway answers a plain `list_environments` call itself, as JSON (see `http::direct`); the
/// same call with anything unusual in it goes through rmcp, as SSE. Both answers must be the same
/// JSON-RPC message, and the direct path must not skip any check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_answered_without_rmcp_is_the_answer_rmcp_gives() {
    let Some(t) = TestApp::builder(Backend::Sqlite).start().await else {
        return;
    };
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &["DB_PASSWORD", "API_KEY"])
        .await;
    t.environment(&acme, "analytics", &[]).await;
    let (token_id, token) = t.token_with_id(&acme, "codex").await;
    let mut mcp = RawMcp::new(t.mcp_url("acme"), Some(&token));
    mcp.initialize().await;

    let call = |id: &str, params: &str| {
        format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"tools/call","params":{params}}}"#)
    };
    let send = |body: String| {
        let request = mcp.post().body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let kind = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            let text = response.text().await.unwrap();
            (
                status,
                kind,
                parse_mcp_body(&text).expect("a JSON-RPC answer"),
            )
        }
    };
    let plain = r#"{"name":"list_environments","arguments":{}}"#;
    for id in ["7", r#""call-7""#] {
        let (status, kind, direct) = send(call(id, plain)).await;
        assert_eq!(
            (status, kind.as_str()),
            (200, "application/json"),
            "{direct}"
        );
        // `_meta` sends the same call through rmcp.
        let with_meta =
            r#"{"name":"list_environments","arguments":{},"_meta":{"progressToken":"p"}}"#;
        let (status, kind, through_rmcp) = send(call(id, with_meta)).await;
        assert_eq!(
            (status, kind.as_str()),
            (200, "text/event-stream"),
            "{through_rmcp}"
        );
        assert_eq!(direct, through_rmcp);
        assert_eq!(
            direct["id"],
            serde_json::from_str::<serde_json::Value>(id).unwrap()
        );
        let names: Vec<_> = direct["result"]["structuredContent"]["environments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{direct}");
    }
    // Without `arguments` too.
    let (_, kind, _) = send(call("8", r#"{"name":"list_environments"}"#)).await;
    assert_eq!(kind, "application/json");

    // The checks before it still hold: a session id this token did not open, another token, no
    // token, and an Accept that rmcp refuses.
    let other = t.token(&acme, "other").await;
    let mut foreign = RawMcp::new(t.mcp_url("acme"), Some(&other));
    foreign.session = mcp.session.clone();
    let (status, answer) = foreign.send(&call("9", plain)).await;
    assert_eq!(status, 404);
    assert!(answer.is_none_or(|a| a.get("result").is_none()));
    let mut anonymous = RawMcp::new(t.mcp_url("acme"), None);
    anonymous.session = mcp.session.clone();
    let (status, answer) = anonymous.send(&call("9", plain)).await;
    assert_eq!(status, 401);
    assert!(answer.is_none_or(|a| a.get("result").is_none()));
    let refused = mcp
        .post_accepting("application/json")
        .body(call("10", plain))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 406, "rmcp's answer, unchanged");
    assert!(!refused.text().await.unwrap().contains("staging"));
    // A revoked token is refused on this path too.
    let now = custodian::clock::Clock::now(&*t.clock);
    custodian::agent_tokens::revoke(t.db(), &acme, &token_id, now)
        .await
        .unwrap();
    let (status, answer) = mcp.send(&call("11", plain)).await;
    assert_eq!(status, 401);
    assert!(answer.is_none_or(|a| a.get("result").is_none()));
    t.stop().await;
}
