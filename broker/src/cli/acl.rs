//! `msmq acl …`: what a principal may do on a broker with authentication on
//! (admin only).

use super::ClientArgs;
use clap::Subcommand;
use msmq_client::protocol::{AclAction, AclResource, AclRule};

#[derive(Subcommand)]
pub enum AclCommand {
    /// Replace a principal's rules, e.g. `--allow topic:payments:produce
    /// --allow group:billing-*:consume --allow producer-group:pay:transact
    /// --allow plugin:*:deploy`. No --allow removes every right.
    Set {
        principal: String,
        /// KIND:PATTERN:ACTION[,ACTION]; KIND is topic, group, producer-group
        /// or plugin; PATTERN a name, `*`, or a prefix ending in `*`; ACTION
        /// produce, consume, transact or deploy.
        #[arg(long = "allow", value_parser = parse_rule)]
        allow: Vec<AclRule>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print a principal's rules.
    Show {
        principal: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn parse_rule(s: &str) -> Result<AclRule, String> {
    let mut parts = s.splitn(3, ':');
    let (Some(kind), Some(pattern), Some(actions)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("expected KIND:PATTERN:ACTION, got {s:?}"));
    };
    let resource = match kind {
        "topic" => AclResource::Topic,
        "group" => AclResource::Group,
        "producer-group" => AclResource::ProducerGroup,
        "plugin" => AclResource::Plugin,
        other => {
            return Err(format!(
                "unknown kind {other:?}: use topic, group, producer-group or plugin"
            ))
        }
    };
    let actions = actions
        .split(',')
        .map(|a| match a {
            "produce" => Ok(AclAction::Produce),
            "consume" => Ok(AclAction::Consume),
            "transact" => Ok(AclAction::Transact),
            "deploy" => Ok(AclAction::Deploy),
            other => Err(format!(
                "unknown action {other:?}: use produce, consume, transact or deploy"
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if pattern.is_empty() {
        return Err("the pattern must not be empty".into());
    }
    Ok(AclRule {
        resource,
        pattern: pattern.to_string(),
        actions,
    })
}

pub async fn run(cmd: AclCommand) -> anyhow::Result<()> {
    match cmd {
        AclCommand::Set {
            principal,
            allow,
            client,
        } => {
            let n = allow.len();
            client.connect().await?.set_acl(&principal, allow).await?;
            println!("{principal}: {n} rules");
        }
        AclCommand::Show { principal, client } => {
            for r in client.connect().await?.acl(&principal).await? {
                println!("{:?} {} {:?}", r.resource, r.pattern, r.actions);
            }
        }
    }
    Ok(())
}
