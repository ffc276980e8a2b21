//! A history of appends as clients saw them, and the check that a node kept its promises.

use std::collections::HashMap;

use crate::{Node, read_aggregate, read_all};

/// What a client learned about one append (one transaction).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Confirmed: must survive.
    Ok,
    /// Rejected with a definite answer (sequence conflict): must not be stored.
    Rejected,
    /// No answer (connection lost): may or may not be stored, but whole if so.
    Indefinite,
}

#[derive(Debug, Clone)]
pub struct Op {
    /// Message identifiers of the transaction's events.
    pub ids: Vec<String>,
    pub outcome: Outcome,
}

/// Checks every promise against what the node now serves: tokens dense, no event twice,
/// aggregate sequences gapless, confirmed transactions whole, rejected ones absent, indefinite
/// ones all-or-nothing, and aggregate reads agreeing with the token order.
pub async fn check(node: &Node, ops: &[Op]) {
    let mut client = node.client().await;
    let all = read_all(&mut client).await;
    let mut position: HashMap<String, usize> = HashMap::new();
    let mut sequences: HashMap<String, Vec<i64>> = HashMap::new();
    for (i, (token, e)) in all.iter().enumerate() {
        assert_eq!(*token, i as i64, "tokens are dense");
        assert!(
            position.insert(e.message_identifier.clone(), i).is_none(),
            "event {} stored twice",
            e.message_identifier
        );
        sequences
            .entry(e.aggregate_identifier.clone())
            .or_default()
            .push(e.aggregate_sequence_number);
    }
    for (aggregate, seqs) in &sequences {
        let expected: Vec<i64> = (0..seqs.len() as i64).collect();
        assert_eq!(seqs, &expected, "aggregate {aggregate} sequences are gapless");
    }
    for op in ops {
        let present: Vec<bool> = op.ids.iter().map(|id| position.contains_key(id)).collect();
        match op.outcome {
            Outcome::Ok => assert!(present.iter().all(|p| *p), "confirmed {:?} lost", op.ids),
            Outcome::Rejected => assert!(present.iter().all(|p| !*p), "rejected {:?} stored", op.ids),
            Outcome::Indefinite => assert!(
                present.iter().all(|p| *p) || present.iter().all(|p| !*p),
                "transaction {:?} stored in part",
                op.ids
            ),
        }
    }
    for aggregate in sequences.keys().take(5) {
        let read = read_aggregate(&mut client, aggregate).await;
        assert_eq!(read.len(), sequences[aggregate].len(), "aggregate read of {aggregate}");
    }
}
