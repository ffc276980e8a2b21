//! Access-control roles and the operations they grant, shared by the router (which checks gRPC
//! calls) and admin (which stores applications' roles and checks HTTP calls).
//!
//! The role names and what each grants follow Axon Server's published operation-to-role matrix,
//! so an operator's existing role assignments mean the same here. A role is granted per context
//! (or for every context with `*`); `ADMIN` is node-wide.

use std::fmt;
use std::str::FromStr;

/// One role an application (or user) can hold in a context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Everything, in every context: cluster, contexts, applications, backups.
    Admin,
    /// Operating one context: processors, backups listings, client reconnects.
    ContextAdmin,
    DispatchCommands,
    DispatchQuery,
    /// Command counts and queues.
    Monitor,
    /// Append events and snapshots.
    PublishEvents,
    /// Read events and tokens, dispatch and handle queries.
    Read,
    /// Read events, snapshots and tokens.
    ReadEvents,
    SubscribeCommandHandler,
    SubscribeQueryHandler,
    /// Every client operation in the context, and operating it.
    UseContext,
    /// Listing contexts, nodes and applications.
    ViewConfiguration,
    /// Append events, dispatch and handle commands.
    Write,
}

impl Role {
    pub const ALL: [Role; 13] = [
        Role::Admin,
        Role::ContextAdmin,
        Role::DispatchCommands,
        Role::DispatchQuery,
        Role::Monitor,
        Role::PublishEvents,
        Role::Read,
        Role::ReadEvents,
        Role::SubscribeCommandHandler,
        Role::SubscribeQueryHandler,
        Role::UseContext,
        Role::ViewConfiguration,
        Role::Write,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Admin => "ADMIN",
            Role::ContextAdmin => "CONTEXT_ADMIN",
            Role::DispatchCommands => "DISPATCH_COMMANDS",
            Role::DispatchQuery => "DISPATCH_QUERY",
            Role::Monitor => "MONITOR",
            Role::PublishEvents => "PUBLISH_EVENTS",
            Role::Read => "READ",
            Role::ReadEvents => "READ_EVENTS",
            Role::SubscribeCommandHandler => "SUBSCRIBE_COMMAND_HANDLER",
            Role::SubscribeQueryHandler => "SUBSCRIBE_QUERY_HANDLER",
            Role::UseContext => "USE_CONTEXT",
            Role::ViewConfiguration => "VIEW_CONFIGURATION",
            Role::Write => "WRITE",
        }
    }

    /// Whether holding this role in a context allows `operation` there.
    pub fn grants(self, operation: Operation) -> bool {
        use Operation as O;
        match self {
            Role::Admin => true,
            Role::UseContext => operation.is_context_scoped(),
            Role::ContextAdmin => matches!(
                operation,
                O::Connect
                    | O::GetEventProcessors
                    | O::PauseEventProcessor
                    | O::StartEventProcessor
                    | O::SplitEventProcessorSegments
                    | O::MergeEventProcessorSegments
                    | O::ReconnectClient
                    | O::ListBackupFilenames
                    | O::ListBackupLogfiles
                    | O::ListClients
                    | O::ListHandlers
            ),
            Role::DispatchCommands => matches!(operation, O::Connect | O::DispatchCommand),
            Role::DispatchQuery => matches!(operation, O::Connect | O::DispatchQuery | O::DispatchSubscriptionQuery),
            Role::Monitor => matches!(operation, O::Connect | O::ListHandlers | O::ListClients),
            Role::PublishEvents => matches!(operation, O::Connect | O::AppendEvent | O::AppendSnapshot),
            Role::Read => matches!(
                operation,
                O::Connect
                    | O::DispatchQuery
                    | O::DispatchSubscriptionQuery
                    | O::HandleQueries
                    | O::ListEvents
                    | O::ListSnapshots
                    | O::GetTokens
                    | O::ReadHighestSequence
                    | O::SearchEvents
            ),
            Role::ReadEvents => matches!(
                operation,
                O::Connect | O::ListEvents | O::ListSnapshots | O::GetTokens | O::ReadHighestSequence | O::SearchEvents
            ),
            Role::SubscribeCommandHandler => matches!(operation, O::Connect | O::HandleCommands),
            Role::SubscribeQueryHandler => matches!(operation, O::Connect | O::HandleQueries),
            Role::ViewConfiguration => matches!(operation, O::ListContexts | O::ListNodes | O::ListApplications),
            Role::Write => matches!(
                operation,
                O::Connect | O::AppendEvent | O::AppendSnapshot | O::DispatchCommand | O::HandleCommands
            ),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A role name that is not one of [`Role::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown role {0:?}; known roles: ADMIN, CONTEXT_ADMIN, DISPATCH_COMMANDS, DISPATCH_QUERY, MONITOR, PUBLISH_EVENTS, READ, READ_EVENTS, SUBSCRIBE_COMMAND_HANDLER, SUBSCRIBE_QUERY_HANDLER, USE_CONTEXT, VIEW_CONFIGURATION, WRITE"
)]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| UnknownRole(s.to_owned()))
    }
}

/// What a caller wants to do: the unit access is checked on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Platform service: find the node, open the control stream.
    Connect,
    AppendEvent,
    AppendSnapshot,
    ListEvents,
    ListSnapshots,
    /// First, last and at-time tokens.
    GetTokens,
    ReadHighestSequence,
    SearchEvents,
    DispatchCommand,
    HandleCommands,
    DispatchQuery,
    DispatchSubscriptionQuery,
    HandleQueries,
    // Operator operations (HTTP API).
    ListContexts,
    CreateContext,
    DeleteContext,
    ListNodes,
    ListApplications,
    CreateApplication,
    DeleteApplication,
    CreateControlDbBackup,
    ListBackupFilenames,
    ListBackupLogfiles,
    ListClients,
    ListHandlers,
    GetEventProcessors,
    PauseEventProcessor,
    StartEventProcessor,
    SplitEventProcessorSegments,
    MergeEventProcessorSegments,
    ReconnectClient,
    /// Metrics and node status.
    Monitor,
}

impl Operation {
    /// Operations that act inside one context (and so are granted by `USE_CONTEXT` there).
    pub fn is_context_scoped(self) -> bool {
        use Operation as O;
        !matches!(
            self,
            O::ListContexts
                | O::CreateContext
                | O::DeleteContext
                | O::ListNodes
                | O::ListApplications
                | O::CreateApplication
                | O::DeleteApplication
                | O::CreateControlDbBackup
                | O::Monitor
        )
    }

    /// The operation a client gRPC method performs, by its full path
    /// (`/io.axoniq.axonserver.grpc.event.EventStore/AppendEvent`). `None` for methods that
    /// are not part of the client API (health, reflection): those are not checked.
    pub fn of_grpc_path(path: &str) -> Option<Operation> {
        use Operation as O;
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        let service = service.strip_prefix("io.axoniq.axonserver.grpc.")?;
        Some(match (service, method) {
            ("event.EventStore", "AppendEvent") => O::AppendEvent,
            ("event.EventStore", "AppendSnapshot") => O::AppendSnapshot,
            ("event.EventStore", "ListEvents" | "ListAggregateEvents") => O::ListEvents,
            ("event.EventStore", "ListAggregateSnapshots") => O::ListSnapshots,
            ("event.EventStore", "GetFirstToken" | "GetLastToken" | "GetTokenAt") => O::GetTokens,
            ("event.EventStore", "ReadHighestSequenceNr") => O::ReadHighestSequence,
            ("event.EventStore", "QueryEvents") => O::SearchEvents,
            // A scheduled event is appended later as any other: scheduling, rescheduling and
            // cancelling need the right to append events, as in Axon Server.
            ("event.EventScheduler", _) => O::AppendEvent,
            ("command.CommandService", "Dispatch") => O::DispatchCommand,
            ("command.CommandService", "OpenStream") => O::HandleCommands,
            ("query.QueryService", "Query") => O::DispatchQuery,
            ("query.QueryService", "Subscription") => O::DispatchSubscriptionQuery,
            ("query.QueryService", "OpenStream") => O::HandleQueries,
            ("control.PlatformService", _) => O::Connect,
            // Any other Axon service (present or future) is at least a context operation:
            // never let an unknown method through unchecked.
            _ => O::Connect,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.name().parse::<Role>().unwrap(), role);
        }
        assert_eq!("read_events".parse::<Role>().unwrap(), Role::ReadEvents);
        assert!("SUPERUSER".parse::<Role>().is_err());
    }

    #[test]
    fn roles_grant_what_axon_grants() {
        assert!(Role::PublishEvents.grants(Operation::AppendEvent));
        assert!(!Role::PublishEvents.grants(Operation::ListEvents));
        assert!(Role::ReadEvents.grants(Operation::ListEvents));
        assert!(!Role::ReadEvents.grants(Operation::AppendEvent));
        assert!(Role::Write.grants(Operation::HandleCommands));
        assert!(!Role::Write.grants(Operation::DispatchQuery));
        assert!(Role::Read.grants(Operation::HandleQueries));
        assert!(Role::UseContext.grants(Operation::DispatchCommand));
        assert!(!Role::UseContext.grants(Operation::CreateContext));
        assert!(Role::Admin.grants(Operation::CreateContext));
        assert!(Role::ViewConfiguration.grants(Operation::ListNodes));
        assert!(!Role::ViewConfiguration.grants(Operation::CreateApplication));
    }

    #[test]
    fn grpc_paths_map_to_operations() {
        let op = |p| Operation::of_grpc_path(p);
        assert_eq!(
            op("/io.axoniq.axonserver.grpc.event.EventStore/AppendEvent"),
            Some(Operation::AppendEvent)
        );
        assert_eq!(
            op("/io.axoniq.axonserver.grpc.command.CommandService/OpenStream"),
            Some(Operation::HandleCommands)
        );
        assert_eq!(
            op("/io.axoniq.axonserver.grpc.query.QueryService/Subscription"),
            Some(Operation::DispatchSubscriptionQuery)
        );
        assert_eq!(
            op("/io.axoniq.axonserver.grpc.control.PlatformService/GetPlatformServer"),
            Some(Operation::Connect)
        );
        assert_eq!(
            op("/io.axoniq.axonserver.grpc.event.EventScheduler/ScheduleEvent"),
            Some(Operation::AppendEvent)
        );
        assert_eq!(
            op("/io.axoniq.axonserver.grpc.event.EventScheduler/CancelScheduledEvent"),
            Some(Operation::AppendEvent)
        );
        assert_eq!(op("/grpc.health.v1.Health/Check"), None);
        assert_eq!(op("nonsense"), None);
    }
}
