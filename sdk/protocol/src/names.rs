//! Rules for topic and group names, checked by the broker and the client.

/// Longest topic or group name, in bytes.
pub const NAME_BYTES_MAX: usize = 200;

/// Check a topic or consumer-group name: 1..=200 bytes of ASCII letters,
/// digits, `.`, `_`, `-` and `%` (the `%` leaves room for system topics such
/// as `%DLQ%group`).
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name must not be empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!(
            "{kind} name is {} bytes; the limit is {NAME_BYTES_MAX}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '%')))
    {
        return Err(format!(
            "{kind} name {name:?} contains {bad:?}; use letters, digits, '.', '_', '-' or '%'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_at_and_past_the_limit() {
        assert!(validate_name("topic", &"a".repeat(NAME_BYTES_MAX)).is_ok());
        assert!(validate_name("topic", &"a".repeat(NAME_BYTES_MAX + 1)).is_err());
        assert!(validate_name("topic", "").is_err());
        assert!(validate_name("topic", "pay ments").is_err());
        assert!(validate_name("topic", "%DLQ%billing.v1_x-y").is_ok());
    }
}
