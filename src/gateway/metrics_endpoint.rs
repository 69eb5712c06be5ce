//! `GET /metrics`: the text exposition of [`crate::metrics`], on the API
//! port and on the `--metrics-addr` listener (which serves nothing else).

use super::error::ApiError;
use super::routes::{self, Label, Route};
use crate::budget::Account;
use crate::http::{Handler, HttpError, Request, Response};
use crate::metrics;

/// Everything counted, with the gateway's route labels.
pub fn scrape() -> Response {
    let mut resp = Response::json(200, metrics::render(&Label::NAMES).into_bytes());
    resp.content_type = metrics::CONTENT_TYPE;
    resp
}

/// The HTTP handler of `--metrics-addr`: `/metrics` and nothing else.
pub struct MetricsEndpoint;

impl Handler for MetricsEndpoint {
    type Pending = Response;

    fn start(&self, req: &Request, _account: &Account) -> Response {
        let result = match routes::find(req.path_and_query().0) {
            Some(entry) if entry.route == Route::Metrics => entry.route_for(req.method),
            _ => Err(ApiError::NotFound),
        };
        match result {
            Ok(_) => scrape(),
            Err(err) => err.into_response(),
        }
    }

    async fn finish(&self, pending: Response) -> Response {
        pending
    }

    fn reject(&self, err: HttpError) -> Response {
        ApiError::Http(err).into_response()
    }
}
