//! Values and Postgres types: how SQLite values become Postgres text and binary
//! encodings.
//!
//! SQLite stores five storage classes; the engine keeps them as [`Datum`]s and
//! renders them according to the column's [`PgType`], so a `boolean` column stored
//! as `0/1` goes out as `f/t`, and `mz_timestamp` goes out as bare digits. This
//! module spawns nothing.

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};

use super::error::SqlError;

/// The Postgres types the engine can describe on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum PgType {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Numeric,
    /// `numeric(39,0)`: how Materialize sends `mz_timestamp` (OID 1700, typmod 2555908).
    MzTimestamp,
    Text,
    Jsonb,
    Timestamp,
    Timestamptz,
    Date,
    Bytea,
}

impl PgType {
    pub(crate) fn oid(self) -> u32 {
        match self {
            PgType::Bool => 16,
            PgType::Int2 => 21,
            PgType::Int4 => 23,
            PgType::Int8 => 20,
            PgType::Float4 => 700,
            PgType::Float8 => 701,
            PgType::Numeric | PgType::MzTimestamp => 1700,
            PgType::Text => 25,
            PgType::Jsonb => 3802,
            PgType::Timestamp => 1114,
            PgType::Timestamptz => 1184,
            PgType::Date => 1082,
            PgType::Bytea => 17,
        }
    }

    pub(crate) fn typlen(self) -> i16 {
        match self {
            PgType::Bool => 1,
            PgType::Int2 => 2,
            PgType::Int4 | PgType::Float4 | PgType::Date => 4,
            PgType::Int8 | PgType::Float8 | PgType::Timestamp | PgType::Timestamptz => 8,
            _ => -1,
        }
    }

    pub(crate) fn typmod(self) -> i32 {
        match self {
            PgType::MzTimestamp => 2_555_908,
            _ => -1,
        }
    }

    pub(crate) fn from_oid(oid: u32) -> Option<PgType> {
        Some(match oid {
            16 => PgType::Bool,
            21 => PgType::Int2,
            23 => PgType::Int4,
            20 => PgType::Int8,
            700 => PgType::Float4,
            701 => PgType::Float8,
            1700 => PgType::Numeric,
            25 | 1043 | 1042 | 19 | 705 => PgType::Text,
            3802 | 114 => PgType::Jsonb,
            1114 => PgType::Timestamp,
            1184 => PgType::Timestamptz,
            1082 => PgType::Date,
            17 => PgType::Bytea,
            _ => return None,
        })
    }

    /// Maps a declared (Postgres or SQLite) type name to a wire type. Unknown names
    /// are text, which every value can be rendered as.
    pub(crate) fn from_decl(decl: &str) -> PgType {
        let d = decl.trim().to_ascii_lowercase();
        let base = d.split(['(', '[']).next().unwrap_or("").trim();
        match base {
            "bool" | "boolean" => PgType::Bool,
            "smallint" | "int2" => PgType::Int2,
            "int" | "integer" | "int4" | "mediumint" => PgType::Int4,
            "bigint" | "int8" | "mz_timestamp" | "uint8" | "uint4" => PgType::Int8,
            "real" | "float4" => PgType::Float4,
            "double precision" | "double" | "float8" | "float" => PgType::Float8,
            "numeric" | "decimal" | "num" => PgType::Numeric,
            "json" | "jsonb" => PgType::Jsonb,
            "timestamp" | "timestamp without time zone" | "datetime" => PgType::Timestamp,
            "timestamptz" | "timestamp with time zone" => PgType::Timestamptz,
            "date" => PgType::Date,
            "bytea" | "blob" => PgType::Bytea,
            _ => PgType::Text,
        }
    }

    /// The SQLite type name used for `CAST(x AS ...)` when translating `x::type`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            PgType::Bool => "boolean",
            PgType::Int2 => "smallint",
            PgType::Int4 => "integer",
            PgType::Int8 => "bigint",
            PgType::Float4 => "real",
            PgType::Float8 => "double precision",
            PgType::Numeric => "numeric",
            PgType::MzTimestamp => "mz_timestamp",
            PgType::Text => "text",
            PgType::Jsonb => "jsonb",
            PgType::Timestamp => "timestamp",
            PgType::Timestamptz => "timestamptz",
            PgType::Date => "date",
            PgType::Bytea => "bytea",
        }
    }

    pub(crate) fn is_int(self) -> bool {
        matches!(self, PgType::Int2 | PgType::Int4 | PgType::Int8)
    }

    pub(crate) fn is_float(self) -> bool {
        matches!(self, PgType::Float4 | PgType::Float8)
    }
}

