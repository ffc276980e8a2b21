//! One function per command: check the input, make the one request, format the answer.
//!
//! Each returns the text to print on success, so it is printed whole or not at all. Input is
//! checked before the request (a usage error sends nothing).

use serde_json::{Value, json};

use crate::args::{
    AddNodeToContext, Command, DeleteApplication, DeleteContext, DeleteNodeFromContext, Format, InitCluster,
    RegisterApplication, RegisterContext, RegisterNode, UnregisterNode, check_application, check_user_context,
};
use crate::failure::Failure;
use crate::output;
use crate::server::Server;

pub fn run(command: &Command, server: &Server, format: Format) -> Result<String, Failure> {
    let json_output = format == Format::Json;
    match command {
        Command::Contexts => list(server, "/v1/public/context", json_output, output::contexts_table),
        Command::Nodes => list(server, "/v1/public", json_output, output::nodes_table),
        Command::Cluster => list(server, "/v1/cluster", json_output, output::nodes_table),
        Command::InitCluster(args) => init_cluster(server, args, json_output),
        Command::RegisterNode(args) => register_node(server, args, json_output),
        Command::UnregisterNode(args) => unregister_node(server, args, json_output),
        Command::AddNodeToContext(args) => add_node_to_context(server, args, json_output),
        Command::DeleteNodeFromContext(args) => delete_node_from_context(server, args, json_output),
        Command::Applications => list(
            server,
            "/v1/public/applications",
            json_output,
            output::applications_table,
        ),
        Command::RegisterContext(args) => register_context(server, args, json_output),
        Command::DeleteContext(args) => delete_context(server, args, json_output),
        Command::RegisterApplication(args) => register_application(server, args, json_output),
        Command::DeleteApplication(args) => delete_application(server, args, json_output),
        Command::BackupControlDb => backup_control_db(server, json_output),
    }
}

fn list(server: &Server, path: &str, json_output: bool, table: fn(&[Value]) -> String) -> Result<String, Failure> {
    let answer = server.get(path)?;
    let items = output::items(&answer, &format!("{}{path}", server.base()))?;
    Ok(if json_output {
        output::json_text(&Value::Array(items.to_vec()))
    } else {
        table(items)
    })
}

/// The body of `POST /v1/context`.
pub fn context_request(args: &RegisterContext) -> Result<Value, Failure> {
    check_user_context(&args.context)?;
    let roles: Vec<Value> = args
        .members()?
        .into_iter()
        .map(|(node, role)| json!({ "node": node, "role": role.as_str() }))
        .collect();
    Ok(json!({ "context": args.context, "roles": roles }))
}

fn register_context(server: &Server, args: &RegisterContext, json_output: bool) -> Result<String, Failure> {
    let body = context_request(args)?;
    server.post("/v1/context", Some(&body))?;
    Ok(output::action("context", &args.context, "created", json_output))
}

fn init_cluster(server: &Server, args: &InitCluster, json_output: bool) -> Result<String, Failure> {
    let context = args.context.as_deref().unwrap_or(DEFAULT_CONTEXT);
    check_user_context(context)?;
    server.post(&format!("/v1/context/init?context={context}"), None)?;
    Ok(output::action(
        "cluster with context",
        context,
        "initialised",
        json_output,
    ))
}

fn register_node(server: &Server, args: &RegisterNode, json_output: bool) -> Result<String, Failure> {
    if args.internal_host.is_empty() || args.internal_host.len() > 255 {
        return Err(Failure::Usage("-h/--internal-host: 1 to 255 characters".to_owned()));
    }
    let mut body = json!({
        "internalHostName": args.internal_host,
        "internalGrpcPort": args.internal_port,
    });
    if let Some(context) = &args.context {
        check_user_context(context)?;
        body["context"] = json!(context);
    }
    if args.no_contexts {
        body["noContexts"] = json!(true);
    }
    server.post("/v1/cluster", Some(&body))?;
    let cluster = format!("{}:{}", args.internal_host, args.internal_port);
    Ok(output::action(
        "node at",
        server.base(),
        &format!("joined the cluster of {cluster}"),
        json_output,
    ))
}

fn unregister_node(server: &Server, args: &UnregisterNode, json_output: bool) -> Result<String, Failure> {
    check_node(&args.node)?;
    server.delete(&format!("/v1/cluster/{}", args.node))?;
    Ok(output::action("node", &args.node, "unregistered", json_output))
}

fn add_node_to_context(server: &Server, args: &AddNodeToContext, json_output: bool) -> Result<String, Failure> {
    check_user_context(&args.context)?;
    check_node(&args.node)?;
    let role = args.role.to_ascii_uppercase();
    if !["PRIMARY", "ACTIVE_BACKUP", "PASSIVE_BACKUP", "MESSAGING_ONLY"].contains(&role.as_str()) {
        return Err(Failure::Usage(format!(
            "-r/--role {:?}: one of PRIMARY, ACTIVE_BACKUP, PASSIVE_BACKUP, MESSAGING_ONLY",
            args.role
        )));
    }
    server.post(&format!("/v1/context/{}/{}?role={role}", args.context, args.node), None)?;
    Ok(output::action(
        "node",
        &args.node,
        &format!("added to {} as {role}", args.context),
        json_output,
    ))
}

