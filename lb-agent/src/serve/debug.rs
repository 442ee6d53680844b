//! Datapath debug events (aya-log): the programs say why a packet was passed, rejected or
//! dropped, and log each new flow, when `CFG_DEBUG_EVENTS` is set in `XLB_CONFIG`
//! (lb-ebpf `event.rs`). Off by default. Switched on at start by `--datapath-debug`, and at
//! run time, per node, by `PUT /datapath-debug` (body `on` or `off`) on the metrics
//! address; `GET /datapath-debug` shows the state. The events are read from aya-log's ring
//! buffer by [`spawn_reader`] and written to the agent's log at `info` under the target
//! `lb_ebpf::…` (so `/loglevel` at `warn` hides them again without touching the datapath).
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData};
use lb_common::{CFG_DEBUG_EVENTS, Config, MAP_CONFIG};
use tokio::{
    io::{Interest, unix::AsyncFd},
    task::JoinHandle,
};

/// The on/off word of the pinned `XLB_CONFIG`, through its own handle.
pub struct DebugSwitch {
    config: Array<MapData, Config>,
}

impl DebugSwitch {
    pub fn open(pin_dir: &Path) -> Result<Self> {
        let p = pin_dir.join(MAP_CONFIG);
        let data =
            MapData::from_pin(&p).with_context(|| format!("opening pinned map {}", p.display()))?;
        Ok(Self {
            config: Array::try_from(Map::Array(data))?,
        })
    }

    pub fn is_on(&self) -> Result<bool> {
        Ok(self.config.get(&0, 0)?.flags & CFG_DEBUG_EVENTS != 0)
    }

    /// Sets or clears the bit, keeping the rest of the config as the agent wrote it.
    pub fn set(&mut self, on: bool) -> Result<()> {
        let mut c = self.config.get(&0, 0)?;
        c.flags = with_debug(c.flags, on);
        self.config.set(0, c, 0)?;
        Ok(())
    }
}

/// `flags` with the debug-events bit set to `on`.
pub fn with_debug(flags: u32, on: bool) -> u32 {
    if on {
        flags | CFG_DEBUG_EVENTS
    } else {
        flags & !CFG_DEBUG_EVENTS
    }
}

/// `on`/`off` (also `true`/`false`, `1`/`0`) as sent to `PUT /datapath-debug`.
pub fn parse_switch(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "1" => Some(true),
        "off" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// A logger that writes the datapath's debug events with their text: the programs send an
/// event's code (`lb_common::DebugEvent`), this puts `DebugEvent::text` in its place.
/// Other records, and events of a code this build does not know, go to `L` as they are.
pub struct EventText<L>(pub L);

impl<L: log::Log> log::Log for EventText<L> {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record) {
        // Formatting the message first costs an allocation per event: debug events only.
        match event_text(&record.args().to_string()) {
            Some(text) => self.0.log(
                &log::Record::builder()
                    .args(format_args!("{text}"))
                    .metadata(record.metadata().clone())
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
            None => self.0.log(record),
        }
    }

    fn flush(&self) {
        self.0.flush()
    }
}

/// The message of an event record (`event <code> proto …`) with the event's text for its
/// code; None for anything else.
pub fn event_text(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix(lb_common::DEBUG_EVENT_PREFIX)?;
    let (code, rest) = rest.split_once(' ')?;
    let event = lb_common::DebugEvent::from_code(code.parse().ok()?)?;
    Some(format!("{} {rest}", event.text()))
}

/// Reads the programs' events as they come and hands them to the `log` crate (their text
/// put in by [`EventText`]). Aborted on drop of the returned handle's owner (the agent
/// aborts it when it stops).
pub fn spawn_reader(
    logger: aya_log::EbpfLogger<EventText<&'static dyn log::Log>>,
) -> Result<JoinHandle<()>> {
    // SAFETY: the logger owns the ring buffer's descriptor and keeps it open, unchanged,
    // for as long as the AsyncFd that owns the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .context("watching the datapath event ring buffer")?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    log::warn!("datapath events: {e}; no more events are read");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_words() {
        assert_eq!(parse_switch(" On\n"), Some(true));
        assert_eq!(parse_switch("0"), Some(false));
        assert_eq!(parse_switch("maybe"), None);
        assert_eq!(with_debug(0b100, true), 0b100 | CFG_DEBUG_EVENTS);
        assert_eq!(with_debug(0b100 | CFG_DEBUG_EVENTS, false), 0b100);
    }

    #[test]
    fn events_get_their_text() {
        assert_eq!(
            event_text("event 0 proto 6 10.0.0.1:4000 -> 10.96.0.1:80").as_deref(),
            Some("new flow proto 6 10.0.0.1:4000 -> 10.96.0.1:80")
        );
        let code = lb_common::DebugEvent::RejectedNoEndpoint as u8;
        assert_eq!(
            event_text(&format!("event {code} proto 17 a -> b")).as_deref(),
            Some("rejected: service has no serving endpoint proto 17 a -> b")
        );
        // Unknown codes and other records are left as they are.
        assert_eq!(event_text("event 200 proto 6 a -> b"), None);
        assert_eq!(event_text("something else"), None);
    }
}
