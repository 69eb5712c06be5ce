//! JSON request bodies and query strings in, JSON response bodies out.
//! Responses are written by hand straight into a byte buffer; only string
//! escaping is delegated to serde_json.

use std::borrow::Cow;

use serde::Deserialize;

use super::error::ApiError;
use crate::proto::{Message, PullRequest, SendRequest};

#[derive(Deserialize)]
struct SendBody<'a> {
    #[serde(borrow, default)]
    chat: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    sender: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

#[derive(Deserialize, Default)]
struct PullParams<'a> {
    #[serde(borrow, default)]
    chat: Option<Cow<'a, str>>,
    #[serde(default)]
    cursor: Option<i64>,
    /// Any integer: values beyond 32 bits saturate (and are then clamped
    /// to the page limit, or rejected when negative) instead of failing.
    #[serde(default)]
    limit: Option<serde_json::Number>,
    #[serde(default)]
    reverse: Option<bool>,
    /// Long poll, checked against [`crate::domain::MAX_WAIT_MS`].
    #[serde(default)]
    wait_ms: Option<i64>,
}

pub(super) fn invalid_json(err: serde_json::Error) -> ApiError {
    // serde quotes the offending value whole ("invalid type: string \"…\""):
    // a 1 MB bad string would come back as a 1 MB 400.
    ApiError::Invalid(format!(
        "invalid JSON body: {}",
        cap_quoted(&err.to_string())
    ))
}

/// Most bytes of a client's value quoted back in an error message.
pub const MAX_QUOTED: usize = 64;

/// `value` cut to at most [`MAX_QUOTED`] bytes on a char boundary, with `…`
/// marking the cut.
pub fn quote(value: &str) -> Cow<'_, str> {
    if value.len() <= MAX_QUOTED {
        return Cow::Borrowed(value);
    }
    let mut end = MAX_QUOTED;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &value[..end]))
}

/// `message` with every `"..."` in it (the form serde quotes values in) cut
/// by [`quote`]; backslash escapes inside quotes are skipped over whole.
fn cap_quoted(message: &str) -> Cow<'_, str> {
    if message.len() <= 2 * MAX_QUOTED {
        return Cow::Borrowed(message);
    }
    let mut out = String::with_capacity(3 * MAX_QUOTED);
    let mut rest = message;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let inner = &rest[open + 1..];
        let close = closing_quote(inner).unwrap_or(inner.len());
        out.push_str(&quote(&inner[..close]));
        rest = &inner[close..];
        if let Some(after) = rest.strip_prefix('"') {
            out.push('"');
            rest = after;
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// Index of the first `"` in `s` not escaped by a backslash.
fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' if !escaped => return Some(i),
            '\\' => escaped = !escaped,
            _ => escaped = false,
        }
    }
    None
}

/// docs/api.md defines both bodies as JSON objects; serde's derived
/// `Deserialize` would also take a sequence (`["c","t","s"]` as a send).
/// The message says what the body was taken for and what to send instead
/// (`expected`).
fn require_object(body: &[u8], expected: &str) -> Result<(), ApiError> {
    match body.trim_ascii_start().first() {
        Some(b'{') => Ok(()),
        Some(b'[') => Err(ApiError::Invalid(format!(
            "the body is a JSON array, not an object; send {expected}"
        ))),
        _ => Err(ApiError::Invalid(format!(
            "the body is not a JSON object (it does not start with `{{`); send {expected}"
        ))),
    }
}

/// What a send's body may be, for error messages.
const SEND_FORMS: &str = r#"a JSON object {"chat":"a:b","text":"hi","sender":"a"} with Content-Type: application/json, or form fields chat=a:b&text=hi&sender=a"#;

/// What a pull's parameters may be, for error messages.
const CHANGE_FORMS: &str = r#"a JSON object {"chat":"a:b","send_time":1796622088185963} (with "text" to edit) with Content-Type: application/json, or form fields chat=a:b&send_time=1796622088185963"#;

