//! Engine conformance tests.
