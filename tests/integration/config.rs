//! Configuration: defaults, environment overrides, and every error reported at once by key.

use custodian::config::{Config, LogFormat};

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn empty_config_has_documented_defaults() {
    let config = Config::from_toml("", env(&[])).unwrap();
    assert_eq!(config.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(config.server.public_url.as_str(), "http://127.0.0.1:8080/");
    assert_eq!(config.server.max_body_bytes, 1024 * 1024);
    assert_eq!(config.database.url, "sqlite://custodian-data/custodian.db");
    assert_eq!(config.log.format, LogFormat::Text);
}

#[test]
fn the_example_config_is_valid_and_matches_the_defaults() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/custodian.example.toml"
    ))
    .unwrap();
    let example = Config::from_toml(&text, env(&[])).unwrap();
    let defaults = Config::from_toml("", env(&[])).unwrap();
    assert_eq!(format!("{example:?}"), format!("{defaults:?}"));
}

#[test]
fn environment_overrides_keys_and_ignores_unrelated_variables() {
    let config = Config::from_toml(
        "[server]\nlisten = \"127.0.0.1:9000\"\n",
        env(&[
            ("CUSTODIAN_SERVER__LISTEN", "0.0.0.0:7000"),
            (
                "CUSTODIAN_SERVER__PUBLIC_URL",
                "https://custodian.example.com",
            ),
            ("CUSTODIAN_SERVER__MAX_BODY_BYTES", "2048"),
            ("CUSTODIAN_DATABASE__URL", "postgres://db/custodian"),
            ("CUSTODIAN_LOG__FORMAT", "json"),
            ("CUSTODIAN_TOKEN", "cst_not_configuration"),
            ("HOME", "/root"),
        ]),
    )
    .unwrap();
    assert_eq!(config.server.listen.to_string(), "0.0.0.0:7000");
    assert_eq!(
        config.server.public_url.as_str(),
        "https://custodian.example.com/"
    );
    assert_eq!(config.server.max_body_bytes, 2048);
    assert_eq!(config.database.url, "postgres://db/custodian");
    assert_eq!(config.log.format, LogFormat::Json);
}

#[test]
fn every_problem_is_reported_at_once_with_its_key() {
    let text = r#"
[server]
listen = "not-an-address"
public_url = "ftp://example.com/path"
max_body_bytes = 0
allowed_origins = ["https://ok.example.com", "not an origin"]

[database]
url = "mysql://secret-password@db"

[logging]
level = "debug"
"#;
    let error = Config::from_toml(
        text,
        env(&[("CUSTODIAN_SERVER__SHUTDOWN_GRACE_SECONDS", "-1")]),
    )
    .unwrap_err();
    let report = error.to_string();
    for key in [
        "server.listen",
        "server.public_url",
        "server.max_body_bytes",
        "server.shutdown_grace_seconds",
        "server.allowed_origins: `not an origin`",
        "database.url",
        "logging: unknown section",
    ] {
        assert!(report.contains(key), "missing {key} in:\n{report}");
    }
    assert_eq!(error.problems.len(), 7, "{report}");
    assert!(
        !report.contains("secret-password"),
        "database URL echoed: {report}"
    );
}

#[test]
fn unknown_keys_and_wrong_types_name_their_section() {
    let error = Config::from_toml(
        "[server]\nlisen = \"x\"\n[database]\nmax_connections = \"ten\"\n",
        env(&[]),
    )
    .unwrap_err();
    let report = error.to_string();
    assert!(report.contains("server.lisen: unknown key"), "{report}");
    assert!(
        report.contains("database.max_connections: invalid type"),
        "{report}"
    );
    assert!(
        Config::from_toml("[server", env(&[]))
            .unwrap_err()
            .to_string()
            .contains("not valid TOML")
    );
}

#[test]
fn every_shipped_config_is_valid() {
    for name in ["dev.toml", "single-node.toml", "production.toml"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let config = Config::from_toml(&text, env(&[]));
        assert!(config.is_ok(), "{name}: {}", config.unwrap_err());
    }
}