const PULL_FORMS: &str = r#"the parameters in the query string (/api/pull?chat=a:b; `curl -G -d chat=a:b` puts them there), or a JSON object body {"chat":"a:b"}"#;

/// `POST /api/send` body. Missing fields become empty strings, which the RPC
/// server's validation rejects with a message naming the field.
pub fn parse_send(body: &[u8]) -> Result<SendRequest, ApiError> {
    if body.trim_ascii().is_empty() {
        return Err(ApiError::Invalid(
            "a JSON body {\"chat\",\"text\",\"sender\"} is required".into(),
        ));
    }
    require_object(body, SEND_FORMS)?;
    let parsed: SendBody = serde_json::from_slice(body).map_err(invalid_json)?;
    // Checked here, not by the RPC server: there an empty key means none.
    if let Some(key) = &parsed.idempotency_key {
        crate::domain::validate_idempotency_key(key).map_err(|e| ApiError::Invalid(e.0))?;
    }
    let owned = |field: Option<Cow<'_, str>>| field.map(Cow::into_owned).unwrap_or_default();
    Ok(SendRequest {
        message: Some(Message {
            chat: owned(parsed.chat),
            text: owned(parsed.text),
            sender: owned(parsed.sender),
            send_time: 0,
            edited_at: 0,
        }),
        idempotency_key: owned(parsed.idempotency_key),
    })
}

/// `POST /api/send` in any of the forms the original's clients used (Hertz's
/// `Bind`): a JSON body, an `application/x-www-form-urlencoded` body (`form`:
/// the request said so), or the query string. The fields come from exactly
/// one of them, as for pull: a body and a query string that names a send
/// field is a 400, not a guess at which wins. A form-typed body that starts
/// with `{` is JSON: `curl -d '{...}'` labels JSON as a form.
pub fn parse_send_any(
    body: &[u8],
    form: bool,
    query: Option<&[u8]>,
) -> Result<SendRequest, ApiError> {
    let from_query = match query {
        Some(q) => parse_send_pairs(q)?,
        None => None,
    };
    let has_body = !body.trim_ascii().is_empty();
    match (has_body, from_query) {
        (true, Some(_)) => Err(ApiError::Invalid(
            "give the send fields either in the body or in the query string, not both".into(),
        )),
        (false, Some(fields)) => fields.into_request(),
        (true, None) if form && !body.trim_ascii_start().starts_with(b"{") => {
            match parse_send_pairs(body)? {
                Some(fields) => fields.into_request(),
                // `curl -d notjson` labels anything a form: say so, rather
                // than report the empty `chat` of a form that named none.
                None => Err(ApiError::Invalid(format!(
                    "the body was sent as a form (Content-Type: application/x-www-form-urlencoded, which `curl -d` sets unless told otherwise) but names none of `chat`, `text`, `sender`; send {SEND_FORMS}"
                ))),
            }
        }
        _ => parse_send(body),
    }
}

/// Send fields from `key=value&...` pairs (a query string or a form body).
#[derive(Default)]
struct SendFields {
    chat: Option<String>,
    text: Option<String>,
    sender: Option<String>,
    idempotency_key: Option<String>,
}

impl SendFields {
    fn into_request(self) -> Result<SendRequest, ApiError> {
        if let Some(key) = &self.idempotency_key {
            crate::domain::validate_idempotency_key(key).map_err(|e| ApiError::Invalid(e.0))?;
        }
        Ok(SendRequest {
            message: Some(Message {
                chat: self.chat.unwrap_or_default(),
                text: self.text.unwrap_or_default(),
                sender: self.sender.unwrap_or_default(),
                send_time: 0,
                edited_at: 0,
            }),
            idempotency_key: self.idempotency_key.unwrap_or_default(),
        })
    }
}

/// The still-encoded `key=value` pairs of a query string or form body
/// (empty pairs skipped; a pair without `=` has an empty value).
fn form_pairs(encoded: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    encoded
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        })
}

