//! The edge: what wsgate makes of a request before any route's rules judge it. Pure, no I/O.
//!
//! - `path`: the one canonical request path (routing, auth, limits, files and proxying all
//!   see this form and no other).

pub mod path;
