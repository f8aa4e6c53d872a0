//! `foreign-import` (test plugin): a consumer plugin that also imports an
//! interface of another package (`test:vault/secrets`), which no broker
//! links. `msmq plugin check` and deploy must refuse it by that import,
//! before compiling anything.

use msmq_plugin::{Batch, Config, Outcome, Plugin};

wit_bindgen::generate!({
    inline: "
        package test:vault;
        interface secrets {
            reveal: func(name: string) -> string;
        }
        world vault-user {
            import secrets;
        }
    ",
});

struct ForeignImport;

impl Plugin for ForeignImport {
    fn init(_config: Config) -> Result<Self, String> {
        Ok(ForeignImport)
    }

    fn handle(&mut self, batch: &Batch) -> Vec<Outcome> {
        let _ = test::vault::secrets::reveal("database-password");
        vec![Outcome::Ack; batch.len()]
    }
}

msmq_plugin::export_plugin!(ForeignImport);
