//! Who handles what: the query handlers of one context, by query name.
//!
//! Routing picks one handler per component (an application may run several instances; any one
//! of them answers for the component), round-robin among a component's instances. How a chosen
//! handler is reached is its [`Destination`]'s business, not the registry's.

use std::collections::{BTreeMap, HashMap};

use super::handler::{Destination, HandlerId};

/// One handler's subscription to one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub component: String,
    pub client_id: String,
    pub result_name: String,
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
    /// Records that `handler` answers `query`; returns false if it already did.
    pub fn subscribe(
        &mut self,
        handler: HandlerId,
        destination: &Destination,
        query: &str,
        registration: Registration,
    ) -> bool {
        self.destinations.entry(handler).or_insert_with(|| destination.clone());
        self.by_query
            .entry(query.to_owned())
            .or_default()
            .insert(handler, registration)
            .is_none()
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
        Registration {
            component: component.into(),
            client_id: String::new(),
            result_name: String::new(),
        }
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
