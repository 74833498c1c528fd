//! rmcp's own client against the gateway: the tool listing (snapshot) and structured results.

use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, ClientCapabilities, ClientConfig, Implementation};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

use crate::harness::{Backend, TestApp};
use crate::on_both_backends;

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
