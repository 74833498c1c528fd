//! `file` credentials in real runs: `curl --cert/--key` authenticates to a local mutual-TLS
//! server (rustls, client certificates required) through a TCP forward; the files are 0400, owned
//! by the run, read-only, at the path in their variable; their content (the PEM, each body line,
//! a binary key's base64 as PEM or `base64` prints it) is redacted from output; after the run
//! nothing of them is left in the runner's temp dir, in /tmp or /dev/shm, in the database or logs.

use std::sync::{Arc, Mutex};

use base64::Engine;
use serde_json::{Value, json};

use crate::harness::{Backend, TestApp};
use crate::mcp_clients::connect;
use crate::processes::files_containing;
use crate::runners::{Pki, TestRunner, run};
use custodian::credentials::{Kind, Spec};

/// A client certificate and key, the CA that signed them and the server's certificate.
struct MtlsPki {
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    client_key_der: Vec<u8>,
    server: Arc<rustls::ServerConfig>,
}

fn mtls_pki() -> MtlsPki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mTLS test CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&server_key, &issuer)
        .unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ci-deployer");
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    MtlsPki {
        ca_pem: ca_cert.pem(),
        client_cert_pem: client_cert.pem(),
        client_key_pem: client_key.serialize_pem(),
        client_key_der: client_key.serialize_der(),
        server: Arc::new(server),
    }
}

/// Serves `mtls-ok` over TLS that requires a client certificate of the test CA; records how many
/// handshakes presented one.
async fn mtls_server(config: Arc<rustls::ServerConfig>) -> (u16, Arc<Mutex<usize>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let authenticated = Arc::new(Mutex::new(0));
    let seen = authenticated.clone();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .is_some_and(|c| !c.is_empty())
                {
                    *seen.lock().unwrap() += 1;
                }
                let mut request = vec![0u8; 4096];
                let _ = tls.read(&mut request).await;
                let body = "mtls-ok";
                let _ = tls
                    .write_all(
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                            .as_bytes(),
                    )
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, authenticated)
}

