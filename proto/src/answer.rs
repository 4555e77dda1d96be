//! Reading a provider's token-endpoint answer leniently, shared by the agent
//! (refreshes) and `tokenctl login` (sign-in): the fields from JSON or a
//! form-encoded body, strings that are never empty, and lifetimes given as
//! numbers or numeric strings.

use serde_json::{Map, Value};

/// The body's fields: from a form-encoded body when the provider labels it
/// so (GitHub without `Accept: application/json`), else from a JSON object
/// whatever the label (some providers send JSON as text/plain). `None` when
/// the body is neither.
pub fn fields(content_type: Option<&str>, body: &[u8]) -> Option<Map<String, Value>> {
    let media_type = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|mt| mt.trim().to_ascii_lowercase());

    if media_type.as_deref() == Some("application/x-www-form-urlencoded") {
        let fields: Map<String, Value> = form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect();
        return (!fields.is_empty()).then_some(fields);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Some(fields),
        _ => None,
    }
}

/// A string field; absent when missing, empty or not a string.
pub fn text(fields: &Map<String, Value>, name: &str) -> Option<String> {
    match fields.get(name)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

/// A number of seconds as a JSON number or a numeric string (Entra sends
/// strings). May be zero or negative; callers decide what that means.
pub fn seconds(fields: &Map<String, Value>, name: &str) -> Option<i64> {
    match fields.get(name)? {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<f64>().ok().map(|f| f as i64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_and_json_bodies_both_read() {
        let form = fields(
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            b"access_token=a&expires_in=60",
        )
        .unwrap();
        assert_eq!(text(&form, "access_token").as_deref(), Some("a"));
        assert_eq!(seconds(&form, "expires_in"), Some(60));

        let json = fields(Some("text/plain"), br#"{"expires_in":"3600","scope":""}"#).unwrap();
        assert_eq!(seconds(&json, "expires_in"), Some(3600));
        assert_eq!(text(&json, "scope"), None);
        assert!(fields(Some("text/html"), b"<html>").is_none());
    }
}
