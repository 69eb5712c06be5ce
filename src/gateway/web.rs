//! What the gateway serves besides the API: the OpenAPI document of the API
//! (`GET /openapi.json`) and a chat page for people (`GET /`). Both are
//! files of the repository compiled into the binary, served verbatim, so
//! `cargo run --release` needs nothing else and the served document is the
//! reviewed one, byte for byte.

use crate::http::Response;

/// `openapi.json` at the repository root (OpenAPI 3.1), hand-written.
pub const OPENAPI_JSON: &str = include_str!("../../openapi.json");

/// `web/chat.html`: one page, inline CSS and JS, no build step.
pub const CHAT_HTML: &str = include_str!("../../web/chat.html");

/// The page loads nothing from elsewhere and runs only its own inline
/// script and style: this keeps it so (and limits what an injected message
/// could do, although every message is inserted as text, never as HTML).
const CHAT_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

pub fn openapi() -> Response {
    Response::json(200, OPENAPI_JSON.as_bytes().to_vec())
}

pub fn chat_page() -> Response {
    let mut resp = Response::json(200, CHAT_HTML.as_bytes().to_vec());
    resp.content_type = "text/html; charset=utf-8";
    resp.extra_header = Some(("Content-Security-Policy", CHAT_CSP));
    resp
}