/// A described output column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) ty: PgType,
}

impl Column {
    pub(crate) fn new(name: impl Into<String>, ty: PgType) -> Column {
        Column {
            name: name.into(),
            ty,
        }
    }
}

/// One SQLite value. Hashable and totally ordered so rows can key the multiset
/// of a subscription's previous result.
#[derive(Clone, Debug)]
pub(crate) enum Datum {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

pub(crate) type Row = Vec<Datum>;

impl Datum {
    fn rank(&self) -> u8 {
        match self {
            Datum::Null => 0,
            Datum::Int(_) => 1,
            Datum::Real(_) => 2,
            Datum::Text(_) => 3,
            Datum::Blob(_) => 4,
        }
    }

    pub(crate) fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Datum {
        use rusqlite::types::ValueRef;
        match v {
            ValueRef::Null => Datum::Null,
            ValueRef::Integer(i) => Datum::Int(i),
            ValueRef::Real(f) => Datum::Real(f),
            ValueRef::Text(t) => Datum::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Datum::Blob(b.to_vec()),
        }
    }

    pub(crate) fn as_value_ref(&self) -> rusqlite::types::ValueRef<'_> {
        use rusqlite::types::ValueRef;
        match self {
            Datum::Null => ValueRef::Null,
            Datum::Int(i) => ValueRef::Integer(*i),
            Datum::Real(f) => ValueRef::Real(*f),
            Datum::Text(s) => ValueRef::Text(s.as_bytes()),
            Datum::Blob(b) => ValueRef::Blob(b),
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        matches!(self, Datum::Null)
    }

    /// The Postgres text encoding of this value as a column of type `ty`;
    /// `None` for NULL.
    pub(crate) fn to_text(&self, ty: PgType) -> Option<String> {
        Some(match (self, ty) {
            (Datum::Null, _) => return None,
            (Datum::Int(i), PgType::Bool) => if *i != 0 { "t" } else { "f" }.to_owned(),
            (Datum::Real(f), PgType::Bool) => if *f != 0.0 { "t" } else { "f" }.to_owned(),
            (Datum::Text(s), PgType::Bool) => match parse_bool(s) {
                Some(true) => "t".to_owned(),
                Some(false) => "f".to_owned(),
                None => s.clone(),
            },
            (Datum::Int(i), _) => i.to_string(),
            (Datum::Real(f), t) if t.is_int() && f.fract() == 0.0 && f.abs() < 9.2e18 => {
                (*f as i64).to_string()
            }
            (Datum::Real(f), PgType::Numeric | PgType::MzTimestamp) => format_numeric(*f),
            (Datum::Real(f), _) => format_float(*f),
            (Datum::Text(s), _) => s.clone(),
            (Datum::Blob(b), PgType::Bytea) => {
                let mut s = String::with_capacity(2 + b.len() * 2);
                s.push_str("\\x");
                for byte in b {
                    let _ = write!(s, "{byte:02x}");
                }
                s
            }
            (Datum::Blob(b), _) => String::from_utf8_lossy(b).into_owned(),
        })
    }

