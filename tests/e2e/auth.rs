//! Authentication: tokens over real QUIC.

use crate::harness::{cli, TestBroker, MSMQ};
use msmq_client::protocol::{ErrorCode, NewMessage};
use msmq_client::{Client, ClientError};

/// The rule that lets a principal produce to `topic`.
fn produce_on(topic: &str) -> Vec<msmq_client::protocol::AclRule> {
    use msmq_client::protocol::{AclAction, AclResource, AclRule};
    vec![AclRule {
        resource: AclResource::Topic,
        pattern: topic.into(),
        actions: vec![AclAction::Produce],
    }]
}

fn code<T>(result: Result<T, ClientError>) -> Option<ErrorCode> {
    match result {
        Ok(_) => panic!("the broker must refuse"),
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_authenticate_and_a_revoked_token_is_refused_at_once() -> anyhow::Result<()> {
    let broker = TestBroker::start_with(&["--auth"])?;
    let admin_token = broker.admin_token()?;

    // No token: only Ping gets through.
    let anonymous = broker.client().await?;
    anonymous.ping().await?;
    assert_eq!(
        code(anonymous.list_topics().await),
        Some(ErrorCode::UNAUTHENTICATED)
    );
    // A wrong token cannot even connect.
    let wrong = Client::connect(broker.options().token(format!(
        "{}{}",
        &admin_token[..admin_token.len() - 1],
        if admin_token.ends_with('0') { '1' } else { '0' }
    )))
    .await;
    assert_eq!(code(wrong), Some(ErrorCode::UNAUTHENTICATED));

    let admin = Client::connect(broker.options().token(&admin_token)).await?;
    admin.create_topic("payments", 1).await?;
    admin.create_topic("payments-eu", 1).await?;
    let (billing_id, billing_token) = admin.create_token("billing").await?;
    let billing = Client::connect(broker.options().token(&billing_token)).await?;
    // Authenticated, but deny by default.
    assert_eq!(
        code(
            billing
                .producer("payments")
                .send(NewMessage::new("t-0"))
                .await
        ),
        Some(ErrorCode::FORBIDDEN)
    );
    // Rights on payments-* for produce only (set through the CLI).
    let out = std::process::Command::new(MSMQ)
        .args([
            "acl",
            "set",
            "billing",
            "--allow",
            "topic:payments-*:produce",
        ])
        .args(["--allow", "group:billing:consume"])
        .env("MSMQ_SERVER", broker.addr.to_string())
        .env("MSMQ_CA", broker.cert())
        .env("MSMQ_TOKEN", &admin_token)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(admin.acl("billing").await?.len(), 2);
    billing
        .producer("payments-eu")
        .send(NewMessage::new("t-1"))
        .await?;
    assert_eq!(
        code(
            billing
                .producer("payments")
                .send(NewMessage::new("t-1"))
                .await
        ),
        Some(ErrorCode::FORBIDDEN)
    );
    // Consuming needs consume on the topic too, which billing lacks.
    let join = billing
        .consumer("billing", &["payments-eu"], Default::default())
        .await;
    assert_eq!(
        join.err().and_then(|e| e.code()),
        Some(ErrorCode::FORBIDDEN)
    );
    admin.set_acl("billing", produce_on("payments")).await?;
    billing
        .producer("payments")
        .send(NewMessage::new("t-1"))
        .await?;
    assert_eq!(
        code(billing.create_token("mallory").await),
        Some(ErrorCode::FORBIDDEN)
    );
    let listed = admin.list_tokens().await?;
    let principals: Vec<&str> = listed.iter().map(|t| t.principal.as_str()).collect();
    assert!(principals.contains(&"admin") && principals.contains(&"billing"));

    // Revoked: the open connection is refused on its next request.
    admin.revoke_token(&billing_id).await?;
    assert_eq!(
        code(
            billing
                .producer("payments")
                .send(NewMessage::new("t-2"))
                .await
        ),
        Some(ErrorCode::UNAUTHENTICATED)
    );
    assert_eq!(
        code(Client::connect(broker.options().token(&billing_token)).await),
        Some(ErrorCode::UNAUTHENTICATED)
    );
    assert_eq!(
        admin.describe_topic("payments").await?.partitions[0].end_offset,
        1
    );

    // The CLI takes the token from MSMQ_TOKEN.
    let out = std::process::Command::new(MSMQ)
        .args(["token", "create", "points"])
        .env("MSMQ_SERVER", broker.addr.to_string())
        .env("MSMQ_CA", broker.cert())
        .env("MSMQ_TOKEN", &admin_token)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8(out.stdout)?.starts_with("msmq_"));
    let out = cli(&broker, &["topic", "list"], None)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("UNAUTHENTICATED"));
    Ok(())
}

#[test]
fn a_non_loopback_listener_without_authentication_refuses_to_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Refused at configuration, before anything is bound.
    let out = std::process::Command::new(MSMQ)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--http",
            "off",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--auth") && err.contains("--allow-anonymous"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_maps_to_its_principal() -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let dir = tempfile::tempdir()?;
    // A client CA, and a certificate it signs for the principal "billing".
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "msmq test client CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let client_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "billing");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = params.signed_by(&client_key, &issuer)?;
    let (ca_pem, cert_pem, key_pem) = (
        dir.path().join("ca.pem"),
        dir.path().join("billing.pem"),
        dir.path().join("billing.key"),
    );
    std::fs::write(&ca_pem, ca_cert.pem())?;
    std::fs::write(&cert_pem, client_cert.pem())?;
    std::fs::write(&key_pem, client_key.serialize_pem())?;

    let ca = ca_pem.to_str().expect("utf-8 path");
    let broker = TestBroker::start_with(&["--auth", "--tls-client-ca", ca])?;
    let (_, admin) = broker.admin().await?;
    admin.create_topic("payments", 1).await?;

    // No token: the certificate alone authenticates "billing", whose ACL
    // decides; without the certificate nothing works.
    let billing = Client::connect(broker.options().client_cert(&cert_pem, &key_pem)).await?;
    assert_eq!(
        code(
            billing
                .producer("payments")
                .send(NewMessage::new("a"))
                .await
        ),
        Some(ErrorCode::FORBIDDEN)
    );
    admin.set_acl("billing", produce_on("payments")).await?;
    billing
        .producer("payments")
        .send(NewMessage::new("a"))
        .await?;
    let anonymous = broker.client().await?;
    assert_eq!(
        code(anonymous.list_topics().await),
        Some(ErrorCode::UNAUTHENTICATED)
    );
    Ok(())
}