/// Parses `chat`, `text`, `sender` and `idempotency_key` from form-encoded
/// pairs; `None` if none of them is named. Other keys are ignored, a field
/// given twice is a 400.
fn parse_send_pairs(encoded: &[u8]) -> Result<Option<SendFields>, ApiError> {
    let mut fields = SendFields::default();
    let mut any = false;
    for (key, value) in form_pairs(encoded) {
        let key = percent_decode(key)?;
        let slot = match key.as_str() {
            "chat" => &mut fields.chat,
            "text" => &mut fields.text,
            "sender" => &mut fields.sender,
            "idempotency_key" => &mut fields.idempotency_key,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ApiError::Invalid(format!("parameter `{key}` given twice")));
        }
        *slot = Some(percent_decode(value)?);
        any = true;
    }
    Ok(any.then_some(fields))
}

/// The fields of `POST /api/edit` and `POST /api/delete`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChangeFields {
    pub chat: String,
    /// 0 when missing: the RPC server refuses it, naming the field.
    pub send_time: i64,
    pub text: String,
}

#[derive(Deserialize)]
struct ChangeBody<'a> {
    #[serde(borrow, default)]
    chat: Option<Cow<'a, str>>,
    #[serde(default)]
    send_time: Option<i64>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// `POST /api/edit` / `POST /api/delete` fields, from exactly one of a JSON
/// body, a form body or the query string, as [`parse_send_any`] takes a
/// send's (a delete ignores `text`).
pub fn parse_change_any(
    body: &[u8],
    form: bool,
    query: Option<&[u8]>,
) -> Result<ChangeFields, ApiError> {
    let from_query = match query {
        Some(q) => parse_change_pairs(q)?,
        None => None,
    };
    let has_body = !body.trim_ascii().is_empty();
    match (has_body, from_query) {
        (true, Some(_)) => Err(ApiError::Invalid(
            "give the fields either in the body or in the query string, not both".into(),
        )),
        (false, Some(fields)) => Ok(fields),
        (false, None) => Err(ApiError::Invalid(
            "`chat` and `send_time` are required (a JSON body, a form body or the query string)"
                .into(),
        )),
        (true, None) if form && !body.trim_ascii_start().starts_with(b"{") => {
            Ok(parse_change_pairs(body)?.unwrap_or_default())
        }
        (true, None) => {
            require_object(body, CHANGE_FORMS)?;
            let parsed: ChangeBody = serde_json::from_slice(body).map_err(invalid_json)?;
            let owned = |f: Option<Cow<'_, str>>| f.map(Cow::into_owned).unwrap_or_default();
            Ok(ChangeFields {
                chat: owned(parsed.chat),
                send_time: parsed.send_time.unwrap_or(0),
                text: owned(parsed.text),
            })
        }
    }
}

/// `chat`, `send_time` and `text` from form-encoded pairs; `None` if none
/// of them is named.
fn parse_change_pairs(encoded: &[u8]) -> Result<Option<ChangeFields>, ApiError> {
    let mut fields = ChangeFields::default();
    let (mut chat, mut send_time, mut text) = (None, None, None);
    for (key, value) in form_pairs(encoded) {
        let key = percent_decode(key)?;
        let slot = match key.as_str() {
            "chat" => &mut chat,
            "send_time" => &mut send_time,
            "text" => &mut text,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ApiError::Invalid(format!("parameter `{key}` given twice")));
        }
        *slot = Some(percent_decode(value)?);
    }
    if chat.is_none() && send_time.is_none() && text.is_none() {
        return Ok(None);
    }
    if let Some(t) = send_time {
        fields.send_time = t
            .parse()
            .map_err(|_| ApiError::Invalid("parameter `send_time` must be an integer".into()))?;
    }
    fields.chat = chat.unwrap_or_default();
    fields.text = text.unwrap_or_default();
    Ok(Some(fields))
}

/// `{"send_time":T,"edited_at":E}`
pub fn edit_body(send_time: i64, edited_at: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    out.extend_from_slice(b"{\"send_time\":");
    put_i64(&mut out, send_time);
    out.extend_from_slice(b",\"edited_at\":");
    put_i64(&mut out, edited_at);
    out.push(b'}');
    out
}