    /// The Postgres binary encoding of this value as a column of type `ty`;
    /// `None` for NULL.
    pub(crate) fn to_binary(&self, ty: PgType) -> Result<Option<Vec<u8>>, SqlError> {
        if self.is_null() {
            return Ok(None);
        }
        let bad = || {
            SqlError::new(
                "22P02",
                format!("cannot encode {self:?} as {} in binary format", ty.name()),
            )
        };
        Ok(Some(match ty {
            PgType::Bool => vec![u8::from(self.to_text(ty).as_deref() == Some("t"))],
            PgType::Int2 => (self.as_i64().ok_or_else(bad)? as i16)
                .to_be_bytes()
                .to_vec(),
            PgType::Int4 => (self.as_i64().ok_or_else(bad)? as i32)
                .to_be_bytes()
                .to_vec(),
            PgType::Int8 => self.as_i64().ok_or_else(bad)?.to_be_bytes().to_vec(),
            PgType::Float4 => (self.as_f64().ok_or_else(bad)? as f32)
                .to_be_bytes()
                .to_vec(),
            PgType::Float8 => self.as_f64().ok_or_else(bad)?.to_be_bytes().to_vec(),
            PgType::Numeric | PgType::MzTimestamp => {
                numeric_binary(&self.to_text(ty).unwrap_or_default()).ok_or_else(bad)?
            }
            PgType::Text => self.to_text(ty).unwrap_or_default().into_bytes(),
            PgType::Jsonb => {
                let mut v = vec![1u8];
                v.extend_from_slice(self.to_text(ty).unwrap_or_default().as_bytes());
                v
            }
            PgType::Timestamp | PgType::Timestamptz => {
                let text = self.to_text(ty).unwrap_or_default();
                let micros = parse_timestamp_micros(&text).ok_or_else(bad)?;
                (micros - PG_EPOCH_MICROS).to_be_bytes().to_vec()
            }
            PgType::Date => {
                let text = self.to_text(ty).unwrap_or_default();
                let micros = parse_timestamp_micros(&text).ok_or_else(bad)?;
                let days = (micros - PG_EPOCH_MICROS).div_euclid(86_400_000_000);
                (days as i32).to_be_bytes().to_vec()
            }
            PgType::Bytea => match self {
                Datum::Blob(b) => b.clone(),
                other => other.to_text(PgType::Text).unwrap_or_default().into_bytes(),
            },
        }))
    }

    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Datum::Int(i) => Some(*i),
            Datum::Real(f) if f.fract() == 0.0 => Some(*f as i64),
            Datum::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        match self {
            Datum::Int(i) => Some(*i as f64),
            Datum::Real(f) => Some(*f),
            Datum::Text(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

impl PartialEq for Datum {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Datum {}

impl PartialOrd for Datum {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Datum {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Datum::Int(a), Datum::Int(b)) => a.cmp(b),
            (Datum::Real(a), Datum::Real(b)) => a.total_cmp(b),
            (Datum::Text(a), Datum::Text(b)) => a.cmp(b),
            (Datum::Blob(a), Datum::Blob(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl Hash for Datum {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.rank().hash(state);
        match self {
            Datum::Null => {}
            Datum::Int(i) => i.hash(state),
            Datum::Real(f) => f.to_bits().hash(state),
            Datum::Text(s) => s.hash(state),
            Datum::Blob(b) => b.hash(state),
        }
    }
}

impl rusqlite::ToSql for Datum {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::ToSqlOutput;
        Ok(ToSqlOutput::Borrowed(self.as_value_ref()))
    }
}

pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Postgres `float8` text output (shortest round-trip digits, exponent outside
/// `1e-4 ..= 1e15`).
fn format_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e15).contains(&a) {
        let s = format!("{f:e}");
        match s.split_once('e') {
            Some((m, e)) => {
                let (sign, digits) = match e.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', e),
                };
                format!("{m}e{sign}{digits:0>2}")
            }
            None => s,
        }
    } else {
        format!("{f}")
    }
}

fn format_numeric(f: f64) -> String {
    if f.is_finite() {
        format!("{f}")
    } else {
        format_float(f)
    }
}

/// Postgres binary `numeric` from a decimal string; `None` when it is not one.
fn numeric_binary(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    let mut out = Vec::new();
    if s.eq_ignore_ascii_case("nan") {
        for v in [0i16, 0, 0xC000u16 as i16, 0] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        return Some(out);
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int_part, frac_part) = body.split_once('.').unwrap_or((body, ""));
    if int_part.is_empty() && frac_part.is_empty()
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let int_part = int_part.trim_start_matches('0');
    let dscale = frac_part.len();
    let int_pad = (4 - int_part.len() % 4) % 4;
    let frac_pad = (4 - frac_part.len() % 4) % 4;
    let digits_str: String = "0".repeat(int_pad) + int_part + frac_part + &"0".repeat(frac_pad);
    let mut groups: Vec<i16> = digits_str
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0')))
        .collect();
    let mut weight = ((int_pad + int_part.len()) / 4) as i32 - 1;
    while groups.first() == Some(&0) {
        groups.remove(0);
        weight -= 1;
    }
    while groups.last() == Some(&0) {
        groups.pop();
    }
    if groups.is_empty() {
        weight = 0;
    }
    let sign: u16 = if neg && !groups.is_empty() { 0x4000 } else { 0 };
    out.extend_from_slice(&(groups.len() as i16).to_be_bytes());
    out.extend_from_slice(&(weight as i16).to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&(dscale as i16).to_be_bytes());
    for g in groups {
        out.extend_from_slice(&g.to_be_bytes());
    }
    Some(out)
}

/// Microseconds from the Unix epoch to 2000-01-01, Postgres' binary epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Days since 1970-01-01 for a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats epoch milliseconds as Postgres `timestamptz` text in UTC.
pub(crate) fn format_timestamptz_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    let mut out = format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{s:02}");
    if milli != 0 {
        let frac = format!("{milli:03}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push_str("+00");
    out
}

/// Parses `YYYY-MM-DD[( |T)HH:MM[:SS[.ffffff]]][Z|(+|-)HH[:MM]]` to epoch microseconds.
pub(crate) fn parse_timestamp_micros(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, rest) = match s.find([' ', 'T']) {
        Some(i) => (&s[..i], s[i + 1..].trim()),
        None => (s, ""),
    };
    let mut dp = date.splitn(3, '-');
    let y: i64 = dp.next()?.parse().ok()?;
    let m: i64 = dp.next()?.parse().ok()?;
    let d: i64 = dp.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let mut micros = days_from_civil(y, m, d) * 86_400_000_000;
    if rest.is_empty() {
        return Some(micros);
    }
    let tz_at = rest.find(['+', '-', 'Z', 'z']);
    let (time, tz) = match tz_at {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let mut tp = time.trim().splitn(3, ':');
    let h: i64 = tp.next()?.parse().ok()?;
    let mi: i64 = tp.next()?.parse().ok()?;
    let sec = tp.next().unwrap_or("0");
    let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let whole: i64 = whole.parse().ok()?;
    let frac_digits: String = frac.chars().take(6).collect();
    let frac_micros: i64 = if frac_digits.is_empty() {
        0
    } else {
        format!("{frac_digits:0<6}").parse().ok()?
    };
    micros += ((h * 60 + mi) * 60 + whole) * 1_000_000 + frac_micros;
    if let Some(off) = tz.strip_prefix(['+', '-']) {
        let sign = if tz.starts_with('-') { -1 } else { 1 };
        let mut op = off.split(':');
        let oh: i64 = op.next()?.parse().ok()?;
        let om: i64 = op.next().unwrap_or("0").parse().ok()?;
        micros -= sign * (oh * 60 + om) * 60_000_000;
    }
    Some(micros)
}

/// COPY text-format escaping: backslash, tab, newline and carriage return.
pub(crate) fn copy_escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_binary_matches_postgres() {
        // 1651279773000 = 1 6512 7977 3000 → weight 3.
        let b = numeric_binary("1651279773000").unwrap();
        assert_eq!(&b[..8], &[0, 4, 0, 3, 0, 0, 0, 0]);
        assert_eq!(&b[8..], &[0, 1, 0x19, 0x70, 0x1f, 0x29, 0x0b, 0xb8]);
        let z = numeric_binary("0").unwrap();
        assert_eq!(z, vec![0, 0, 0, 0, 0, 0, 0, 0]);
        let f = numeric_binary("-1.5").unwrap();
        assert_eq!(f, vec![0, 2, 0, 0, 0x40, 0, 0, 1, 0, 1, 0x13, 0x88]);
        assert!(numeric_binary("abc").is_none());
    }

    #[test]
    fn text_rendering() {
        assert_eq!(Datum::Int(1).to_text(PgType::Bool).unwrap(), "t");
        assert_eq!(Datum::Int(0).to_text(PgType::Bool).unwrap(), "f");
        assert_eq!(Datum::Real(1.0).to_text(PgType::Float8).unwrap(), "1");
        assert_eq!(Datum::Real(1e20).to_text(PgType::Float8).unwrap(), "1e+20");
        assert_eq!(Datum::Real(2.5).to_text(PgType::Numeric).unwrap(), "2.5");
        assert!(Datum::Null.to_text(PgType::Text).is_none());
    }

    #[test]
    fn timestamps_round_trip() {
        let ms = 1_700_000_000_123;
        let text = format_timestamptz_ms(ms);
        assert_eq!(text, "2023-11-14 22:13:20.123+00");
        assert_eq!(parse_timestamp_micros(&text), Some(ms * 1000));
        assert_eq!(parse_timestamp_micros("1970-01-01"), Some(0));
        assert_eq!(parse_timestamp_micros("1970-01-01 01:00:00+01:00"), Some(0));
    }

    #[test]
    fn copy_escaping() {
        let mut s = String::new();
        copy_escape("a\tb\nc\\d\re", &mut s);
        assert_eq!(s, "a\\tb\\nc\\\\d\\re");
    }
}
