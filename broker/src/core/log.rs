//! The seam between the core and the log: submit commands, wait until they
//! are applied.
//!
//! Every durable change the core makes, whoever asks for it (a handler, a
//! plugin runner, a timer), passes through [`BrokerState::submit`] or
//! [`BrokerState::submit_many`]. Today they hand the commands to the local
//! writer, which applies them in a group commit. Replication replaces only
//! this: propose the commands to the replica set, and answer once the
//! entry holding them is committed and applied. The layers test checks that
//! nothing else in the crate writes to the store.

use super::BrokerState;
use crate::command::Command;
use crate::storage::{WriteError, WriteOutcome};

impl BrokerState {
    /// Apply one command; answers once it is durable (or refused).
    pub async fn submit(&self, command: Command) -> Result<WriteOutcome, WriteError> {
        self.store.write(command).await
    }

    /// Apply several commands (they usually share one commit); results in
    /// order.
    pub async fn submit_many(
        &self,
        commands: Vec<Command>,
    ) -> Vec<Result<WriteOutcome, WriteError>> {
        self.store.write_many(commands).await
    }
}
