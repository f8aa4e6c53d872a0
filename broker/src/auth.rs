//! Authentication: tokens mapped to principals.
//!
//! Owns: the in-memory view of the `tokens` table (id → principal and the
//! SHA-256 of the secret), token generation and checking, and the admin
//! token written to `<data dir>/admin.token` when authentication is on.
//!
//! Invariants: secrets are never stored, only their SHA-256; a token is
//! `msmq_<id>_<secret>` with a 16-hex-digit id and a 64-hex-digit secret;
//! a revoked token stops working on the connection's next request, because
//! every request re-checks that its token id still exists.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::RwLock;

/// The principal with every right; its token is created at first start.
pub const ADMIN_PRINCIPAL: &str = "admin";
/// File in the data directory holding the admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Prefix of the id of a principal authenticated by its client certificate.
pub const CERTIFICATE_ID_PREFIX: &str = "cert:";
/// Longest principal name.
pub const PRINCIPAL_BYTES_MAX: usize = 200;

/// A stored token: who it is, and the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub principal: String,
    pub secret_sha256: Vec<u8>,
    pub created_at_ms: u64,
}

/// Tokens by id.
#[derive(Default)]
pub struct Tokens {
    by_id: RwLock<HashMap<String, TokenRecord>>,
}

impl Tokens {
    pub fn load(records: Vec<(String, TokenRecord)>) -> Tokens {
        Tokens {
            by_id: RwLock::new(records.into_iter().collect()),
        }
    }

    pub fn insert(&self, id: String, record: TokenRecord) {
        self.by_id.write().expect("token lock").insert(id, record);
    }

    pub fn remove(&self, id: &str) -> bool {
        self.by_id.write().expect("token lock").remove(id).is_some()
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.read().expect("token lock").contains_key(id)
    }

    pub fn list(&self) -> Vec<(String, TokenRecord)> {
        let mut all: Vec<_> = self
            .by_id
            .read()
            .expect("token lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn has_principal(&self, principal: &str) -> bool {
        self.by_id
            .read()
            .expect("token lock")
            .values()
            .any(|r| r.principal == principal)
    }

    /// The (token id, principal) a presented token stands for.
    pub fn verify(&self, token: &str) -> Option<(String, String)> {
        let (id, secret) = parse(token)?;
        let tokens = self.by_id.read().expect("token lock");
        let record = tokens.get(id)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        // Compare without stopping at the first difference.
        let stored = &record.secret_sha256;
        let differ = digest.as_ref().len() != stored.len()
            || digest
                .as_ref()
                .iter()
                .zip(stored)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                != 0;
        if differ {
            return None;
        }
        Some((id.to_string(), record.principal.clone()))
    }
}

/// Split `msmq_<id>_<secret>`.
fn parse(token: &str) -> Option<(&str, &str)> {
    let rest = token.trim().strip_prefix("msmq_")?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// A new token for `principal`: (id, record to store, the token itself).
pub fn generate(principal: &str, now_ms: u64) -> (String, TokenRecord, String) {
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let id = hex(&rand::random::<[u8; 8]>());
    let secret = hex(&rand::random::<[u8; 32]>());
    let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let record = TokenRecord {
        principal: principal.to_string(),
        secret_sha256: digest.as_ref().to_vec(),
        created_at_ms: now_ms,
    };
    let token = format!("msmq_{id}_{secret}");
    (id, record, token)
}

/// Check a principal name: 1..=200 bytes of letters, digits, '.', '_', '-', '@'.
pub fn validate_principal(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > PRINCIPAL_BYTES_MAX {
        return Err(format!(
            "a principal name must be 1..={PRINCIPAL_BYTES_MAX} bytes"
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        Some(bad) => Err(format!(
            "principal {name:?} contains {bad:?}; use letters, digits, '.', '_', '-' or '@'"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_verifies_and_others_do_not() {
        let (id, record, token) = generate("billing", 1);
        let tokens = Tokens::load(vec![(id.clone(), record)]);
        assert_eq!(tokens.verify(&token), Some((id.clone(), "billing".into())));
        let mut wrong = token.clone();
        wrong.pop();
        wrong.push(if token.ends_with('0') { '1' } else { '0' });
        assert_eq!(tokens.verify(&wrong), None);
        assert_eq!(tokens.verify("msmq_x_y"), None);
        assert_eq!(tokens.verify(""), None);
        assert!(tokens.remove(&id));
        assert_eq!(tokens.verify(&token), None);
    }

    #[test]
    fn principal_names_at_and_past_the_limit() {
        assert!(validate_principal(&"a".repeat(PRINCIPAL_BYTES_MAX)).is_ok());
        assert!(validate_principal(&"a".repeat(PRINCIPAL_BYTES_MAX + 1)).is_err());
        assert!(validate_principal("ops@bank.example").is_ok());
        assert!(validate_principal("with space").is_err());
    }
}

/// What an ACL rule is about.
pub use msmq_protocol::{AclAction, AclResource, AclRule};

/// Whether `rules` grant `action` on `resource` named `name`. A pattern is
/// a name, `*` for every name, or a prefix ending in `*`.
pub fn allows(rules: &[AclRule], resource: AclResource, name: &str, action: AclAction) -> bool {
    rules.iter().any(|r| {
        r.resource == resource
            && r.actions.contains(&action)
            && match r.pattern.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => r.pattern == name,
            }
    })
}

/// Rules by principal.
#[derive(Default)]
pub struct Acls {
    by_principal: RwLock<HashMap<String, Vec<AclRule>>>,
}

impl Acls {
    pub fn load(all: Vec<(String, Vec<AclRule>)>) -> Acls {
        Acls {
            by_principal: RwLock::new(all.into_iter().collect()),
        }
    }

    pub fn set(&self, principal: &str, rules: Vec<AclRule>) {
        let mut all = self.by_principal.write().expect("acl lock");
        if rules.is_empty() {
            all.remove(principal);
        } else {
            all.insert(principal.to_string(), rules);
        }
    }

    pub fn rules(&self, principal: &str) -> Vec<AclRule> {
        self.by_principal
            .read()
            .expect("acl lock")
            .get(principal)
            .cloned()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod acl_tests {
    use super::*;

    #[test]
    fn patterns_match_names_prefixes_and_everything() {
        let rules = vec![
            AclRule {
                resource: AclResource::Topic,
                pattern: "payments-*".into(),
                actions: vec![AclAction::Produce],
            },
            AclRule {
                resource: AclResource::Group,
                pattern: "*".into(),
                actions: vec![AclAction::Consume],
            },
        ];
        assert!(allows(
            &rules,
            AclResource::Topic,
            "payments-eu",
            AclAction::Produce
        ));
        assert!(!allows(
            &rules,
            AclResource::Topic,
            "payments",
            AclAction::Produce
        ));
        assert!(!allows(
            &rules,
            AclResource::Topic,
            "payments-eu",
            AclAction::Consume
        ));
        assert!(allows(
            &rules,
            AclResource::Group,
            "billing",
            AclAction::Consume
        ));
        assert!(!allows(
            &[],
            AclResource::Group,
            "billing",
            AclAction::Consume
        ));
    }
}
