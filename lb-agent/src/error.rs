//! Why an attempt to bring the datapath to what the source says failed (the datapath then
//! keeps its last good state). Each [`Error`] counts in `xlb_apply_errors_total` under
//! [`Error::metric_label`], and one about a single service port is also an Event on its
//! Service ([`Error::port`]); neither is ever read from the message's text.
use std::path::PathBuf;

use crate::{
    dataplane::programmer::ApplyError, model::translate::SvcPortId, serve::metrics::ErrorKind,
    source::yaml::ParseError,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The source file could not be read.
    #[error("reading {}", path.display())]
    SourceRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The source's content is not valid (YAML, objects, fields).
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// A file of a directory source (or, for checks across files, the directory) is not
    /// valid.
    #[error("{}: {source}", path.display())]
    SourceFile {
        path: PathBuf,
        #[source]
        source: ParseError,
    },
    /// Writing the maps failed
    /// ([`Programmer::apply`](crate::dataplane::programmer::Programmer::apply)).
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

impl Error {
    /// The `kind` label of `xlb_apply_errors_total`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::SourceRead { .. } => ErrorKind::Source,
            Error::Parse(_) | Error::SourceFile { .. } => ErrorKind::Parse,
            Error::Apply(ApplyError::MapWrite { .. }) => ErrorKind::MapWrite,
            Error::Apply(ApplyError::Other { .. }) => ErrorKind::Other,
        }
    }

    pub fn metric_label(&self) -> &'static str {
        self.kind().metric_label()
    }

    /// The service port the error is about, if it is about one.
    pub fn port(&self) -> Option<&SvcPortId> {
        match self {
            Error::Apply(e) => e.port(),
            Error::SourceRead { .. } | Error::Parse(_) | Error::SourceFile { .. } => None,
        }
    }
}

/// `e` with its causes, as anyhow's `{:#}` shows them (`top: cause: cause`).
pub fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        out.push_str(": ");
        out.push_str(&c.to_string());
        next = c.source();
    }
    out
}
