//! What the commands print: tables for people, JSON for scripts.
//!
//! The JSON of a listing is the server's own answer, pretty-printed, so a script sees exactly
//! the admin API's documented shape. The JSON of an action (register, delete, backup) is a
//! small object of this tool's own (`{"context": ..., "status": "created"}`, ...), documented in
//! docs/cli.md, so it stays the same whatever the server's answer body looks like.
//!
//! Tables read the fields they show by name and show `-` for a missing one: a newer server that
//! adds fields changes nothing, one that lacks a field still prints.

use comfy_table::{ContentArrangement, Table, presets};
use serde_json::{Value, json};

use crate::failure::Failure;
use crate::server::Answer;

/// Pretty JSON followed by a newline.
pub fn json_text(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("a JSON value serializes");
    text.push('\n');
    text
}

/// The items of a listing, or a failure when the answer is not a JSON array.
pub fn items<'a>(answer: &'a Answer, url: &str) -> Result<&'a [Value], Failure> {
    match answer {
        Answer::Json(Value::Array(items)) => Ok(items),
        _ => Err(Failure::BadAnswer {
            url: url.to_string(),
            reason: "expected a JSON array".to_string(),
        }),
    }
}

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header.to_vec());
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    table
}

/// The table as text, without the trailing blanks of padded cells.
fn render(table: &Table) -> String {
    let mut out = String::new();
    for line in table.to_string().lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A field as display text: strings as they are, numbers and booleans written out, `-` when
/// missing or null.
fn field(item: &Value, names: &[&str]) -> String {
    names
        .iter()
        .find_map(|name| item.get(*name).filter(|v| !v.is_null()))
        .map_or_else(
            || "-".to_string(),
            |v| match v {
                Value::String(s) => s.clone(),
                Value::Bool(true) => "yes".to_string(),
                Value::Bool(false) => "no".to_string(),
                other => other.to_string(),
            },
        )
}

fn array<'a>(item: &'a Value, names: &[&str]) -> &'a [Value] {
    names
        .iter()
        .find_map(|name| item.get(*name).and_then(Value::as_array))
        .map_or(&[], Vec::as_slice)
}

/// `contexts`: one row per context, its members one per line as `node (ROLE)`.
pub fn contexts_table(items: &[Value]) -> String {
    if items.is_empty() {
        return "no contexts\n".to_string();
    }
    let mut t = table(&["CONTEXT", "LEADER", "MEMBERS"]);
    for item in items {
        let members: Vec<String> = array(item, &["roles", "members", "nodes"])
            .iter()
            .map(|m| match m {
                Value::String(node) => node.clone(),
                m => format!("{}[{}]", field(m, &["node", "nodeName", "name"]), field(m, &["role"])),
            })
            .collect();
        t.add_row(vec![
            field(item, &["context", "name"]),
            field(item, &["leader"]),
            if members.is_empty() {
                "-".to_string()
            } else {
                members.join("\n")
            },
        ]);
    }
    render(&t)
}

/// `nodes`: Axon's `/v1/public` fields.
pub fn nodes_table(items: &[Value]) -> String {
    if items.is_empty() {
        return "no nodes\n".to_string();
    }
    let mut t = table(&[
        "NAME",
        "HOST",
        "GRPC PORT",
        "HTTP PORT",
        "INTERNAL HOST",
        "INTERNAL PORT",
        "CONNECTED",
    ]);
    for item in items {
        t.add_row(vec![
            field(item, &["name"]),
            field(item, &["hostName"]),
            field(item, &["grpcPort"]),
            field(item, &["httpPort"]),
            field(item, &["internalHostName"]),
            field(item, &["grpcInternalPort"]),
            field(item, &["connected"]),
        ]);
    }
    render(&t)
}

/// `applications`: the first characters of the token (to tell tokens apart; the rest is never
/// shown again), roles one line per context, `context: ROLE, ROLE`.
pub fn applications_table(items: &[Value]) -> String {
    if items.is_empty() {
        return "no applications\n".to_string();
    }
    let mut t = table(&["NAME", "DESCRIPTION", "TOKEN", "ROLES"]);
    for item in items {
        let roles: Vec<String> = array(item, &["roles", "rolesPerContext"])
            .iter()
            .map(|r| {
                let names: Vec<String> = array(r, &["roles"])
                    .iter()
                    .map(|n| n.as_str().map_or_else(|| n.to_string(), str::to_string))
                    .collect();
                format!("{}: {}", field(r, &["context"]), names.join(", "))
            })
            .collect();
        t.add_row(vec![
            field(item, &["name", "applicationName"]),
            field(item, &["description"]),
            match field(item, &["tokenPrefix"]) {
                dash if dash == "-" => dash,
                prefix => format!("{prefix}..."),
            },
            if roles.is_empty() {
                "-".to_string()
            } else {
                roles.join("\n")
            },
        ]);
    }
    render(&t)
}

/// The text of an answer that carries one string: plain text, a JSON string, or an object with
/// one of `keys`.
pub fn single_text(answer: &Answer, keys: &[&str]) -> Option<String> {
    let text = match answer {
        Answer::Text(text) => Some(text.trim().to_string()),
        Answer::Json(Value::String(text)) => Some(text.trim().to_string()),
        Answer::Json(object) => keys
            .iter()
            .find_map(|k| object.get(*k).and_then(Value::as_str))
            .map(|s| s.trim().to_string()),
    };
    text.filter(|t| !t.is_empty())
}