/// `{"send_time":T,"deleted":true}`
pub fn delete_body(send_time: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    out.extend_from_slice(b"{\"send_time\":");
    put_i64(&mut out, send_time);
    out.extend_from_slice(b",\"deleted\":true}");
    out
}

/// `GET /api/pull` parameters, from a JSON body or from the query string
/// (not both: which one would win is a guess we refuse to make).
/// A body declared a form (`form`) is refused with a message that says so:
/// `curl -d chat=a:b` sends one, and a pull reads no form.
pub fn parse_pull(body: &[u8], form: bool, query: Option<&[u8]>) -> Result<PullRequest, ApiError> {
    let from_body = !body.trim_ascii().is_empty();
    let query_params = match query {
        Some(q) => parse_query(q)?,
        None => None,
    };
    let params = match (from_body, query_params) {
        (true, Some(_)) => {
            return Err(ApiError::Invalid(
                "give the pull parameters either as a JSON body or in the query string, not both"
                    .into(),
            ));
        }
        (true, None) if form && !body.trim_ascii_start().starts_with(b"{") => {
            return Err(ApiError::Invalid(format!(
                "the body was sent as a form (Content-Type: application/x-www-form-urlencoded, which `curl -d` sets), and a pull reads no form; send {PULL_FORMS}"
            )));
        }
        (true, None) => {
            require_object(body, PULL_FORMS)?;
            serde_json::from_slice::<PullParams>(body).map_err(invalid_json)?
        }
        (false, Some(params)) => params,
        (false, None) => PullParams::default(),
    };
    Ok(PullRequest {
        chat: params.chat.map(Cow::into_owned).unwrap_or_default(),
        cursor: params.cursor.unwrap_or(0),
        limit: params.limit.as_ref().map_or(Ok(0), saturating_limit)?,
        reverse: params.reverse.unwrap_or(false),
        wait_ms: wait_ms(params.wait_ms)?,
        ..PullRequest::default()
    })
}

/// `GET /api/stream` parameters: `chat` and `cursor`, from the query string
/// (an `EventSource` cannot send a body); `limit`, `reverse` and `wait_ms`
/// are the stream's own (a full page, oldest first, waiting) and refused if
/// given.
pub fn parse_stream(body: &[u8], query: Option<&[u8]>) -> Result<(String, i64), ApiError> {
    if !body.trim_ascii().is_empty() {
        return Err(ApiError::Invalid(
            "give the stream's parameters in the query string; it takes no body".into(),
        ));
    }
    let params = match query {
        Some(q) => parse_query(q)?.unwrap_or_default(),
        None => PullParams::default(),
    };
    if params.limit.is_some() || params.reverse.is_some() || params.wait_ms.is_some() {
        return Err(ApiError::Invalid(
            "a stream takes only `chat` and `cursor` (it is always oldest first, and waits)".into(),
        ));
    }
    Ok((
        params.chat.map(Cow::into_owned).unwrap_or_default(),
        params.cursor.unwrap_or(0),
    ))
}

fn wait_ms(value: Option<i64>) -> Result<i32, ApiError> {
    let wait = value.unwrap_or(0);
    let ms = i32::try_from(wait).unwrap_or(-1);
    crate::domain::validate_wait(ms).map_err(|e| ApiError::Invalid(e.0))?;
    Ok(ms)
}

fn saturating_limit(limit: &serde_json::Number) -> Result<i32, ApiError> {
    match (limit.as_i64(), limit.is_u64()) {
        (Some(v), _) => Ok(v.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32),
        (None, true) => Ok(i32::MAX),
        (None, false) => Err(ApiError::Invalid("`limit` must be an integer".into())),
    }
}

