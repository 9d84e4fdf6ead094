//! Rendering errors for logs, `status` events and the CLI. A leaf module, so every
//! other module can use it.

/// An error with its causes; a cause whose text the message already contains is not
/// repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
