//! The node as an operator sees it: separate processes, the admin status endpoints.

use myelin_tests::http::request;
use myelin_tests::{Node, Options, append, event};

/// Status and body of a GET to admin.
async fn http_get(port: u16, path: &str) -> (u16, String) {
    let reply = request(port, "GET", path, None, None).await;
    (reply.status, reply.body)
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_a_separate_process() {
    let node = Node::start(Options::default()).await;
    let supervisor = node.supervisor_pid().unwrap();
    let mut pids = vec![supervisor];
    for role in ["eventstore", "router", "admin"] {
        let pid = node.child_pid(role).unwrap_or_else(|| panic!("{role} pid file"));
        let args = cmdline(pid);
        assert_eq!(args.get(1).map(String::as_str), Some(role), "{role}: {args:?}");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let ppid: i32 = stat
            .rsplit(") ")
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ppid, supervisor, "{role} is a child of the supervisor");
        pids.push(pid);
    }
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_node_and_context_positions() {
    let node = Node::start(Options::default()).await;
    let mut client = node.client().await;
    for i in 0..3 {
        append(&mut client, vec![event("admin-agg", i, &format!("a{i}"))])
            .await
            .unwrap();
    }
    let (status, body) = http_get(node.http_port, "/v1/public/me").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"contextNames\":[\"_admin\",\"default\"]"), "{body}");
    assert!(body.contains("\"storageContextNames\":[\"default\"]"), "{body}");
    assert!(
        body.contains("{\"name\":\"default\",\"firstToken\":0,\"lastToken\":2,\"lastSnapshotToken\":-1}"),
        "{body}"
    );
    assert!(body.contains(&format!("\"grpcPort\":{}", node.grpc_port)), "{body}");
    let (status, page) = http_get(node.http_port, "/").await;
    assert_eq!(status, 200);
    assert!(page.contains("<td>default</td><td>2</td>"), "{page}");
    let (status, body) = http_get(node.http_port, "/no/such/page").await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        r#"{"code":"AXONIQ-0001","message":"no such resource: /no/such/page"}"#
    );
}
