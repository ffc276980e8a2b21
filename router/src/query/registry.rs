//! Who handles what: the query handlers of one context, by query name.
//!
//! Routing picks one handler per component (an application may run several instances; any one
//! of them answers for the component), round-robin among a component's instances. How a chosen
//! handler is reached is its [`Destination`]'s business, not the registry's.
//!
//! Handlers are matched by query name only, as Axon Server does: it keys registrations by
//! (context, query name) and keeps the `result_name`s handlers subscribe with only to show them.
//! A query's `response_type` is not consulted either: the handling application picks the
//! handler method that fits the response type itself (Axon Framework registers one subscription
//! per query name and result type, all on the same stream). So a handler is never skipped
//! because its result name differs from what the dispatcher expects; the result names are kept
//! per handler and query for the admin API ([`Registry::result_names`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::handler::{Destination, HandlerId};

/// One handler's subscription to one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub component: String,
    pub client_id: String,
    /// Result types the handler said it produces for this query (informational).
    pub result_names: BTreeSet<String>,
}

#[derive(Default)]
pub struct Registry {
    destinations: HashMap<HandlerId, Destination>,
    /// query name -> handler -> registration. Ordered so that round-robin is stable.
    by_query: HashMap<String, BTreeMap<HandlerId, Registration>>,
    /// (query name, component) -> next instance to use.
    next: HashMap<(String, String), usize>,
}

impl Registry {
    /// Records that `handler` answers `query`; returns false if it already did (a second
    /// subscription, e.g. for another result type, only adds its result names).
    pub fn subscribe(
        &mut self,
        handler: HandlerId,
        destination: &Destination,
        query: &str,
        registration: Registration,
    ) -> bool {
        self.destinations.entry(handler).or_insert_with(|| destination.clone());
        let handlers = self.by_query.entry(query.to_owned()).or_default();
        match handlers.get_mut(&handler) {
            Some(existing) => {
                existing.result_names.extend(registration.result_names);
                existing.component = registration.component;
                existing.client_id = registration.client_id;
                false
            }
            None => {
                handlers.insert(handler, registration);
                true
            }
        }
    }

    pub fn unsubscribe(&mut self, handler: HandlerId, query: &str) {
        if let Some(handlers) = self.by_query.get_mut(query) {
            handlers.remove(&handler);
            if handlers.is_empty() {
                self.by_query.remove(query);
                self.next.retain(|(q, _), _| q != query);
            }
        }
    }

    /// Forgets a handler and all its subscriptions.
    pub fn remove(&mut self, handler: HandlerId) {
        self.destinations.remove(&handler);
        let queries: Vec<String> = self
            .by_query
            .iter()
            .filter(|(_, handlers)| handlers.contains_key(&handler))
            .map(|(query, _)| query.clone())
            .collect();
        for query in queries {
            self.unsubscribe(handler, &query);
        }
    }

    /// One handler per component for `query`, advancing each component's round-robin.
    pub fn pick(&mut self, query: &str) -> Vec<(HandlerId, Destination)> {
        let Some(handlers) = self.by_query.get(query) else {
            return Vec::new();
        };
        let mut components: BTreeMap<&str, Vec<HandlerId>> = BTreeMap::new();
        for (id, registration) in handlers {
            components.entry(&registration.component).or_default().push(*id);
        }
        let mut chosen = Vec::with_capacity(components.len());
        for (component, instances) in components {
            let next = self.next.entry((query.to_owned(), component.to_owned())).or_default();
            let id = instances[*next % instances.len()];
            *next = next.wrapping_add(1);
            if let Some(destination) = self.destinations.get(&id) {
                chosen.push((id, destination.clone()));
            }
        }
        chosen
    }

    /// Every handler of `query` (subscription queries go to all instances).
    pub fn all(&self, query: &str) -> Vec<(HandlerId, Destination)> {
        self.by_query
            .get(query)
            .into_iter()
            .flat_map(|handlers| handlers.keys())
            .filter_map(|id| self.destinations.get(id).map(|d| (*id, d.clone())))
            .collect()
    }

    pub fn destination(&self, handler: HandlerId) -> Option<Destination> {
        self.destinations.get(&handler).cloned()
    }

    /// Result names the handlers of `query` subscribed with, for display.
    pub fn result_names(&self, query: &str) -> BTreeSet<String> {
        self.by_query
            .get(query)
            .into_iter()
            .flat_map(|handlers| handlers.values())
            .flat_map(|registration| registration.result_names.iter().cloned())
            .collect()
    }

    /// Every subscription: (query name, handler, registration), for the admin API.
    pub fn registrations(&self) -> Vec<(String, HandlerId, Registration)> {
        self.by_query
            .iter()
            .flat_map(|(query, handlers)| handlers.iter().map(move |(id, r)| (query.clone(), *id, r.clone())))
            .collect()
    }

    /// Query names a handler answers.
    pub fn queries_of(&self, handler: HandlerId) -> Vec<String> {
        self.by_query
            .iter()
            .filter(|(_, handlers)| handlers.contains_key(&handler))
            .map(|(query, _)| query.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::handler::LocalHandler;

    fn registration(component: &str) -> Registration {
        registration_of(component, "")
    }

    fn registration_of(component: &str, result_name: &str) -> Registration {
        Registration {
            component: component.into(),
            client_id: String::new(),
            result_names: [result_name.to_owned()].into(),
        }
    }

    /// Result names do not take part in routing: every component of the query is picked,
    /// whatever result name it subscribed with; a second subscription of the same handler with
    /// another result name adds the name without making it a second handler.
    #[tokio::test]
    async fn result_names_are_recorded_not_routed_on() {
        let mut registry = Registry::default();
        let destination = Destination::Local(LocalHandler::start().0);
        assert!(registry.subscribe(1, &destination, "q", registration_of("a", "java.util.List")));
        assert!(!registry.subscribe(1, &destination, "q", registration_of("a", "java.lang.String")));
        assert!(registry.subscribe(2, &destination, "q", registration_of("b", "com.example.Other")));
        let ids: Vec<HandlerId> = registry.pick("q").into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, [1, 2]);
        assert_eq!(
            registry.result_names("q"),
            BTreeSet::from([
                "com.example.Other".to_owned(),
                "java.lang.String".into(),
                "java.util.List".into()
            ])
        );
        assert_eq!(registry.all("q").len(), 2);
    }

    #[tokio::test]
    async fn one_handler_per_component_round_robin() {
        let mut registry = Registry::default();
        let destination = Destination::Local(LocalHandler::start().0);
        registry.subscribe(1, &destination, "q", registration("a"));
        registry.subscribe(2, &destination, "q", registration("a"));
        registry.subscribe(3, &destination, "q", registration("b"));
        let ids = |picked: Vec<(HandlerId, Destination)>| picked.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
        assert_eq!(ids(registry.pick("q")), vec![1, 3]);
        assert_eq!(ids(registry.pick("q")), vec![2, 3]);
        assert_eq!(ids(registry.pick("q")), vec![1, 3]);
        registry.remove(1);
        assert_eq!(ids(registry.pick("q")), vec![2, 3]);
        registry.unsubscribe(3, "q");
        assert_eq!(ids(registry.pick("q")), vec![2]);
        assert!(registry.pick("other").is_empty());
        assert_eq!(registry.all("q").len(), 1);
    }
}