/// Parses `chat`, `cursor`, `limit`, `reverse` and `wait_ms` from a query string;
/// `None` if it names none of them. Other keys are ignored.
fn parse_query(query: &[u8]) -> Result<Option<PullParams<'static>>, ApiError> {
    let mut params = PullParams::default();
    let mut any = false;
    for (key, value) in form_pairs(query) {
        let key = percent_decode(key)?;
        let value = percent_decode(value)?;
        let duplicate = || ApiError::Invalid(format!("query parameter `{key}` given twice"));
        let number =
            |what: &str| ApiError::Invalid(format!("query parameter `{key}` must be {what}"));
        match key.as_str() {
            "chat" if params.chat.is_some() => return Err(duplicate()),
            "chat" => params.chat = Some(Cow::Owned(value)),
            "cursor" if params.cursor.is_some() => return Err(duplicate()),
            "cursor" => params.cursor = Some(value.parse().map_err(|_| number("an integer"))?),
            "limit" if params.limit.is_some() => return Err(duplicate()),
            "limit" => params.limit = Some(value.parse().map_err(|_| number("an integer"))?),
            "wait_ms" if params.wait_ms.is_some() => return Err(duplicate()),
            "wait_ms" => params.wait_ms = Some(value.parse().map_err(|_| number("an integer"))?),
            "reverse" if params.reverse.is_some() => return Err(duplicate()),
            "reverse" => {
                params.reverse = Some(match value.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(number("true or false")),
                })
            }
            _ => continue,
        }
        any = true;
    }
    Ok(any.then_some(params))
}

/// Decodes `%XX` escapes and `+` (a space in form encoding) into UTF-8.
fn percent_decode(raw: &[u8]) -> Result<String, ApiError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |j: usize| raw.get(j).and_then(|&b| (b as char).to_digit(16));
                match (hex(i + 1), hex(i + 2)) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => {
                        return Err(ApiError::Invalid(
                            "malformed percent-encoding in the query string or form body".into(),
                        ));
                    }
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::Invalid("the query string or form body is not valid UTF-8".into()))
}

pub(super) fn put_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

pub(super) fn put_i64(out: &mut Vec<u8>, v: i64) {
    let _ = serde_json::to_writer(&mut *out, &v);
}

