//! Problems found in a config file: collected by byte offset while reading and
//! validating, placed by line and column in one pass at the end, and listed (the first
//! [`MAX_LISTED`], then a count).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use toml::Spanned;

/// How many problems an error lists, in file order; the rest are only counted, so a
/// file with a problem on each of its 100,000 entries still gives a readable report.
pub const MAX_LISTED: usize = 100;

/// One problem found in the file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("{}", render_problems(.path, .problems, *.total))]
    Invalid {
        path: PathBuf,
        /// The first [`MAX_LISTED`] problems in file order.
        problems: Vec<Problem>,
        /// How many problems the file has in all.
        total: usize,
    },
}

impl ConfigError {
    /// The problems listed: all of them, or the first [`MAX_LISTED`].
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { problems, .. } => problems,
        }
    }

    /// How many problems the file has, listed or not.
    pub fn total(&self) -> usize {
        match self {
            ConfigError::Read { .. } => 0,
            ConfigError::Invalid { total, .. } => *total,
        }
    }
}

pub(super) fn render_problems(path: &Path, problems: &[Problem], total: usize) -> String {
    let mut out = format!("{} problem(s) in {}", thousands(total), path.display());
    for p in problems {
        out.push_str(&format!(
            "\n  {}:{}:{}: {}",
            path.display(),
            p.line,
            p.column,
            p.message
        ));
    }
    match total.saturating_sub(problems.len()) {
        0 => {}
        1 => out.push_str("\n  ... and 1 more problem"),
        more => out.push_str(&format!("\n  ... and {} more problems", thousands(more))),
    }
    out
}

/// `39900` as `39,900`.
pub(super) fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// Collects problems by byte offset. Lines and columns are worked out only at the end,
/// for the problems listed, in one pass over the text: finding each from the start of
/// the file made validation quadratic in the number of problems.
pub(super) struct Problems<'t> {
    text: &'t str,
    found: Vec<(usize, String)>,
}

impl<'t> Problems<'t> {
    pub(super) fn new(text: &'t str) -> Self {
        Problems {
            text,
            found: Vec::new(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.found.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    pub(super) fn at(&mut self, offset: usize, message: impl Into<String>) {
        let offset = floor_char_boundary(self.text, offset);
        self.found.push((offset, message.into()));
    }

    /// The first [`MAX_LISTED`] problems in file order, whichever pass found them (the
    /// sort is stable, so problems at one place keep the order they were found in).
    pub(super) fn into_error(self, path: &Path) -> ConfigError {
        let total = self.found.len();
        let mut found = self.found;
        found.sort_by_key(|(offset, _)| *offset);
        found.truncate(MAX_LISTED);
        let (mut line, mut column, mut at) = (1, 1, 0);
        let problems = found
            .into_iter()
            .map(|(offset, message)| {
                let passed = &self.text[at..offset];
                match passed.rfind('\n') {
                    Some(last) => {
                        line += passed.bytes().filter(|&b| b == b'\n').count();
                        column = passed[last + 1..].chars().count() + 1;
                    }
                    None => column += passed.chars().count(),
                }
                at = offset;
                Problem {
                    line,
                    column,
                    message,
                }
            })
            .collect();
        ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
            total,
        }
    }

    /// A problem at byte `inner` of the string value `value`.
    pub(super) fn inside(
        &mut self,
        value: &Spanned<String>,
        inner: usize,
        message: impl Into<String>,
    ) {
        let offset = string_offset(self.text, value.span(), value.get_ref(), inner);
        self.at(offset, message);
    }

    pub(super) fn toml(&mut self, e: &toml::de::Error) {
        let offset = e.span().map_or(0, |s| s.start);
        self.at(offset, e.message().trim().to_string());
    }
}

/// The offset in the file `text` of byte `inner` of the string `value`, written at
/// `span`. Exact where the source up to there reads as the value itself; an escape or
/// a line-ending backslash before it (or a CRLF the parser normalised) shifts the two,
/// and then the start of the value stands in.
pub(super) fn string_offset(text: &str, span: Range<usize>, value: &str, inner: usize) -> usize {
    let raw = text.get(span.clone()).unwrap_or_default();
    let (delimiter, escapes) = match raw.as_bytes() {
        [b'"', b'"', b'"', ..] => (3, true),
        [b'\'', b'\'', b'\'', ..] => (3, false),
        [b'"', ..] => (1, true),
        [b'\'', ..] => (1, false),
        _ => return span.start,
    };
    let mut start = delimiter;
    // A newline right after the opening of a multi-line string is not part of it.
    if delimiter == 3 {
        if raw[start..].starts_with("\r\n") {
            start += 2;
        } else if raw[start..].starts_with('\n') {
            start += 1;
        }
    }
    let source = raw.get(start..start + inner);
    match (source, value.get(..inner)) {
        (Some(a), Some(b)) if a == b && !(escapes && a.contains('\\')) => {
            span.start + start + inner
        }
        _ => span.start,
    }
}

pub(super) fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
