//! The rules of the API, independent of any transport: validation, limits,
//! two-person room names.

/// Longest accepted `chat` or `sender`, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest accepted `text`, in bytes.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// The most one message can weigh inside a `PullResponse` on the wire: its
/// fields at their limits (text, sender, chat) plus tags, lengths and the
/// message's own length prefix. Bounds what a pull's reply can hold before
/// it is served (the RPC server's reply budget, the gateway's output budget).
pub const MAX_MESSAGE_WIRE_BYTES: usize = MAX_TEXT_BYTES + 2 * MAX_NAME_BYTES + 64;
/// Page size when a pull gives no limit (or 0).
pub const DEFAULT_LIMIT: i32 = 10;
/// Largest page; bigger limits are clamped to it.
pub const MAX_LIMIT: i32 = 100;
/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// A rejected request: which field and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid(pub String);

fn check_name(field: &str, value: &str) -> Result<(), Invalid> {
    if value.is_empty() {
        return Err(Invalid(format!("`{field}` must not be empty")));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(Invalid(format!(
            "`{field}` must be at most {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Checks a message about to be sent.
pub fn validate_send(chat: &str, sender: &str, text: &str) -> Result<(), Invalid> {
    check_name("chat", chat)?;
    check_name("sender", sender)?;
    if text.is_empty() {
        return Err(Invalid("`text` must not be empty".into()));
    }
    if text.len() > MAX_TEXT_BYTES {
        return Err(Invalid(format!(
            "`text` must be at most {MAX_TEXT_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Whether a chat can have records beside its messages (idempotency
/// records, the change log): Redis keeps them in the chat's Cluster slot,
/// the chat's name being their keys' hash tag, and a name that starts with
/// `}` makes that tag empty (`im:{}…`). Decided here, for every store
/// alike, so that a chat behaves the same on each.
pub fn chat_keeps_records(chat: &str) -> bool {
    !chat.starts_with('}')
}

/// Checks an edit or delete: the chat as for a send, a `send_time` that
/// can name a message, and (an edit's) `text` as for a send.
pub fn validate_change(chat: &str, send_time: i64, text: Option<&str>) -> Result<(), Invalid> {
    check_name("chat", chat)?;
    if send_time <= 0 {
        return Err(Invalid("`send_time` must be a positive integer".into()));
    }
    if !chat_keeps_records(chat) {
        return Err(Invalid(
            "messages in a chat whose name starts with `}` cannot be edited or deleted".into(),
        ));
    }
    match text {
        Some(text) => validate_send(chat, "-", text),
        None => Ok(()),
    }
}

/// Checks an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY_BYTES`] printable
/// ASCII bytes (space to `~`), so it is safe in a header, a log line and a
/// Redis key alike.
pub fn validate_idempotency_key(key: &str) -> Result<(), Invalid> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(Invalid(format!(
            "the idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
        )));
    }
    if !key.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(Invalid(
            "the idempotency key must be printable ASCII".into(),
        ));
    }
    Ok(())
}

/// A validated pull: the page size is resolved and the chat canonical.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullQuery {
    pub chat: String,
    /// Exclusive bound; 0 = start at the end chosen by `reverse`.
    pub cursor: i64,
    /// 1..=MAX_LIMIT.
    pub limit: usize,
    /// false: newest first; true: oldest first.
    pub reverse: bool,
}

/// Longest a pull may wait for new messages (`wait_ms`).
pub const MAX_WAIT_MS: i32 = 30_000;

/// A pull's `wait_ms`, checked.
pub fn validate_wait(wait_ms: i32) -> Result<std::time::Duration, Invalid> {
    if !(0..=MAX_WAIT_MS).contains(&wait_ms) {
        return Err(Invalid(format!(
            "`wait_ms` must be between 0 and {MAX_WAIT_MS}"
        )));
    }
    Ok(std::time::Duration::from_millis(wait_ms as u64))
}

impl PullQuery {
    /// Whether a message stored from now on could belong on this page if
    /// it is empty: oldest first after a cursor, or from either end of an
    /// empty chat. (Newest first before a cursor reads older messages only.)
    pub fn may_wait(&self) -> bool {
        self.reverse || self.cursor == 0
    }
}

/// Checks a pull request and resolves its defaults.
pub fn validate_pull(
    chat: &str,
    cursor: i64,
    limit: i32,
    reverse: bool,
) -> Result<PullQuery, Invalid> {
    check_name("chat", chat)?;
    if cursor < 0 {
        return Err(Invalid("`cursor` must not be negative".into()));
    }
    let limit = match limit {
        l if l < 0 => return Err(Invalid("`limit` must not be negative".into())),
        0 => DEFAULT_LIMIT,
        l => l.min(MAX_LIMIT),
    };
    Ok(PullQuery {
        chat: canonical_chat(chat).into_owned(),
        cursor,
        limit: limit as usize,
        reverse,
    })
}

/// The two members of a two-person room `a:b` (either order), or `None`
/// for any other name: no colon, several colons, or an empty side.
pub fn two_person_room(chat: &str) -> Option<(&str, &str)> {
    match chat.split_once(':') {
        Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(':') => Some((a, b)),
        _ => None,
    }
}

/// `a:b` and `b:a` name the same two-person room; it is stored under the
/// sorted form. Any other name (no colon, several colons, an empty side) is
/// used as given.
pub fn canonical_chat(chat: &str) -> std::borrow::Cow<'_, str> {
    match two_person_room(chat) {
        Some((a, b)) if a > b => std::borrow::Cow::Owned(format!("{b}:{a}")),
        _ => std::borrow::Cow::Borrowed(chat),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_person_rooms_are_sorted() {
        assert_eq!(canonical_chat("b:a"), "a:b");
        assert_eq!(canonical_chat("a:b"), "a:b");
        assert_eq!(canonical_chat("zed:amy"), "amy:zed");
    }

    #[test]
    fn other_names_are_kept() {
        for name in ["chatroom12345", "c:b:a", ":b", "b:", ":", "b::a"] {
            assert_eq!(canonical_chat(name), name);
        }
    }

    #[test]
    fn limits_resolve() {
        assert_eq!(validate_pull("c", 0, 0, false).map(|q| q.limit), Ok(10));
        assert_eq!(validate_pull("c", 0, 101, false).map(|q| q.limit), Ok(100));
        assert_eq!(validate_pull("c", 0, 7, false).map(|q| q.limit), Ok(7));
        assert!(validate_pull("c", 0, -1, false).is_err());
        assert!(validate_pull("c", -5, 1, false).is_err());
        assert!(validate_pull("", 0, 1, false).is_err());
    }

    #[test]
    fn idempotency_keys() {
        for key in [
            "k",
            "8e03978e-40d5-43e8-bc93-6894a57f9324",
            "a b~!",
            &"k".repeat(128),
        ] {
            assert!(validate_idempotency_key(key).is_ok(), "{key:?}");
        }
        for key in ["", &"k".repeat(129), "tab\there", "é", "nul\0", "del\x7f"] {
            assert!(validate_idempotency_key(key).is_err(), "{key:?}");
        }
    }

    #[test]
    fn change_bounds() {
        assert!(validate_change("c", 1, Some("t")).is_ok());
        assert!(validate_change("c", 1, None).is_ok());
        assert!(validate_change("c", 0, None).is_err());
        assert!(validate_change("", 1, None).is_err());
        assert!(validate_change("}c", 1, None).is_err());
        assert!(validate_change("c", 1, Some("")).is_err());
        assert!(validate_change("c", 1, Some(&"t".repeat(MAX_TEXT_BYTES + 1))).is_err());
    }

    #[test]
    fn send_bounds() {
        let long_name = "n".repeat(MAX_NAME_BYTES + 1);
        assert!(validate_send("c", "s", &"t".repeat(MAX_TEXT_BYTES)).is_ok());
        assert!(validate_send("c", "s", &"t".repeat(MAX_TEXT_BYTES + 1)).is_err());
        assert!(validate_send(&long_name, "s", "t").is_err());
        assert!(validate_send("c", &long_name, "t").is_err());
        assert!(validate_send("c", "s", "").is_err());
        assert!(validate_send("", "s", "t").is_err());
    }
}