/// `{"send_time":N}`
pub fn send_body(send_time: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(b"{\"send_time\":");
    put_i64(&mut out, send_time);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_from_query_decodes_and_rejects_duplicates() {
        let req = parse_pull(
            b"",
            false,
            Some(b"chat=a%3Ab&cursor=5&limit=3&reverse=true&x=1"),
        )
        .expect("valid");
        assert_eq!(
            (req.chat.as_str(), req.cursor, req.limit, req.reverse),
            ("a:b", 5, 3, true)
        );
        let req = parse_pull(b"", false, Some(b"chat=hello+world%F0%9F%98%80")).expect("valid");
        assert_eq!(req.chat, "hello world😀");
        assert!(parse_pull(b"", false, Some(b"chat=a&chat=b")).is_err());
        assert!(parse_pull(b"", false, Some(b"chat=%FF")).is_err());
        assert!(parse_pull(b"", false, Some(b"chat=%4")).is_err());
        assert!(parse_pull(b"", false, Some(b"limit=ten")).is_err());
        assert!(parse_pull(b"", false, Some(b"limit=1.5")).is_err());
        let huge = parse_pull(b"", false, Some(b"limit=18446744073709551615")).expect("valid");
        assert_eq!(huge.limit, i32::MAX);
        let low = parse_pull(br#"{"chat":"c","limit":-9999999999}"#, false, None).expect("valid");
        assert_eq!(low.limit, i32::MIN);
        assert!(parse_pull(b"{\"chat\":\"a\"}", false, Some(b"chat=a")).is_err());
    }

    #[test]
    fn send_fields_come_from_one_place() {
        let message = |r: Result<SendRequest, ApiError>| {
            let m = r.expect("valid").message.expect("message");
            (m.chat, m.text, m.sender)
        };
        let want = ("c d".to_string(), "a&b=c".to_string(), "s".to_string());
        let query = b"chat=c+d&text=a%26b%3Dc&sender=s&x=1";
        assert_eq!(message(parse_send_any(b"", false, Some(query))), want);
        assert_eq!(message(parse_send_any(query, true, None)), want);
        let json = br#"{"chat":"c d","text":"a&b=c","sender":"s"}"#;
        assert_eq!(message(parse_send_any(json, true, None)), want);
        assert_eq!(message(parse_send_any(json, false, Some(b"x=1"))), want);
        assert!(parse_send_any(json, false, Some(b"chat=c")).is_err());
        assert!(parse_send_any(b"text=t", true, Some(b"chat=c")).is_err());
        assert!(parse_send_any(b"", false, Some(b"chat=a&chat=b")).is_err());
        let keyed = parse_send_any(b"", false, Some(b"chat=c&idempotency_key=k%201")).expect("ok");
        assert_eq!(keyed.idempotency_key, "k 1");
        assert!(parse_send_any(b"", false, Some(b"chat=c&idempotency_key=%C3%A9")).is_err());
    }

    #[test]
    fn change_fields_come_from_one_place() {
        let want = ChangeFields {
            chat: "c d".into(),
            send_time: 17,
            text: "a&b".into(),
        };
        let query = b"chat=c+d&send_time=17&text=a%26b";
        assert_eq!(parse_change_any(b"", false, Some(query)), Ok(want));
        let json = br#"{"chat":"c d","send_time":17,"text":"a&b"}"#;
        assert_eq!(
            parse_change_any(json, true, None).map(|f| f.send_time),
            Ok(17)
        );
        assert!(parse_change_any(query, true, None).is_ok());
        assert!(parse_change_any(json, false, Some(b"chat=c")).is_err());
        assert!(parse_change_any(b"", false, None).is_err());
        assert!(parse_change_any(b"", false, Some(b"send_time=x")).is_err());
        assert!(parse_change_any(br#"{"chat":"c","send_time":"1"}"#, false, None).is_err());
        assert!(parse_change_any(b"[1]", false, None).is_err());
    }

    #[test]
    fn json_types_are_enforced() {
        assert!(parse_send(br#"{"chat":5,"text":"t","sender":"s"}"#).is_err());
        assert!(parse_pull(br#"{"chat":"c","limit":"3"}"#, false, None).is_err());
        assert!(parse_pull(br#"{"chat":"c","reverse":"yes"}"#, false, None).is_err());
        assert!(parse_send(b"{\"chat\":\"\xff\",\"text\":\"t\",\"sender\":\"s\"}").is_err());
        assert!(parse_send(b"not json").is_err());
    }

    #[test]
    fn bodies_must_be_objects() {
        let err = |r: Result<SendRequest, ApiError>| match r {
            Err(ApiError::Invalid(msg)) => msg,
            _ => panic!("expected a 400"),
        };
        assert!(err(parse_send(br#"["arr","t","s"]"#)).contains("object"));
        assert!(err(parse_send(b" 5")).contains("object"));
        assert!(parse_pull(br#"["c"]"#, false, None).is_err());
        assert!(parse_send(br#" {"chat":"c","text":"t","sender":"s"}"#).is_ok());
    }

    #[test]
    fn quoted_values_are_cut_on_a_char_boundary() {
        let long = "é".repeat(1000);
        let cut = quote(&long);
        assert!(cut.ends_with('…'));
        assert!(cut.len() <= MAX_QUOTED + '…'.len_utf8());
        assert_eq!(cut.trim_end_matches('…'), "é".repeat(MAX_QUOTED / 2));
        assert_eq!(quote("short"), "short");
        let body = format!(r#"{{"chat":"c","cursor":"{}"}}"#, "\\\"".repeat(100_000));
        let Err(ApiError::Invalid(msg)) = parse_pull(body.as_bytes(), false, None) else {
            panic!("a string cursor must be refused");
        };
        assert!(msg.len() < 300, "message of {} bytes: {msg}", msg.len());
        assert!(msg.contains('…'), "{msg}");
    }
}
