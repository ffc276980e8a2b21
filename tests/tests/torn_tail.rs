//! Torn tails: damage the end of the open event segment and of the Raft log while the node is
//! down; on restart every confirmed event is still served and the damage is cut away.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use myelin_tests::{Node, Options, append, event, read_aggregate, read_all};

fn newest(dir: &Path, suffix: &str) -> PathBuf {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == suffix))
        .collect();
    files.sort();
    files
        .pop()
        .unwrap_or_else(|| panic!("no .{suffix} file in {}", dir.display()))
}

async fn filled_node() -> (Node, Vec<String>) {
    let node = Node::start(Options::default()).await;
    let mut client = node.client().await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let id = format!("t{i}");
        append(&mut client, vec![event("torn", i, &id)]).await.unwrap();
        ids.push(id);
    }
    (node, ids)
}

async fn assert_all_there(node: &Node, ids: &[String]) {
    let mut client = node.client().await;
    let all: Vec<String> = read_all(&mut client)
        .await
        .into_iter()
        .map(|(_, e)| e.message_identifier)
        .collect();
    assert_eq!(all, ids);
    assert_eq!(read_aggregate(&mut client, "torn").await.len(), ids.len());
    // And the node still takes appends at the right sequence.
    append(&mut client, vec![event("torn", ids.len() as i64, "after")])
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_last_record_is_cut_away() {
    let (mut node, ids) = filled_node().await;
    node.stop();
    let context = node.data.join("default");
    for file in [
        newest(&context.join("events"), "events"),
        newest(&context.join("log"), "log"),
    ] {
        // A torn write of a record that was never confirmed: a length prefix and some bytes.
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]).unwrap();
    }
    node.launch().await;
    assert_all_there(&node, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_event_segment_is_refilled_from_the_log() {
    let (mut node, ids) = filled_node().await;
    node.stop();
    let segment = newest(&node.data.join("default/events"), "events");
    let len = std::fs::metadata(&segment).unwrap().len();
    // Lose the last record and a half: the Raft log still holds those entries.
    let f = OpenOptions::new().write(true).open(&segment).unwrap();
    f.set_len(len - 300).unwrap();
    drop(f);
    node.launch().await;
    assert_all_there(&node, &ids).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_log_tail_keeps_what_the_segments_hold() {
    let (mut node, ids) = filled_node().await;
    node.stop();
    let log = newest(&node.data.join("default/log"), "log");
    let len = std::fs::metadata(&log).unwrap().len();
    let f = OpenOptions::new().write(true).open(&log).unwrap();
    f.set_len(len - 5).unwrap();
    drop(f);
    node.launch().await;
    assert_all_there(&node, &ids).await;
}
