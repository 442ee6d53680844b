//! Datapath debug events (aya-log): none while `CFG_DEBUG_EVENTS` is off (the default);
//! once on, each pass, reject and drop decision and each new flow names itself and the
//! packet's addresses.
use super::*;

fn set_debug(on: bool) -> Step {
    Step::Maps(
        "switch debug events",
        Box::new(move |v| {
            let mut c = v.agent.config.get(&0, 0).unwrap();
            c.flags = if on {
                c.flags | CFG_DEBUG_EVENTS
            } else {
                c.flags & !CFG_DEBUG_EVENTS
            };
            v.agent.config.set(0, c, 0).unwrap();
        }),
    )
}

fn reject_case(sport: u16) -> Step {
    case(
        "no endpoints, TCP SYN -> RST|ACK",
        syn(sport, NODE, 30090).bytes(),
        rst_for(&syn(sport, NODE, 30090)),
        XDP_TX,
    )
}

#[test]
fn off_by_default_then_switched_on_and_off() {
    let Some(_guard) = privileged() else {
        return;
    };
    run_table(
        vec![
            reject_case(40060),
            untouched("no service", syn(40061, NODE, 22).bytes()),
            Step::Events(
                "off by default",
                Box::new(|ev| assert!(ev.is_empty(), "events while off: {ev:?}")),
            ),
            set_debug(true),
            reject_case(40062),
            untouched("no service", syn(40063, NODE, 22).bytes()),
            Step::Events(
                "on",
                Box::new(|ev| {
                    assert_eq!(ev.len(), 2, "{ev:?}");
                    assert_eq!(
                        ev[0],
                        "rejected: service has no serving endpoint proto 6 \
                         172.30.0.100:40062 -> 172.30.0.2:30090"
                    );
                    assert_eq!(
                        ev[1],
                        "passed: no service or flow proto 6 172.30.0.100:40063 -> 172.30.0.2:22"
                    );
                }),
            ),
            set_debug(false),
            reject_case(40064),
            Step::Events(
                "off again",
                Box::new(|ev| assert!(ev.is_empty(), "events while off: {ev:?}")),
            ),
        ],
        SNAT_PORT,
    );
}
