//! The load benchmark's baseline: a bare rmcp streamable-HTTP server (stateful sessions, the
//! gateway's rmcp version and socket options) with one tool, `list_environments`, answering the
//! JSON document given as the second argument — the same answer Custodian gives, captured by
//! `run.sh`. No authentication, no database, no checks.
//!
//! `bare_rmcp ADDR ANSWER.json`

use std::sync::Arc;

use axum::serve::ListenerExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::model::{CallToolResult, ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, tool, tool_handler, tool_router};

#[derive(Clone)]
struct Bare {
    answer: Arc<serde_json::Value>,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Bare {
    #[tool(description = "List the environments.")]
    async fn list_environments(&self) -> CallToolResult {
        CallToolResult::structured((*self.answer).clone())
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Bare {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, answer] = args.as_slice() else {
        eprintln!("usage: bare_rmcp ADDR ANSWER.json");
        std::process::exit(2);
    };
    let text = std::fs::read_to_string(answer).expect("read the answer file");
    let answer = Arc::new(serde_json::from_str(&text).expect("the answer is JSON"));
    let service = StreamableHttpService::new(
        move || {
            Ok(Bare {
                answer: Arc::clone(&answer),
                tool_router: Bare::tool_router(),
            })
        },
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default(),
    );
    let router = axum::Router::new().route_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(addr.as_str())
        .await
        .expect("bind");
    // Same socket options as the gateway, so the comparison is fair.
    let listener = listener.tap_io(|tcp| tcp.set_nodelay(true).expect("nodelay"));
    axum::serve(listener, router).await.expect("serve");
}
