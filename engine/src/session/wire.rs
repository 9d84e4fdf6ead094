//! Result encoding for pgwire: RowDescription and DataRow in text or binary
//! per the client's format codes, and ErrorResponse fields.

use bytes::{BufMut, BytesMut};
use pgwire::error::ErrorInfo;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};

use crate::error::SqlError;
use crate::value::{Column, PgType, Row};

pub(super) fn error_info(e: &SqlError) -> ErrorInfo {
    ErrorInfo::new("ERROR".to_owned(), e.code.to_owned(), e.message.clone())
}

pub(super) fn row_description(columns: &[Column], formats: &[i16]) -> RowDescription {
    RowDescription::new(
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                FieldDescription::new(
                    c.name.clone(),
                    0,
                    0,
                    c.ty.oid(),
                    c.ty.typlen(),
                    c.ty.typmod(),
                    format_of(formats, i),
                )
            })
            .collect(),
    )
}

pub(super) fn format_of(formats: &[i16], i: usize) -> i16 {
    match formats {
        [] => 0,
        [one] => *one,
        many => many.get(i).copied().unwrap_or(0),
    }
}

pub(super) fn data_row(
    row: &Row,
    columns: &[Column],
    formats: &[i16],
) -> Result<DataRow, SqlError> {
    let mut buf = BytesMut::new();
    for (i, d) in row.iter().enumerate() {
        let ty = columns.get(i).map(|c| c.ty).unwrap_or(PgType::Text);
        let bytes = if format_of(formats, i) == 1 {
            d.to_binary(ty)?
        } else {
            d.to_text(ty).map(String::into_bytes)
        };
        match bytes {
            None => buf.put_i32(-1),
            Some(b) => {
                buf.put_i32(b.len() as i32);
                buf.put_slice(&b);
            }
        }
    }
    Ok(DataRow::new(buf, row.len() as i16))
}