/// Output of an action on a named thing (`kind` is `context` or `application`).
pub fn action(kind: &str, name: &str, status: &str, json_output: bool) -> String {
    if json_output {
        json_text(&json!({ kind: name, "status": status }))
    } else {
        format!("{kind} {name} {status}\n")
    }
}

/// Output of `register-application`: the token, and that it will not be shown again.
pub fn registered_application(name: &str, token: &str, json_output: bool) -> String {
    if json_output {
        json_text(&json!({ "application": name, "status": "registered", "token": token }))
    } else {
        format!(
            "application {name} registered\n\
             token: {token}\n\
             Store the token now: it is stored hashed and will not be shown again.\n"
        )
    }
}

/// Output of `backup-control-db`: the path alone (so `$(myelin-cli backup-control-db)` works).
pub fn backup_path(path: &str, json_output: bool) -> String {
    if json_output {
        json_text(&json!({ "path": path }))
    } else {
        format!("{path}\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_show_members_and_roles() {
        let items = json!([
            {"context": "default", "leader": "node-1", "roles": [{"node": "node-1", "role": "PRIMARY"}]},
            {"context": "orders", "roles": [
                {"node": "node-1", "role": "PRIMARY"}, {"node": "node-2", "role": "PASSIVE_BACKUP"}]},
            {"context": "empty"}
        ]);
        let text = contexts_table(items.as_array().unwrap());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[0].starts_with("CONTEXT") && lines[0].contains("MEMBERS"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("default") && lines[1].contains("node-1[PRIMARY]"),
            "{text}"
        );
        assert!(lines[2].starts_with("orders") && lines[2].contains(" - "), "{text}");
        assert!(lines[3].trim_start().starts_with("node-2[PASSIVE_BACKUP]"), "{text}");
        assert!(lines[4].starts_with("empty"), "{text}");
        assert!(text.lines().all(|l| l == l.trim_end()), "no trailing blanks");
        assert_eq!(contexts_table(&[]), "no contexts\n");
    }

    #[test]
    fn nodes_show_axons_fields() {
        let items = json!([{"name": "n1", "hostName": "h1", "grpcPort": 8124, "httpPort": 8024,
                            "internalHostName": "h1", "grpcInternalPort": 8224, "connected": true}]);
        let text = nodes_table(items.as_array().unwrap());
        let row = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["n1", "h1", "8124", "8024", "h1", "8224", "yes"], "{text}");
        let text = nodes_table(json!([{"name": "n2"}]).as_array().unwrap());
        assert!(text.lines().nth(1).unwrap().contains(" - "), "{text}");
    }

    #[test]
    fn applications_show_roles_per_context() {
        let items = json!([{"name": "billing", "description": "Billing", "tokenPrefix": "3f2a9c01",
            "roles": [{"context": "default", "roles": ["READ_EVENTS", "APPEND_EVENTS"]},
                      {"context": "*", "roles": ["MONITOR"]}]}]);
        let text = applications_table(items.as_array().unwrap());
        assert!(text.contains("default: READ_EVENTS, APPEND_EVENTS"), "{text}");
        assert!(text.contains("*: MONITOR"), "{text}");
        let row = text.lines().nth(1).unwrap();
        assert!(row.starts_with("billing") && row.contains("3f2a9c01..."), "{text}");
        assert_eq!(applications_table(&[]), "no applications\n");
    }

    #[test]
    fn listings_must_be_arrays() {
        assert!(items(&Answer::Json(json!({"a": 1})), "u").is_err());
        assert!(items(&Answer::Text("x".into()), "u").is_err());
        assert_eq!(items(&Answer::Json(json!([1])), "u").unwrap().len(), 1);
    }

    #[test]
    fn single_texts() {
        assert_eq!(
            single_text(&Answer::Text(" /b/c.zip\n".into()), &["path"]).as_deref(),
            Some("/b/c.zip")
        );
        assert_eq!(
            single_text(&Answer::Json(json!("tok")), &["token"]).as_deref(),
            Some("tok")
        );
        assert_eq!(
            single_text(&Answer::Json(json!({"token": "t1"})), &["token"]).as_deref(),
            Some("t1")
        );
        assert_eq!(single_text(&Answer::Json(json!({"x": "t1"})), &["token"]), None);
        assert_eq!(single_text(&Answer::Text(String::new()), &["token"]), None);
    }

    #[test]
    fn actions_in_both_formats() {
        assert_eq!(
            action("context", "orders", "created", false),
            "context orders created\n"
        );
        let v: Value = serde_json::from_str(&action("context", "orders", "created", true)).unwrap();
        assert_eq!(v, json!({"context": "orders", "status": "created"}));
        let text = registered_application("billing", "s3cr3t-token", false);
        assert!(
            text.contains("token: s3cr3t-token") && text.contains("not be shown again"),
            "{text}"
        );
        let v: Value = serde_json::from_str(&registered_application("billing", "t", true)).unwrap();
        assert_eq!(
            v,
            json!({"application": "billing", "status": "registered", "token": "t"})
        );
        assert_eq!(backup_path("/x/y.zip", false), "/x/y.zip\n");
        let v: Value = serde_json::from_str(&backup_path("/x/y.zip", true)).unwrap();
        assert_eq!(v, json!({"path": "/x/y.zip"}));
    }
}
