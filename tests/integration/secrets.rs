//! The secret store: envelope encryption at rest, no way back out but a run, rotation.

use base64::Engine;

use crate::harness::{Backend, TestApp, dump_all_text};
use crate::on_both_backends;
use custodian::keys::MasterKey;
use custodian::secrets::{self, SecretError};
use custodian::tenants::TenantId;

on_both_backends!(
    values_are_sealed_at_rest_and_open_only_for_a_run,
    bad_values_and_places_are_refused_and_change_nothing,
    a_moved_ciphertext_does_not_open,
    rotating_the_master_key_rewraps_data_keys,
);

const CANARY: &[u8] = b"canary-db-password-7f3a9c";

async fn setup(backend: Backend) -> Option<(TestApp, TenantId)> {
    let t = TestApp::builder(backend).start().await?;
    let acme = t.tenant("acme").await;
    t.environment(&acme, "staging", &["API_KEY"]).await;
    Some((t, acme))
}

async fn values_are_sealed_at_rest_and_open_only_for_a_run(backend: Backend) {
    let Some((t, acme)) = setup(backend).await else {
        return;
    };
    let key = &t.app.master_key;
    let first = secrets::set(t.db(), key, &acme, "staging", "DB_PASSWORD", CANARY, 1)
        .await
        .unwrap();
    assert_eq!(first.version, 1);
    let second = secrets::set(
        t.db(),
        key,
        &acme,
        "staging",
        "DB_PASSWORD",
        b"second-value-123",
        2,
    )
    .await
    .unwrap();
    assert_eq!(second.version, 2);
    secrets::set(
        t.db(),
        key,
        &acme,
        "staging",
        "API_KEY",
        b"api-key-value-xyz",
        3,
    )
    .await
    .unwrap();

    let listed = secrets::list(t.db(), &acme, "staging").await.unwrap();
    let names: Vec<_> = listed
        .iter()
        .map(|s| (s.name.as_str(), s.version))
        .collect();
    assert_eq!(names, [("API_KEY", 1), ("DB_PASSWORD", 2)]);
    // Setting a new name declares it on the environment.
    let env = custodian::environments::get(t.db(), &acme, "staging")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(env.secret_names, ["API_KEY", "DB_PASSWORD"]);

    let opened = secrets::load_for_run(t.db(), key, &acme, "staging")
        .await
        .unwrap();
    let values: Vec<_> = opened
        .iter()
        .map(|s| (s.name.as_str(), s.value.as_slice()))
        .collect();
    assert_eq!(
        values,
        [
            ("API_KEY", b"api-key-value-xyz".as_slice()),
            ("DB_PASSWORD", b"second-value-123".as_slice())
        ]
    );
    assert!(
        !format!("{opened:?}").contains("second-value"),
        "Debug prints no value"
    );

    let dump = dump_all_text(t.db()).await;
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT ciphertext, name FROM secrets")
        .fetch_all(t.db().pool())
        .await
        .unwrap();
    let keys: Vec<(String,)> = sqlx::query_as("SELECT wrapped_key FROM tenant_keys")
        .fetch_all(t.db().pool())
        .await
        .unwrap();
    let stored = format!("{dump}{rows:?}{keys:?}");
    for form in [
        String::from_utf8(CANARY.to_vec()).unwrap(),
        base64::engine::general_purpose::STANDARD.encode(CANARY),
        hex::encode(CANARY),
        "second-value-123".to_owned(),
    ] {
        assert!(!stored.contains(&form), "{form} stored in plaintext");
    }
    t.stop().await;
}

async fn bad_values_and_places_are_refused_and_change_nothing(backend: Backend) {
    let Some((t, acme)) = setup(backend).await else {
        return;
    };
    let key = &t.app.master_key;
    let before = crate::harness::snapshot(t.db()).await;
    let cases: Vec<(&str, &str, &[u8], &str)> = vec![
        ("staging", "PIN", b"1234567", "values shorter than 8 bytes"),
        ("staging", "lower_case", b"long-enough-value", "secret name"),
        (
            "prod",
            "API_KEY",
            b"long-enough-value",
            "no environment `prod`",
        ),
    ];
    for (env, name, value, expected) in cases {
        let err = secrets::set(t.db(), key, &acme, env, name, value, 1)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(expected), "{err}");
    }
    let huge = vec![b'x'; secrets::MAX_VALUE_LEN + 1];
    assert!(matches!(
        secrets::set(t.db(), key, &acme, "staging", "API_KEY", &huge, 1).await,
        Err(SecretError::TooLong)
    ));
    assert!(matches!(
        secrets::delete(t.db(), &acme, "staging", "NOPE").await,
        Err(SecretError::NotFound(_))
    ));
    assert_eq!(crate::harness::snapshot(t.db()).await, before);
    let count: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM secrets")
        .fetch_one(t.db().pool())
        .await
        .unwrap();
    assert_eq!(count.0, 0);
    t.stop().await;
}

async fn a_moved_ciphertext_does_not_open(backend: Backend) {
    let Some((t, acme)) = setup(backend).await else {
        return;
    };
    let key = &t.app.master_key;
    secrets::set(t.db(), key, &acme, "staging", "API_KEY", CANARY, 1)
        .await
        .unwrap();
    // Someone with database access relabels the row: the associated data no longer matches.
    sqlx::query("UPDATE secrets SET name = 'OTHER_KEY'")
        .execute(t.db().pool())
        .await
        .unwrap();
    let err = secrets::load_for_run(t.db(), key, &acme, "staging")
        .await
        .unwrap_err();
    assert!(matches!(err, SecretError::Key(_)), "{err}");
    assert!(!err.to_string().contains("canary"));
    t.stop().await;
}

async fn rotating_the_master_key_rewraps_data_keys(backend: Backend) {
    let Some((t, acme)) = setup(backend).await else {
        return;
    };
    let old = &t.app.master_key;
    secrets::set(t.db(), old, &acme, "staging", "API_KEY", CANARY, 1)
        .await
        .unwrap();
    let new = MasterKey::generate();
    assert_eq!(
        secrets::rotate_master_key(t.db(), old, &new).await.unwrap(),
        1
    );
    let opened = secrets::load_for_run(t.db(), &new, &acme, "staging")
        .await
        .unwrap();
    assert_eq!(opened[0].value.as_slice(), CANARY);
    assert!(
        secrets::load_for_run(t.db(), old, &acme, "staging")
            .await
            .is_err(),
        "the old key no longer opens"
    );
    let (id,): (String,) = sqlx::query_as("SELECT master_key_id FROM tenant_keys")
        .fetch_one(t.db().pool())
        .await
        .unwrap();
    assert_eq!(id, new.id());
    t.stop().await;
}
