//! Datapath debug events: why a program passed, rejected or dropped a packet, or that it
//! began a flow. The programs log the event's code (aya-log, see lb-ebpf `event.rs`); the
//! agent writes the text. A string sent from the datapath cost the verifier a byte-copy
//! loop per call site: a third of the instructions it walked for each program.

/// One kind of debug event. The code is the enum's value (`as u8`), stable within a build:
/// the agent and the programs are built together.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugEvent {
    NewFlow = 0,
    PassedNoService,
    RejectedNoEndpoint,
    RejectedUnusedClusterIpPort,
    DroppedUnheldServiceCidrAddress,
    DroppedStaleReply,
    DroppedPodNotInSourceRanges,
    DroppedClientNotInSourceRanges,
    DroppedNoLocalEndpointOrSnatPort,
}

impl DebugEvent {
    /// Every event, in code order.
    pub const ALL: [DebugEvent; 9] = [
        DebugEvent::NewFlow,
        DebugEvent::PassedNoService,
        DebugEvent::RejectedNoEndpoint,
        DebugEvent::RejectedUnusedClusterIpPort,
        DebugEvent::DroppedUnheldServiceCidrAddress,
        DebugEvent::DroppedStaleReply,
        DebugEvent::DroppedPodNotInSourceRanges,
        DebugEvent::DroppedClientNotInSourceRanges,
        DebugEvent::DroppedNoLocalEndpointOrSnatPort,
    ];

    /// The event of a code, None for a code this build does not have.
    pub fn from_code(code: u8) -> Option<DebugEvent> {
        DebugEvent::ALL.get(code as usize).copied()
    }

    /// What the agent logs for the event (before the packet's protocol and addresses).
    pub fn text(self) -> &'static str {
        match self {
            DebugEvent::NewFlow => "new flow",
            DebugEvent::PassedNoService => "passed: no service or flow",
            DebugEvent::RejectedNoEndpoint => "rejected: service has no serving endpoint",
            DebugEvent::RejectedUnusedClusterIpPort => "rejected: ClusterIP port no service uses",
            DebugEvent::DroppedUnheldServiceCidrAddress => {
                "dropped: service CIDR address no Service holds"
            }
            DebugEvent::DroppedStaleReply => "dropped: reply of a flow that is over",
            DebugEvent::DroppedPodNotInSourceRanges => {
                "dropped: pod not in loadBalancerSourceRanges"
            }
            DebugEvent::DroppedClientNotInSourceRanges => {
                "dropped: client not in loadBalancerSourceRanges"
            }
            DebugEvent::DroppedNoLocalEndpointOrSnatPort => {
                "dropped: no endpoint for this node or no SNAT port"
            }
        }
    }
}

/// The prefix of an event record's message, before its code (see lb-ebpf `event.rs`).
pub const DEBUG_EVENT_PREFIX: &str = "event ";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_enum_values_in_order() {
        for (i, e) in DebugEvent::ALL.iter().enumerate() {
            assert_eq!(*e as u8 as usize, i);
            assert_eq!(DebugEvent::from_code(i as u8), Some(*e));
        }
        assert_eq!(DebugEvent::from_code(DebugEvent::ALL.len() as u8), None);
    }
}
