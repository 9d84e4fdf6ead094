//! Column values as partition keys and filters compare them: a request's text parsed
//! strictly as the column's type, and a row's JSON value, both brought to one
//! canonical text per type, so `42` in a path and `42` in a row are equal and `042`
//! is not a number. No request value ever reaches SQL: this is the only place they go.

use tokio_postgres::types::Type;

/// The longest request value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 256;

/// How a column's values are compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Integer,
    Text,
    Bool,
    Numeric,
    Uuid,
    Date,
    Timestamp,
    TimestampTz,
}

impl ValueKind {
    /// The kind of a column type, or `None` for types that cannot be a parameter
    /// (floats, JSON, arrays, intervals, bytes).
    pub fn of(t: &Type) -> Option<ValueKind> {
        Some(match *t {
            Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => ValueKind::Integer,
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::CHAR => ValueKind::Text,
            Type::BOOL => ValueKind::Bool,
            Type::NUMERIC => ValueKind::Numeric,
            Type::UUID => ValueKind::Uuid,
            Type::DATE => ValueKind::Date,
            Type::TIMESTAMP => ValueKind::Timestamp,
            Type::TIMESTAMPTZ => ValueKind::TimestampTz,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ValueKind::Integer => "an integer",
            ValueKind::Text => "text",
            ValueKind::Bool => "true or false",
            ValueKind::Numeric => "a decimal number",
            ValueKind::Uuid => "a UUID",
            ValueKind::Date => "a date (YYYY-MM-DD)",
            ValueKind::Timestamp => "a timestamp (YYYY-MM-DD HH:MM:SS[.ffffff])",
            ValueKind::TimestampTz => "a timestamp with a zone (...+00 or ...Z)",
        }
    }

    /// A request's value in canonical form, or why it is not one of this kind.
    pub fn parse(self, text: &str) -> Result<Box<str>, String> {
        if text.is_empty() {
            return Err("is empty".into());
        }
        if text.len() > MAX_VALUE_BYTES {
            return Err(format!("is longer than {MAX_VALUE_BYTES} bytes"));
        }
        if text.chars().any(char::is_control) {
            return Err("holds a control character".into());
        }
        let canonical = match self {
            ValueKind::Integer => integer(text),
            ValueKind::Text => Some(json_string(text)),
            ValueKind::Bool => match text {
                "true" => Some("true".into()),
                "false" => Some("false".into()),
                _ => None,
            },
            ValueKind::Numeric => numeric(text),
            ValueKind::Uuid => uuid(text),
            ValueKind::Date => date(text).then(|| text.to_string()),
            ValueKind::Timestamp => timestamp(text, false),
            ValueKind::TimestampTz => timestamp(text, true),
        };
        canonical
            .map(String::into_boxed_str)
            .ok_or_else(|| format!("is not {}", self.name()))
    }

    /// A row's JSON value (as the upstream sent it) in the same canonical form;
    /// `None` for SQL NULL, which no parameter equals.
    pub fn of_row(self, json: &str) -> Option<Box<str>> {
        if json == "null" {
            return None;
        }
        let inner = || -> Option<String> { serde_json::from_str::<String>(json).ok() };
        let canonical = match self {
            // Integers past 2^53 arrive as strings.
            ValueKind::Integer => match json.strip_prefix('"') {
                Some(_) => inner().as_deref().and_then(integer),
                None => integer(json),
            },
            ValueKind::Text => Some(json.to_string()),
            ValueKind::Bool => Some(json.to_string()),
            ValueKind::Numeric => inner().as_deref().and_then(numeric),
            ValueKind::Uuid => inner().as_deref().and_then(uuid),
            ValueKind::Date => inner(),
            ValueKind::Timestamp => inner().as_deref().and_then(|t| timestamp(t, false)),
            ValueKind::TimestampTz => inner().as_deref().and_then(|t| timestamp(t, true)),
        };
        canonical.map(String::into_boxed_str)
    }
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `-?(0|[1-9][0-9]*)` within i64.
fn integer(text: &str) -> Option<String> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    let well_formed = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    (well_formed && text.parse::<i64>().is_ok()).then(|| text.to_string())
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?`, with trailing zeros of the fraction dropped.
fn numeric(text: &str) -> Option<String> {
    let (sign, rest) = match text.strip_prefix('-') {
        Some(r) => ("-", r),
        None => ("", text),
    };
    let (int, frac) = rest.split_once('.').unwrap_or((rest, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty()
        || !digits(int)
        || (int.len() > 1 && int.starts_with('0'))
        || !digits(frac)
        || (rest.contains('.') && frac.is_empty())
    {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    let zero = int == "0" && frac.is_empty();
    let sign = if zero { "" } else { sign };
    Some(match frac {
        "" => format!("{sign}{int}"),
        f => format!("{sign}{int}.{f}"),
    })
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex in either case, as lower case.
fn uuid(text: &str) -> Option<String> {
    let groups: Vec<&str> = text.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| text.to_ascii_lowercase())
}

/// `YYYY-MM-DD`, a real calendar date.
fn date(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return false;
    }
    let num = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|_| s.bytes().all(|c| c.is_ascii_digit()))
    };
    let (Some(y), Some(m), Some(d)) = (num(&text[..4]), num(&text[5..7]), num(&text[8..])) else {
        return false;
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1..=days).contains(&d)
}

/// `YYYY-MM-DD[ T]HH:MM:SS[.f{1,6}]`, and for `zoned` a UTC zone (`+00`, `+00:00`
/// or `Z`): as `YYYY-MM-DD HH:MM:SS[.f]` (+ `+00`), the fraction without trailing
/// zeros — the form Materialize prints.
fn timestamp(text: &str, zoned: bool) -> Option<String> {
    let (body, zone_ok) = if zoned {
        let body = text
            .strip_suffix("+00:00")
            .or_else(|| text.strip_suffix("+00"))
            .or_else(|| text.strip_suffix('Z'));
        (body?, true)
    } else {
        (text, true)
    };
    if !zone_ok || body.len() < 19 {
        return None;
    }
    let (day, time) = (&body[..10], &body[11..]);
    if !date(day) || !matches!(body.as_bytes()[10], b' ' | b'T') {
        return None;
    }
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let parts: Vec<&str> = hms.split(':').collect();
    let within = |s: &str, max: u32| {
        s.len() == 2
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|v| v <= max)
    };
    if parts.len() != 3
        || !within(parts[0], 23)
        || !within(parts[1], 59)
        || !within(parts[2], 59)
        || frac.len() > 6
        || (time.contains('.') && frac.is_empty())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let frac = frac.trim_end_matches('0');
    let mut out = format!("{day} {hms}");
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    if zoned {
        out.push_str("+00");
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_values_are_parsed_strictly_and_canonically() {
        use ValueKind::*;
        let ok = |k: ValueKind, t: &str, want: &str| {
            assert_eq!(k.parse(t).as_deref(), Ok(want), "{k:?} {t:?}");
        };
        ok(Integer, "42", "42");
        ok(Integer, "-7", "-7");
        ok(Integer, "0", "0");
        ok(Text, "it's \"x\" é", "\"it's \\\"x\\\" é\"");
        ok(Bool, "true", "true");
        ok(Numeric, "1.50", "1.5");
        ok(Numeric, "-0.0", "0");
        ok(Numeric, "10", "10");
        ok(
            Uuid,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        );
        ok(Date, "2024-02-29", "2024-02-29");
        ok(
            Timestamp,
            "2024-01-02T03:04:05.120",
            "2024-01-02 03:04:05.12",
        );
        ok(
            TimestampTz,
            "2024-01-02 03:04:05Z",
            "2024-01-02 03:04:05+00",
        );
        let bad = |k: ValueKind, t: &str| assert!(k.parse(t).is_err(), "{k:?} {t:?}");
        for t in [
            "042",
            "1 OR 1=1",
            "'; DROP TABLE x; --",
            "+1",
            "1e3",
            "-0",
            "٤٢",
            "",
            "9223372036854775808",
            "[1]",
            "{\"a\":1}",
        ] {
            bad(Integer, t);
        }
        bad(Integer, &"1".repeat(10_000));
        bad(Text, "a\u{0}b");
        bad(Text, &"x".repeat(MAX_VALUE_BYTES + 1));
        bad(Bool, "t");
        bad(Numeric, "1.");
        bad(Numeric, ".5");
        bad(Numeric, "01.5");
        bad(Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1");
        bad(Date, "2023-02-29");
        bad(Date, "2024-13-01");
        bad(Timestamp, "2024-01-02 24:00:00");
        bad(TimestampTz, "2024-01-02 03:04:05+01");
    }

    #[test]
    fn row_values_meet_request_values() {
        use ValueKind::*;
        let same = |k: ValueKind, row: &str, request: &str| {
            assert_eq!(
                k.of_row(row),
                k.parse(request).ok(),
                "{k:?} {row} vs {request}"
            );
        };
        same(Integer, "42", "42");
        same(Integer, "\"9007199254740993\"", "9007199254740993");
        same(Text, "\"eu-west\"", "eu-west");
        same(Bool, "false", "false");
        same(Numeric, "\"12.3400\"", "12.34");
        same(
            Uuid,
            "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\"",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        );
        same(Date, "\"2024-01-02\"", "2024-01-02");
        same(
            Timestamp,
            "\"2024-01-02 03:04:05.5\"",
            "2024-01-02T03:04:05.500",
        );
        same(
            TimestampTz,
            "\"2024-01-02 03:04:05+00\"",
            "2024-01-02T03:04:05Z",
        );
        assert_eq!(Integer.of_row("null"), None);
    }
}
