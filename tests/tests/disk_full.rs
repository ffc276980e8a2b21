//! A full disk: appends fail with an error instead of hanging or half-writing, nothing
//! unconfirmed is served, and once there is space again the node takes appends and still has
//! every confirmed event. Needs root (it mounts a small tmpfs), as CI and developers here are.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use myelin_tests::{Node, Options, append, event, read_all};

struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(size: &str) -> Mount {
        let dir = tempfile::Builder::new()
            .prefix("full")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(ok.success(), "mounting a tmpfs needs root");
        Mount(dir)
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn used(path: &Path) -> String {
    let out = Command::new("df").arg("-h").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_fail_cleanly_when_the_disk_is_full() {
    let mount = Mount::tmpfs("3m");
    let data = mount.0.join("data");
    let mut node = Node::start(Options {
        data_dir: Some(data),
        env: vec![("AXONIQ_AXONSERVER_EVENT_SEGMENT_SIZE".into(), "256KB".into())],
        ..Options::default()
    })
    .await;
    let mut client = node.lazy_client();
    let mut confirmed = Vec::new();
    let mut failures = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0i64;
    // Fill the disk; the first failures end the loop.
    while failures < 3 {
        assert!(Instant::now() < deadline, "the disk never filled: {}", used(&mount.0));
        let id = format!("f{i}");
        match append(&mut client, vec![event(&id, 0, &id)]).await {
            Ok(()) => confirmed.push(id),
            Err(status) => {
                failures += 1;
                assert_ne!(status.code(), tonic::Code::Ok);
            }
        }
        i += 1;
    }
    assert!(
        confirmed.len() > 100,
        "stored {} before the disk was full",
        confirmed.len()
    );
    // Space again, quickly (the supervisor restarts the eventstore with backoff meanwhile).
    mount.resize("64m");
    node.wait_ready(Duration::from_secs(60)).await;
    let mut client = node.client().await;
    let mut appended = false;
    for _ in 0..100 {
        if append(&mut client, vec![event("after-full", 0, "after-full")])
            .await
            .is_ok()
        {
            appended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(appended, "appends work again once there is space");
    let stored: Vec<String> = read_all(&mut client)
        .await
        .into_iter()
        .map(|(_, e)| e.message_identifier)
        .collect();
    let set: std::collections::HashSet<&String> = stored.iter().collect();
    assert_eq!(set.len(), stored.len(), "no event twice");
    for id in &confirmed {
        assert!(set.contains(id), "confirmed {id} lost");
    }
    assert_eq!(stored.last().map(String::as_str), Some("after-full"));
    node.stop();
}
