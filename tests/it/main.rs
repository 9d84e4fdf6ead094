//! The integration tests: one binary, real engine, real sockets.

mod engine;
mod gateway;
mod support;
