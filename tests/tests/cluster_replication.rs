//! A context replicated by its Raft group across real nodes: messages go from each eventstore
//! through its router, over the internal port, to the other nodes (issue 11, first part).
//!
//! The cluster configuration (`_admin`) does not decide membership yet: the test plays its part
//! over the nodes' Unix sockets (see `myelin_tests::cluster`).

use std::time::{Duration, Instant};

use myelin_proto::axon::event::event_store_client::EventStoreClient;
use myelin_proto::axon::event::{Event, GetAggregateEventsRequest, GetLastTokenRequest, ReadHighestSequenceNrRequest};
use myelin_tests::cluster::{Cluster, Replica, node_name, node_of};
use myelin_tests::{event, with_context};
use prost::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const CONTEXT: &str = "orders";

async fn client(cluster: &Cluster, i: usize) -> EventStoreClient<Channel> {
    EventStoreClient::new(cluster.nodes[i].channel().await)
}

/// Appends `count` transactions of three events each, on aggregates of their own, through node
/// `i`; returns how many were confirmed.
async fn append(cluster: &Cluster, i: usize, first: usize, count: usize) -> usize {
    let mut client = client(cluster, i).await;
    let mut confirmed = 0;
    for t in first..first + count {
        let events: Vec<Event> = (0..3)
            .map(|s| event(&format!("agg-{t}"), s, &format!("e-{t}-{s}")))
            .collect();
        client
            .append_event(with_context(tokio_stream::iter(events), CONTEXT))
            .await
            .unwrap_or_else(|e| panic!("append {t} through {}: {e}", node_name(i)));
        confirmed += 1;
    }
    confirmed
}

/// Every event node `i` serves from its own replica, as (token, encoded event).
async fn replica(cluster: &Cluster, i: usize) -> Replica {
    cluster.replica(i, CONTEXT).await
}

/// Waits until node `i`'s replica holds `count` events.
async fn wait_replica(cluster: &Cluster, i: usize, count: usize, within: Duration) -> Replica {
    let deadline = Instant::now() + within;
    loop {
        let events = replica(cluster, i).await;
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{} holds {} of {count} events after {within:?}",
            node_name(i),
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_same_replicas(cluster: &Cluster, replicas: &[(usize, Replica)]) {
    cluster.assert_same_replicas(CONTEXT, replicas);
}

/// Three nodes replicate a context: what the leader confirms is on every replica, with the same
/// tokens and byte-identical segment files. The leader is killed; the two others elect a new one
/// and take writes; the old leader comes back and catches up. A fourth node added as a member
/// receives the whole history.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_context_is_replicated_across_nodes_and_survives_its_leader() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster.create_context(CONTEXT, &[0, 1, 2]).await;
    let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    let status = cluster.status(leader, CONTEXT).await.unwrap();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3, "{status:?}");

    let confirmed = append(&cluster, leader, 0, 40).await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push((
            i,
            wait_replica(&cluster, i, confirmed * 3, Duration::from_secs(15)).await,
        ));
    }
    assert_same_replicas(&cluster, &replicas);

    // The leader's metrics say it leads, and each member's lag comes down to nothing.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = cluster.metrics(leader).await;
        assert!(
            text.contains(&format!("myelin_eventstore_raft_is_leader{{context=\"{CONTEXT}\"}} 1")),
            "{text}"
        );
        let lags: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("myelin_eventstore_raft_member_lag{") && l.contains(CONTEXT))
            .collect();
        if lags.len() == 2 && lags.iter().all(|l| l.ends_with(" 0")) {
            break;
        }
        assert!(Instant::now() < deadline, "members still lag: {lags:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The leader dies: the majority elects another and goes on.
    cluster.nodes[leader].crash();
    let started = Instant::now();
    let next = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    eprintln!(
        "leader {} killed; {} leads after {:?}",
        node_name(leader),
        node_name(next),
        started.elapsed()
    );
    assert_ne!(next, leader);
    let confirmed = confirmed + append(&cluster, next, 40, 20).await;

    // It comes back (its router learns the peers again, as admin will tell it) and catches up.
    cluster.nodes[leader].launch().await;
    cluster.set_peers().await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push((
            i,
            wait_replica(&cluster, i, confirmed * 3, Duration::from_secs(20)).await,
        ));
    }
    assert_same_replicas(&cluster, &replicas);

    // A fourth node joins the running group and receives the history.
    let fourth = cluster.add_node(&[]).await;
    let status = cluster.add_member(CONTEXT, fourth).await;
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 4, "{status:?}");
    let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    let confirmed = confirmed + append(&cluster, leader, 60, 5).await;
    let mut replicas = Vec::new();
    for i in 0..4 {
        replicas.push((
            i,
            wait_replica(&cluster, i, confirmed * 3, Duration::from_secs(20)).await,
        ));
    }
    assert_same_replicas(&cluster, &replicas);
}

