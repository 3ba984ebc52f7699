//! Transports: they parse and move bytes, and leave every decision about a request to
//! `crate::pipeline`. `h1` is the HTTP/1.1 fast path; everything it does not take is served
//! by hyper (h2, h2c, HTTP/1.x), whose service function is `crate::pipeline::handle`.

pub mod h1;
pub mod hyper;
