//! `msmq token …`: tokens of a broker with authentication on (admin only).

use super::ClientArgs;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a token for a principal and print it (it is shown only once).
    Create {
        principal: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List tokens: id, principal, creation time (never the secrets).
    List {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Revoke a token by id; its connections are refused from their next request.
    Revoke {
        token_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub async fn run(cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { principal, client } => {
            let (id, token) = client.connect().await?.create_token(&principal).await?;
            eprintln!("token {id} for {principal}; keep it secret, it is not shown again:");
            println!("{token}");
        }
        TokenCommand::List { client } => {
            let tokens = client.connect().await?.list_tokens().await?;
            println!(
                "{:<18} {:<32} CREATED (ms since epoch)",
                "TOKEN ID", "PRINCIPAL"
            );
            for t in tokens {
                println!("{:<18} {:<32} {}", t.token_id, t.principal, t.created_at_ms);
            }
        }
        TokenCommand::Revoke { token_id, client } => {
            client.connect().await?.revoke_token(&token_id).await?;
            println!("revoked {token_id}");
        }
    }
    Ok(())
}
