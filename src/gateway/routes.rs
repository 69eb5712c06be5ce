//! The gateway's route table: every path it serves, the methods each
//! answers and the `route` label its requests are counted under in
//! `/metrics`. Routing ([`super::Gateway`]), the metrics listener
//! ([`super::metrics_endpoint`]) and the OpenAPI check (tests/openapi.rs
//! reads this file's paths) all read it: a route is added here, as a row
//! and a [`Route`] variant (which the gateway's `match` then asks a handler
//! for).

use super::error::ApiError;
use crate::http::Method;
use crate::metrics::RouteId;

/// What a path serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Send,
    Pull,
    Edit,
    Delete,
    Stream,
    Ws,
    Export,
    Ping,
    Ready,
    Metrics,
    OpenApi,
    /// `/`, the chat page.
    Page,
}

/// The methods a route answers; any other gets 405 with this `Allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Methods {
    GetHead,
    Get,
    Post,
}

impl Methods {
    pub fn allows(self, method: Method) -> bool {
        match self {
            Methods::GetHead => matches!(method, Method::Get | Method::Head),
            Methods::Get => method == Method::Get,
            Methods::Post => method == Method::Post,
        }
    }

    /// The `Allow` field of a 405.
    pub const fn allow(self) -> &'static str {
        match self {
            Methods::GetHead => "GET, HEAD",
            Methods::Get => "GET",
            Methods::Post => "POST",
        }
    }
}

/// The `route` label of `im_http_requests_total` and
/// `im_http_request_duration_seconds`: the routes counted apart, and
/// `other` for the rest (unknown paths, requests refused before routing,
/// and the routes whose row says so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Send,
    Pull,
    Stream,
    Ws,
    Edit,
    Delete,
    Export,
    Ping,
    Ready,
    Metrics,
    OpenApi,
    Page,
    Other,
}

impl Label {
    pub const ALL: [Label; 13] = [
        Label::Send,
        Label::Pull,
        Label::Stream,
        Label::Ws,
        Label::Edit,
        Label::Delete,
        Label::Export,
        Label::Ping,
        Label::Ready,
        Label::Metrics,
        Label::OpenApi,
        Label::Page,
        Label::Other,
    ];

    /// The label values, in [`Label::ALL`]'s order: the metrics' own
    /// index of each ([`Label::id`]) is its place here.
    pub const NAMES: [&'static str; 13] = [
        "send", "pull", "stream", "ws", "edit", "delete", "export", "ping", "ready", "metrics",
        "openapi", "page", "other",
    ];

    /// The label's place in the metrics' counters.
    pub const fn id(self) -> RouteId {
        RouteId(self as usize)
    }
}

// The counters have room for every label.
const _: () = assert!(Label::ALL.len() <= crate::metrics::MAX_ROUTES);

/// One row of the table.
#[derive(Debug)]
pub struct Entry {
    pub path: &'static [u8],
    pub route: Route,
    pub methods: Methods,
    pub label: Label,
}

impl Entry {
    /// The route, if the entry answers `method`.
    pub fn route_for(&self, method: Method) -> Result<Route, ApiError> {
        match self.methods.allows(method) {
            true => Ok(self.route),
            false => Err(ApiError::MethodNotAllowed(self.methods.allow())),
        }
    }
}

const fn entry(path: &'static [u8], route: Route, methods: Methods, label: Label) -> Entry {
    Entry {
        path,
        route,
        methods,
        label,
    }
}

/// Every route; the busiest first (they are looked up in order).
pub const TABLE: [Entry; 12] = [
    entry(b"/api/send", Route::Send, Methods::Post, Label::Send),
    entry(b"/api/pull", Route::Pull, Methods::GetHead, Label::Pull),
    entry(
        b"/api/stream",
        Route::Stream,
        Methods::GetHead,
        Label::Stream,
    ),
    entry(b"/api/ws", Route::Ws, Methods::Get, Label::Ws),
    entry(b"/api/edit", Route::Edit, Methods::Post, Label::Edit),
    entry(b"/api/delete", Route::Delete, Methods::Post, Label::Delete),
    entry(
        b"/api/export",
        Route::Export,
        Methods::GetHead,
        Label::Export,
    ),
    entry(b"/ping", Route::Ping, Methods::GetHead, Label::Ping),
    entry(b"/ready", Route::Ready, Methods::GetHead, Label::Ready),
    entry(
        b"/metrics",
        Route::Metrics,
        Methods::GetHead,
        Label::Metrics,
    ),
    entry(
        b"/openapi.json",
        Route::OpenApi,
        Methods::GetHead,
        Label::OpenApi,
    ),
    entry(b"/", Route::Page, Methods::GetHead, Label::Page),
];

/// The row of a request path (without its query).
pub fn find(path: &[u8]) -> Option<&'static Entry> {
    TABLE.iter().find(|entry| entry.path == path)
}

/// The label a request path is counted under (whatever its method).
pub fn label_of(entry: Option<&Entry>) -> Label {
    entry.map_or(Label::Other, |entry| entry.label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_in_variant_order_and_ids_are_distinct() {
        for label in Label::ALL {
            assert_eq!(Label::ALL[label as usize], label, "ALL is in variant order");
            assert_eq!(label.id().0, label as usize);
        }
        assert_eq!(Label::NAMES.len(), Label::ALL.len());
    }

    #[test]
    fn every_path_has_one_row() {
        for (i, row) in TABLE.iter().enumerate() {
            assert!(
                TABLE[..i].iter().all(|earlier| earlier.path != row.path),
                "{:?} twice",
                String::from_utf8_lossy(row.path)
            );
            assert_eq!(find(row.path).map(|e| e.route), Some(row.route));
        }
        assert_eq!(label_of(find("/api/send/".as_bytes())), Label::Other);
        assert_eq!(label_of(find("/api/send".as_bytes())), Label::Send);
    }

    #[test]
    fn methods_are_checked_against_the_row() {
        let Some(send) = find("/api/send".as_bytes()) else {
            panic!("/api/send is routed")
        };
        assert_eq!(send.route_for(Method::Post).ok(), Some(Route::Send));
        assert!(matches!(
            send.route_for(Method::Get),
            Err(ApiError::MethodNotAllowed("POST"))
        ));
        for route in [Route::Pull, Route::Export, Route::Ping, Route::Page] {
            let Some(row) = TABLE.iter().find(|e| e.route == route) else {
                panic!("{route:?} has a row")
            };
            assert!(row.route_for(Method::Head).is_ok(), "{route:?}");
            assert!(row.route_for(Method::Post).is_err(), "{route:?}");
        }
    }
}
