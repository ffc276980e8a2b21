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

/// Issue 16, defect 3, with the real children: a port in use made the node retry for ~43 s
/// (the child that could not listen restarted until the supervisor gave up) while the others
/// answered. Now the first start exits with code 1 within a second or two, naming the port.
#[test]
fn a_port_in_use_fails_the_first_start_at_once() {
    use std::time::{Duration, Instant};
    let dir = tempfile::Builder::new().prefix("my").tempdir_in("/tmp").unwrap();
    let ports = myelin_tests::free_ports(3);
    let _taken = std::net::TcpListener::bind(("127.0.0.1", ports[1])).unwrap();
    let since = Instant::now();
    let mut child = std::process::Command::new(myelin_tests::binary())
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .args(["--bind-address", "127.0.0.1"])
        .args(["--port", &ports[0].to_string()])
        .args(["--http-port", &ports[1].to_string()])
        .args(["--internal-port", &ports[2].to_string()])
        .env("RUST_LOG", "info")
        .env_remove("RUNTIME_DIRECTORY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if since.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the node still runs {:?} after its start with port {} in use",
                since.elapsed(),
                ports[1]
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = since.elapsed();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(took < Duration::from_secs(3), "took {took:?}: {stderr}");
    assert!(stderr.contains(&format!("port {} (server.port)", ports[1])), "{stderr}");
}

/// Issue 16, defect 6: almost every start logged a WARN "cannot yet align the control DB with the
/// event store": admin asks before the event store serves, a race of every start that is no
/// operator's concern. Now it is a debug line until it has lasted 10 s. The race is made certain
/// here: the test holds the event store's lock for 2 s, so the event store serves late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_event_store_at_start_is_not_a_warning() {
    use nix::fcntl::{Flock, FlockArg};
    let dir = tempfile::Builder::new().prefix("my").tempdir_in("/tmp").unwrap();
    let data = dir.path().join("d");
    std::fs::create_dir(&data).unwrap();
    let file = std::fs::File::create(data.join("eventstore.lock")).unwrap();
    let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).unwrap();
    let release = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_secs(2));
        drop(lock);
    });
    let mut node = Node::start(Options {
        data_dir: Some(data),
        ..Options::default()
    })
    .await;
    release.join().unwrap();
    node.stop();
    let log = node.log_text();
    assert!(
        log.contains("data directory locked by another eventstore"),
        "the event store did not wait:\n{log}"
    );
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("align the control DB"))
        .collect();
    assert!(warnings.is_empty(), "{}", warnings.join("\n"));
}

/// Issue 16, defect 7: a call to a service Myelin does not serve (Axon's
/// EventTransformationService) is answered UNIMPLEMENTED with a message naming the method and
/// service, and the node logs it once per method, however often it is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unserved_method_is_unimplemented_named_and_logged_once() {
    use myelin_proto::axon::event::{ScheduleEventRequest, ScheduleToken};
    const PATH: &str = "/io.axoniq.axonserver.grpc.event.EventTransformationService/StartTransformation";
    let node = Node::start(Options::default()).await;
    let mut client = tonic::client::Grpc::new(node.channel().await);
    for _ in 0..3 {
        client.ready().await.unwrap();
        // Any message will do as the body: the method is refused before it is read.
        let status = client
            .unary::<_, ScheduleToken, _>(
                tonic::Request::new(ScheduleEventRequest::default()),
                PATH.parse().unwrap(),
                tonic_prost::ProstCodec::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
        assert_eq!(
            status.message(),
            "Myelin does not implement method StartTransformation of service \
             io.axoniq.axonserver.grpc.event.EventTransformationService"
        );
    }
    let logged = |log: &str| {
        log.lines()
            .filter(|l| l.contains("does not implement") && l.contains("method=\"StartTransformation\""))
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while logged(&node.log_text()) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(logged(&node.log_text()), 1, "{}", node.log_text());
}