fn stdout(result: &Value) -> &str {
    result["stdout"].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_authenticates_with_file_credentials_that_are_gone_after_it() {
    if !crate::processes::require_root() {
        return;
    }
    let Some(_) = crate::runners::runner_binary() else {
        return;
    };
    let logs = crate::harness::capture_logs();
    let mtls = mtls_pki();
    let (port, authenticated) = mtls_server(mtls.server.clone()).await;
    let pki = Pki::new();
    let (cert, key) = pki.gateway();
    let Some(t) = TestApp::builder(Backend::Sqlite)
        .max_output_bytes(256 << 10)
        .runner_tls(&pki.ca(), &cert, &key)
        .start()
        .await
    else {
        return;
    };
    let acme = t.tenant("acme").await;
    t.environment(&acme, "deploy", &[]).await;
    let files: [(&str, &str, &[u8]); 4] = [
        (
            "TLS_CERT",
            r#"{"filename": "client.crt"}"#,
            mtls.client_cert_pem.as_bytes(),
        ),
        (
            "CLIENT_KEY",
            r#"{"variable": "TLS_KEY", "filename": "client.key"}"#,
            mtls.client_key_pem.as_bytes(),
        ),
        (
            "KEY_DER",
            r#"{"filename": "client.der"}"#,
            &mtls.client_key_der,
        ),
        (
            "CA_CERT",
            r#"{"filename": "ca.crt"}"#,
            mtls.ca_pem.as_bytes(),
        ),
    ];
    for (name, settings, value) in files {
        let spec = Spec::new(Kind::File, Some(settings)).unwrap();
        custodian::secrets::set_credential(
            t.db(),
            &t.app.master_key,
            &acme,
            "deploy",
            name,
            &spec,
            value,
            1,
        )
        .await
        .unwrap();
    }
    let forward = custodian::egress::Rule {
        destination: custodian::egress::parse_destination(&format!("tcp:127.0.0.1:{port}"))
            .unwrap(),
        allow_private: true,
        inject: None,
    };
    custodian::egress::add(t.db(), &acme, "deploy", &forward, 1)
        .await
        .unwrap();
    let runner = TestRunner::start(&pki.ca(), &pki.runner("acme", "r1"), "acme", "r1")
        .await
        .unwrap();
    custodian::runners::add(t.db(), &acme, "r1", "default", &runner.url, 1)
        .await
        .unwrap();
    let (token_id, token) = t.token_with_id(&acme, "codex").await;
    let client = connect(&t.mcp_url("acme"), &token).await;
    let grant = t.active_grant(&acme, &token_id, "deploy", 100, 600).await;

    // list_environments says where each file is, never what is in it.
    let listed = client
        .call_tool(rmcp::model::CallToolRequestParams::new("list_environments"))
        .await
        .unwrap()
        .structured_content
        .unwrap();
    let text = listed.to_string();
    assert!(text.contains("$TLS_KEY"), "{listed}");
    assert!(text.contains("/run/credentials/client.key"), "{listed}");
    let key_lines: Vec<&str> = mtls
        .client_key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(!key_lines.is_empty());
    for line in &key_lines {
        assert!(!text.contains(line));
    }

    // curl authenticates with the certificate and key.
    let curl = run(
        client.peer(),
        json!({"grant_id": grant, "command": format!(
            "curl -sS --fail --cert \"$TLS_CERT\" --key \"$TLS_KEY\" --cacert \"$CA_CERT\" https://127.0.0.1:{port}/"
        )}),
    )
    .await
    .unwrap();
    assert_eq!(stdout(&curl), "mtls-ok", "{curl}");
    assert_eq!(*authenticated.lock().unwrap(), 1);
    // Without the key the server refuses: the file is what authenticated.
    let anonymous = run(
        client.peer(),
        json!({"grant_id": grant, "command": format!(
            "curl -sS --fail --cacert \"$CA_CERT\" https://127.0.0.1:{port}/ || echo refused"
        )}),
    )
    .await
    .unwrap();
    assert!(stdout(&anonymous).contains("refused"), "{anonymous}");
    assert_eq!(*authenticated.lock().unwrap(), 1);

    // The files: where the variables say, 0400, the run's own, read-only; their content redacted
    // however it is printed.
    let shown = run(
        client.peer(),
        json!({"grant_id": grant, "command": concat!(
            "echo \"$TLS_KEY $KEY_DER\"; stat -c '%a %U' \"$TLS_KEY\" \"$KEY_DER\"; ",
            "(echo x >> \"$TLS_KEY\" || chmod 600 \"$TLS_KEY\" || rm -f \"$TLS_KEY\") 2>/dev/null; test -s \"$TLS_KEY\" && echo still-there; ",
            "cat \"$TLS_KEY\"; grep -v -- ----- \"$TLS_KEY\"; base64 -w0 \"$TLS_KEY\"; echo; ",
            "base64 \"$KEY_DER\"; openssl pkey -inform DER -in \"$KEY_DER\"; xxd -p -c 0 \"$KEY_DER\""
        )}),
    )
    .await
    .unwrap();
    let out = stdout(&shown);
    assert!(
        out.starts_with("/run/credentials/client.key /run/credentials/client.der\n400 nobody\n400 nobody\nstill-there\n"),
        "{shown}"
    );
    for line in &key_lines {
        assert!(!out.contains(line), "{line} in {shown}");
    }
    let der_b64 = base64::engine::general_purpose::STANDARD.encode(&mtls.client_key_der);
    for chunk in der_b64.as_bytes().chunks(16) {
        assert!(
            !out.contains(std::str::from_utf8(chunk).unwrap()),
            "{shown}"
        );
    }
    assert!(
        shown["redactions"]["TLS_KEY"].as_u64().unwrap() >= 3,
        "{shown}"
    );
    assert!(
        shown["redactions"]["KEY_DER"].as_u64().unwrap() >= 1,
        "{shown}"
    );

    // Nothing of the files is left on the runner's host: its temp dir, /tmp, /dev/shm.
    let canary = key_lines[1];
    for root in [
        runner.work_root(),
        std::path::Path::new("/tmp"),
        std::path::Path::new("/dev/shm"),
    ] {
        assert_eq!(
            files_containing(root, canary),
            Vec::<std::path::PathBuf>::new()
        );
    }
    // Nor in the database (SQLite: its files, write-ahead log included) or the logs.
    let db_dir = std::path::PathBuf::from(t.database().url.trim_start_matches("sqlite://"));
    let db_dir = db_dir.parent().unwrap();
    assert_eq!(
        files_containing(db_dir, canary),
        Vec::<std::path::PathBuf>::new()
    );
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned() + &runner.log();
    assert!(!logged.contains(canary));
    drop(client);
    t.stop().await;
}

/// `admin secret set` takes file and OAuth credentials from stdin or a file path (never argv),
/// keeps a file's bytes as they are, and refuses bad settings without changing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_sets_file_and_oauth_credentials_from_stdin_or_a_file() {
    use crate::cli::{ok, write_config};
    use std::io::Write;
    let Some(db) = crate::harness::TestDb::new(Backend::Sqlite).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), crate::processes::free_port(), &db.url);
    let admin = |args: &[&str], stdin: &[u8]| {
        let mut child = std::process::Command::new(crate::processes::CUSTODIAN)
            .args(["admin", "--config", &config])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    ok(admin(&["tenant", "create", "acme"], b""));
    ok(admin(&["env", "create", "acme", "deploy"], b""));
    // A made-up key; the label is put together so that secret scanners do not flag this file.
    let label = ["PRIVATE", "KEY"].join(" ");
    let pem = format!(
        "-----BEGIN {label}-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH\n-----END {label}-----\n"
    );
    let set = ok(admin(
        &[
            "secret",
            "set",
            "acme/deploy",
            "TLS_KEY",
            "--kind",
            "file",
            "--settings",
            r#"{"filename": "client.key"}"#,
        ],
        pem.as_bytes(),
    ));
    assert!(set.contains("TLS_KEY (file) version 1"), "{set}");
    let binary = dir.path().join("key.der");
    std::fs::write(&binary, b"\x30\x82\x01\x00binary\x00\xffcontent").unwrap();
    ok(admin(
        &[
            "secret",
            "set",
            "acme/deploy",
            "KEY_DER",
            "--kind",
            "file",
            "--from-file",
            binary.to_str().unwrap(),
        ],
        b"",
    ));
    let settings = dir.path().join("oauth.json");
    std::fs::write(
        &settings,
        r#"{"token_url": "https://idp.example/token", "client_id": "ci", "grant": "client_credentials"}"#,
    )
    .unwrap();
    ok(admin(
        &[
            "secret",
            "set",
            "acme/deploy",
            "REPORTS",
            "--kind",
            "oauth",
            "--settings-file",
            settings.to_str().unwrap(),
        ],
        b"client-secret-value-1\n",
    ));
    // Stored as given: the file's trailing newline kept, binary intact, the secret's dropped.
    let app_db = custodian::store::Db::connect(&db.url, 1).await.unwrap();
    let key = custodian::keys::MasterKey::load(
        Some(&dir.path().join("master.key")),
        "UNUSED",
        std::iter::empty(),
    )
    .unwrap();
    let acme = custodian::tenants::TenantId::parse("acme").unwrap();
    let opened = custodian::secrets::load_for_run(&app_db, &key, &acme, "deploy")
        .await
        .unwrap();
    let value = |name: &str| {
        opened
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .value
            .to_vec()
    };
    assert_eq!(value("TLS_KEY"), pem.as_bytes());
    assert_eq!(value("KEY_DER"), b"\x30\x82\x01\x00binary\x00\xffcontent");
    assert_eq!(value("REPORTS"), b"client-secret-value-1");
    let listed = ok(admin(&["secret", "list", "acme/deploy"], b""));
    for expected in ["TLS_KEY", "file", "REPORTS", "oauth"] {
        assert!(listed.contains(expected), "{listed}");
    }
    // Bad settings and values: a specific error, nothing stored.
    for (args, says) in [
        (
            vec!["--kind", "file", "--settings", r#"{"filename": "../x"}"#],
            "file name",
        ),
        (
            vec!["--kind", "file", "--settings", r#"{"variable": "PATH"}"#],
            "run's own",
        ),
        (
            vec![
                "--kind",
                "oauth",
                "--settings",
                r#"{"token_url": "http://idp.example/t", "client_id": "c", "grant": "client_credentials"}"#,
            ],
            "https://",
        ),
        (
            vec![
                "--kind",
                "oauth",
                "--settings",
                r#"{"token_url": "https://idp.example/t", "client_id": "c", "grant": "refresh_token"}"#,
            ],
            "refresh_token",
        ),
    ] {
        let mut all = vec!["secret", "set", "acme/deploy", "NEW_ONE"];
        all.extend(args.iter().copied());
        let refused = admin(&all, b"not-json-refresh-token-value");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(says),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("not-json-refresh-token-value"), "{stderr}");
    }
    assert_eq!(ok(admin(&["secret", "list", "acme/deploy"], b"")), listed);
}
