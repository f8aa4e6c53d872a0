//! Access: tokens and ACLs.

use super::*;

impl Writer {
    /// Apply a command of this family.
    pub(super) fn apply_access(
        &self,
        command: &mut Command,
        t: &mut Tables,
    ) -> Result<Result<WriteOutcome, WriteError>, StorageError> {
        Ok(match command {
            Command::PutToken { id, record } => {
                let existed = match record {
                    Some(r) => t
                        .tokens
                        .insert(id.as_str(), encode(r).as_slice())?
                        .is_some(),
                    None => t.tokens.remove(id.as_str())?.is_some(),
                };
                Ok(WriteOutcome::TokenStored(existed))
            }
            Command::SetAcl { principal, rules } => {
                if rules.is_empty() {
                    t.acls.remove(principal.as_str())?;
                } else {
                    t.acls
                        .insert(principal.as_str(), encode(rules).as_slice())?;
                }
                Ok(WriteOutcome::AclSet)
            }
            other => return Ok(Err(misrouted(other))),
        })
    }
}