fn delete_node_from_context(
    server: &Server,
    args: &DeleteNodeFromContext,
    json_output: bool,
) -> Result<String, Failure> {
    check_user_context(&args.context)?;
    check_node(&args.node)?;
    let mut path = format!("/v1/context/{}/{}", args.context, args.node);
    if args.preserve_event_store {
        path.push_str("?preserveEventStore=true");
    }
    server.delete(&path)?;
    let status = if args.preserve_event_store {
        format!("removed from {} (its copy kept on disk)", args.context)
    } else {
        format!("removed from {}", args.context)
    };
    Ok(output::action("node", &args.node, &status, json_output))
}

/// A node name as it may appear in a path.
fn check_node(node: &str) -> Result<(), Failure> {
    let fine =
        !node.is_empty() && node.len() <= 255 && node.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if fine {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "node {node:?}: 1 to 255 letters, digits, '-', '_' or '.'"
        )))
    }
}

/// The context a cluster starts with when none is named (Axon's `default`).
const DEFAULT_CONTEXT: &str = "default";

fn delete_context(server: &Server, args: &DeleteContext, json_output: bool) -> Result<String, Failure> {
    check_user_context(&args.context)?;
    let mut path = format!("/v1/context/{}", args.context);
    if args.preserve_event_store {
        path.push_str("?preserveEventStore=true");
    }
    server.delete(&path)?;
    let status = if args.preserve_event_store {
        "deleted (event store kept on disk)"
    } else {
        "deleted"
    };
    Ok(output::action("context", &args.context, status, json_output))
}

/// The body of `POST /v1/applications`.
pub fn application_request(args: &RegisterApplication) -> Result<Value, Failure> {
    args.check()?;
    let roles: Vec<Value> = args
        .roles_per_context()?
        .into_iter()
        .map(|group| json!({ "context": group.context, "roles": group.roles }))
        .collect();
    let mut body = json!({
        "name": args.application,
        "description": args.description.clone().unwrap_or_default(),
        "roles": roles,
    });
    if let Some(token) = &args.app_token {
        body["token"] = json!(token);
    }
    Ok(body)
}

fn register_application(server: &Server, args: &RegisterApplication, json_output: bool) -> Result<String, Failure> {
    let body = application_request(args)?;
    let answer = server.post("/v1/applications", Some(&body))?;
    let token = output::single_text(&answer, &["token"])
        .or_else(|| args.app_token.clone())
        .ok_or_else(|| Failure::BadAnswer {
            url: format!("{}/v1/applications", server.base()),
            reason: "the application was registered but the answer holds no token; delete and register it \
                     again to get one"
                .to_string(),
        })?;
    Ok(output::registered_application(&args.application, &token, json_output))
}

fn delete_application(server: &Server, args: &DeleteApplication, json_output: bool) -> Result<String, Failure> {
    check_application(&args.application)?;
    server.delete(&format!("/v1/applications/{}", args.application))?;
    Ok(output::action("application", &args.application, "deleted", json_output))
}

fn backup_control_db(server: &Server, json_output: bool) -> Result<String, Failure> {
    let path = "/v1/backup/createControlDbBackup";
    let answer = server.post(path, None)?;
    let file = output::single_text(&answer, &["path", "file", "filename"]).ok_or_else(|| Failure::BadAnswer {
        url: format!("{}{path}", server.base()),
        reason: "the answer names no backup file".to_string(),
    })?;
    Ok(output::backup_path(&file, json_output))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_bodies() {
        let args = RegisterContext {
            context: "orders".into(),
            primaries: vec!["n1".into(), " n2".into()],
            active_backups: vec![],
            passive_backups: vec!["n3".into()],
            messaging_only: vec![],
        };
        assert_eq!(
            context_request(&args).unwrap(),
            json!({"context": "orders", "roles": [
                {"node": "n1", "role": "PRIMARY"},
                {"node": "n2", "role": "PRIMARY"},
                {"node": "n3", "role": "PASSIVE_BACKUP"}]})
        );
        let bad = RegisterContext {
            context: "a/b".into(),
            primaries: vec![],
            active_backups: vec![],
            passive_backups: vec![],
            messaging_only: vec![],
        };
        assert_eq!(context_request(&bad).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn application_bodies() {
        let mut args = RegisterApplication {
            application: "billing".into(),
            description: None,
            roles: vec!["READ_EVENTS@default".into(), "append_events@default".into()],
            app_token: None,
        };
        assert_eq!(
            application_request(&args).unwrap(),
            json!({"name": "billing", "description": "", "roles": [
                {"context": "default", "roles": ["READ_EVENTS", "APPEND_EVENTS"]}]})
        );
        args.app_token = Some("my-own-token-0123".into());
        args.description = Some("Billing".into());
        let body = application_request(&args).unwrap();
        assert_eq!(body["token"], "my-own-token-0123");
        assert_eq!(body["description"], "Billing");
        args.roles = vec!["READ@".into()];
        assert_eq!(application_request(&args).unwrap_err().exit_code(), 2);
    }
}