/// A client may append through any member: a follower forwards the transaction to the leader,
/// and it is stored once, whole. With the majority gone, an append fails at once with
/// AXONIQ-2100 (UNAVAILABLE), and nothing of it is stored; once the majority is back, appends go
/// on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_forward_appends_and_a_minority_confirms_nothing() {
    let mut cluster = Cluster::start(3, &[]).await;
    cluster.create_context(CONTEXT, &[0, 1, 2]).await;
    let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    let followers: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    // Events confirmed so far.
    let mut confirmed = 0;
    for (k, follower) in followers.iter().enumerate() {
        confirmed += 3 * append(&cluster, *follower, k * 10, 10).await;
    }
    let events = wait_replica(&cluster, leader, confirmed, Duration::from_secs(10)).await;
    assert_eq!(events.len(), confirmed);

    // Aggregate reads and the last token on any member see every event confirmed before they
    // started: appended through one follower, read at once from the other.
    let mut writer = client(&cluster, followers[0]).await;
    let mut reader = client(&cluster, followers[1]).await;
    for round in 0..20 {
        let aggregate = format!("read-{round}");
        let events: Vec<Event> = (0..2)
            .map(|s| event(&aggregate, s, &format!("r-{round}-{s}")))
            .collect();
        writer
            .append_event(with_context(tokio_stream::iter(events), CONTEXT))
            .await
            .unwrap();
        confirmed += 2;
        // Asked first: an aggregate read would have made this replica catch up already.
        let last = reader
            .get_last_token(with_context(GetLastTokenRequest {}, CONTEXT))
            .await
            .unwrap()
            .into_inner()
            .token;
        assert_eq!(
            last,
            confirmed as i64 - 1,
            "round {round}: the other follower's last token missed a confirmed event"
        );
        let highest = reader
            .read_highest_sequence_nr(with_context(
                ReadHighestSequenceNrRequest {
                    aggregate_id: aggregate.clone(),
                    ..Default::default()
                },
                CONTEXT,
            ))
            .await
            .unwrap()
            .into_inner()
            .to_sequence_nr;
        assert_eq!(highest, 1, "round {round}: the other follower missed a confirmed event");
        let read: Vec<_> = reader
            .list_aggregate_events(with_context(
                GetAggregateEventsRequest {
                    aggregate_id: aggregate,
                    ..Default::default()
                },
                CONTEXT,
            ))
            .await
            .unwrap()
            .into_inner()
            .collect::<Vec<_>>()
            .await;
        assert_eq!(read.len(), 2, "round {round}");
    }
    // A conflicting transaction through a follower is refused as a whole, with Axon's code.
    let mut follower = client(&cluster, followers[0]).await;
    let conflict = vec![event("agg-0", 3, "new"), event("agg-0", 2, "dup")];
    let refused = follower
        .append_event(with_context(tokio_stream::iter(conflict), CONTEXT))
        .await
        .expect_err("a sequence conflict");
    assert_eq!(
        refused.metadata().get("axoniq-errorcode").and_then(|v| v.to_str().ok()),
        Some("AXONIQ-2000"),
        "{refused:?}"
    );

    // Concurrent appends through one follower travel to the leader in batches, each still its
    // own transaction with its own outcome: 48 appends race in pairs for the same aggregate
    // sequences, and exactly one of each pair is stored. Concurrent reads there share read
    // index rounds.
    let racer = followers[1];
    let before = cluster.metrics(racer).await;
    let mut racing = tokio::task::JoinSet::new();
    for k in 0..48 {
        let mut client = client(&cluster, racer).await;
        racing.spawn(async move {
            let events = vec![
                event(&format!("race-{}", k / 2), 0, &format!("race-{k}-0")),
                event(&format!("race-{}", k / 2), 1, &format!("race-{k}-1")),
            ];
            client
                .append_event(with_context(tokio_stream::iter(events), CONTEXT))
                .await
                .map(|_| ())
                .map_err(|e| {
                    e.metadata()
                        .get("axoniq-errorcode")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned()
                })
        });
    }
    let outcomes = racing.join_all().await;
    let stored = outcomes.iter().filter(|o| o.is_ok()).count();
    let refused: Vec<_> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert_eq!(stored, 24, "one of each pair: {outcomes:?}");
    assert!(refused.iter().all(|code| *code == "AXONIQ-2000"), "{refused:?}");
    confirmed += 2 * stored;
    let mut reading = tokio::task::JoinSet::new();
    for k in 0..32 {
        let mut client = client(&cluster, racer).await;
        reading.spawn(async move {
            client
                .list_aggregate_events(with_context(
                    GetAggregateEventsRequest {
                        aggregate_id: format!("race-{}", k % 24),
                        ..Default::default()
                    },
                    CONTEXT,
                ))
                .await
                .expect("an aggregate read")
                .into_inner()
                .collect::<Vec<_>>()
                .await
                .len()
        });
    }
    assert!(
        reading.join_all().await.iter().all(|read| *read == 2),
        "a read missed a stored event"
    );
    let after = cluster.metrics(racer).await;
    let grown = |name: &str| counter(&after, name) - counter(&before, name);
    let (appends, batches) = (
        grown("myelin_eventstore_forwarded_appends_total"),
        grown("myelin_eventstore_forward_batches_total"),
    );
    let (reads, rounds) = (
        grown("myelin_eventstore_read_index_reads_total"),
        grown("myelin_eventstore_read_index_rounds_total"),
    );
    eprintln!("48 racing appends: {appends} forwarded in {batches} messages; {reads} reads in {rounds} rounds");
    assert_eq!(appends, 48.0);
    assert!(batches < appends, "no batch carried two appends: {batches} messages");
    assert_eq!(reads, 32.0);
    assert!(rounds < reads, "no read index round was shared: {rounds} rounds");

    // The majority goes: the one left confirms nothing and says why, without hanging.
    let survivor = followers[0];
    for i in (0..3).filter(|i| *i != survivor) {
        cluster.nodes[i].crash();
    }
    let mut lonely = client(&cluster, survivor).await;
    let started = Instant::now();
    let failed = lonely
        .append_event(with_context(tokio_stream::iter(vec![event("lonely", 0, "l")]), CONTEXT))
        .await
        .expect_err("no majority, no confirmation");
    let waited = started.elapsed();
    eprintln!("minority append failed after {waited:?}: {failed:?}");
    assert_eq!(failed.code(), tonic::Code::Unavailable, "{failed:?}");
    assert!(waited < Duration::from_secs(10), "took {waited:?}");

    // The majority returns: a leader again, appends go on, the failed one was never stored.
    for i in (0..3).filter(|i| *i != survivor) {
        cluster.nodes[i].launch().await;
    }
    cluster.set_peers().await;
    let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    let confirmed = confirmed + 3 * append(&cluster, survivor, 100, 3).await;
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push((i, wait_replica(&cluster, i, confirmed, Duration::from_secs(20)).await));
    }
    for (_, events) in &replicas {
        assert_eq!(events.len(), confirmed, "only confirmed events, once each");
        for (_, bytes) in events {
            let event = Event::decode(bytes.as_slice()).unwrap();
            assert_ne!(event.aggregate_identifier, "lonely", "an unconfirmed append was stored");
        }
    }
    assert_same_replicas(&cluster, &replicas);
    let _ = leader;
}

/// The value of counter `name` of context `orders` in a Prometheus text.
fn counter(text: &str, name: &str) -> f64 {
    let series = format!("{name}{{context=\"{CONTEXT}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// With access control on, node-to-node calls carry the cluster's internal token: two nodes with
/// the same token form the group's majority; a third with another token is refused by them (and
/// refuses them), says so in its log, and receives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_to_node_calls_need_the_internal_token() {
    let on = ("AXONIQ_AXONSERVER_ACCESSCONTROL_ENABLED", "true");
    let admin = ("AXONIQ_AXONSERVER_ACCESSCONTROL_ADMIN_TOKEN", "admin-token");
    let mut cluster = Cluster::start(
        3,
        &[on, admin, ("AXONIQ_AXONSERVER_ACCESSCONTROL_INTERNAL_TOKEN", "shared")],
    )
    .await;
    // The third node joined with the cluster's token; it comes back with another one.
    let stranger = 2;
    cluster.nodes[stranger].stop();
    cluster.nodes[stranger].set_env("AXONIQ_AXONSERVER_ACCESSCONTROL_INTERNAL_TOKEN", "another");
    cluster.nodes[stranger].launch().await;
    cluster.create_context(CONTEXT, &[0, 1, stranger]).await;

    // n1 and n2 elect a leader between them: their calls get through.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = cluster.status(0, CONTEXT).await.unwrap();
        if let Some(leader) = status.leader
            && let Some(leads) = cluster.status(node_of(leader), CONTEXT).await
            && leads.leader == Some(leader)
            && leads
                .members
                .iter()
                .any(|m| m.matched_index.is_some() && m.node == node_name(1 - node_of(leader)))
        {
            break leads;
        }
        assert!(
            Instant::now() < deadline,
            "no leader among the nodes with the same token: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The stranger matched nothing, knows no leader, and logged the refusals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stranger_name = node_name(stranger);
    let seen = cluster.status(node_of(status.leader.unwrap()), CONTEXT).await.unwrap();
    let member = seen.members.iter().find(|m| m.node == stranger_name).unwrap();
    assert_eq!(member.matched_index, None, "{seen:?}");
    assert_eq!(cluster.status(stranger, CONTEXT).await.unwrap().leader, None);
    let refused = |i: usize| cluster.nodes[i].log_text().contains("refused a node-to-node call");
    assert!(refused(stranger), "the stranger did not log the refused calls");
    assert!(refused(0) || refused(1), "n1 and n2 did not log the stranger's calls");
}

/// A member is a voter only once it holds the group's history. The leader is asked to add a
/// node whose event store has not opened the context: it stays a learner (counting towards no
/// majority) for as long as it does not answer, and becomes a voter once it opened the context
/// and acknowledged what the group holds. (openraft's own check counted a learner that never
/// answered as caught up while the log was short, and made it a voter at once.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_that_never_answered_is_not_made_a_voter() {
    use myelin_proto::internal::{AddMemberRequest, GroupMember, JoinContextRequest};
    use myelin_tests::cluster::member_id;
    let cluster = Cluster::start(2, &[]).await;
    cluster.create_context(CONTEXT, &[0]).await;
    let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    let confirmed = append(&cluster, leader, 0, 10).await;
    let mut control = cluster.storage_control(leader);
    let adding = tokio::spawn(async move {
        control
            .add_member(AddMemberRequest {
                context: CONTEXT.to_owned(),
                member: Some(GroupMember {
                    id: member_id(1),
                    node: node_name(1),
                    voter: true,
                    matched_index: None,
                }),
            })
            .await
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = cluster.status(leader, CONTEXT).await.unwrap();
    let second = status.members.iter().find(|m| m.id == member_id(1));
    assert!(
        second.is_some_and(|m| !m.voter),
        "n2 must be a learner while it has not opened the context: {status:?}"
    );
    assert!(
        !adding.is_finished(),
        "the change finished before n2 answered: {status:?}"
    );

    cluster
        .storage_control(1)
        .join_context(JoinContextRequest {
            name: CONTEXT.to_owned(),
            member_id: member_id(1),
            initial_members: Vec::new(),
        })
        .await
        .expect("n2 opens the context");
    let status = tokio::time::timeout(Duration::from_secs(30), adding)
        .await
        .expect("the member is added once it answers")
        .unwrap()
        .expect("add member")
        .into_inner();
    let second = status.members.iter().find(|m| m.id == member_id(1)).unwrap();
    assert!(second.voter, "{status:?}");
    assert!(second.matched_index.is_some(), "{status:?}");
    let replica = wait_replica(&cluster, 1, confirmed * 3, Duration::from_secs(15)).await;
    assert_eq!(
        replica,
        wait_replica(&cluster, leader, confirmed * 3, Duration::from_secs(1)).await
    );
}

/// The leader's node freezes (SIGSTOP on all its processes, as a long pause or a stalled VM
/// would): its sockets stay open and nothing answers. A read on a follower never hangs on it:
/// within a few seconds it is answered (by way of the new leader) or refused with AXONIQ-2100.
/// The two others elect a leader and take writes; the frozen node, let go, steps down and
/// catches up, and every replica ends the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_leader_holds_no_read_and_no_write() {
    use nix::sys::signal::Signal;
    let cluster = Cluster::start(3, &[]).await;
    cluster.create_context(CONTEXT, &[0, 1, 2]).await;
    let leader = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    let mut confirmed = append(&cluster, leader, 0, 20).await;
    for i in 0..3 {
        wait_replica(&cluster, i, confirmed * 3, Duration::from_secs(15)).await;
    }
    let follower = (leader + 1) % 3;
    let mut reader = client(&cluster, follower).await;

    cluster.nodes[leader].signal_all(Signal::SIGSTOP);
    let frozen = Instant::now();
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        reader.get_last_token(with_context(GetLastTokenRequest {}, CONTEXT)),
    )
    .await;
    eprintln!(
        "a read on {} while {} is frozen: {read:?} after {:?}",
        node_name(follower),
        node_name(leader),
        frozen.elapsed()
    );
    match read {
        Err(_) => panic!("a read on a follower hung for 10 s behind the frozen leader"),
        Ok(Ok(token)) => assert!(token.into_inner().token >= confirmed as i64 * 3 - 1),
        Ok(Err(status)) => assert!(
            status.code() == tonic::Code::Unavailable && status.message().contains("AXONIQ-2100"),
            "{status:?}"
        ),
    }

    // The others elect one of themselves and take writes through either of them.
    let deadline = Instant::now() + Duration::from_secs(20);
    let next = loop {
        let statuses: Vec<_> = [follower, 3 - leader - follower]
            .iter()
            .map(|&i| (i, cluster.status(i, CONTEXT)))
            .collect();
        let mut leaders = Vec::new();
        for (_, status) in statuses {
            leaders.push(status.await.and_then(|s| {
                s.leader
                    .and_then(|id| s.members.iter().find(|m| m.id == id))
                    .map(|m| m.node.clone())
            }));
        }
        if let [Some(a), Some(b)] = &leaders[..]
            && a == b
            && *a != node_name(leader)
        {
            break myelin_tests::cluster::index_of(a).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no new leader while {} is frozen: {leaders:?}",
            node_name(leader)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("{} leads {:?} after the freeze", node_name(next), frozen.elapsed());
    confirmed += append(&cluster, follower, 20, 10).await;
    let token = reader
        .get_last_token(with_context(GetLastTokenRequest {}, CONTEXT))
        .await
        .expect("a read on the follower once a new leader leads")
        .into_inner()
        .token;
    assert_eq!(token, confirmed as i64 * 3 - 1);

    // Let go, the old leader learns of the new term, follows, and catches up.
    cluster.nodes[leader].signal_all(Signal::SIGCONT);
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push((
            i,
            wait_replica(&cluster, i, confirmed * 3, Duration::from_secs(20)).await,
        ));
    }
    assert_same_replicas(&cluster, &replicas);
    let now = cluster.wait_leader(CONTEXT, Duration::from_secs(15)).await;
    confirmed += append(&cluster, leader, 30, 5).await;
    for i in 0..3 {
        wait_replica(&cluster, i, confirmed * 3, Duration::from_secs(20)).await;
    }
    eprintln!("{} leads at the end", node_name(now));
}
