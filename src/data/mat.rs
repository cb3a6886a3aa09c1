//! A minimal MATLAB 5.0 (.mat, "MAT v5") reader: numeric, char, struct and cell arrays, both byte
//! orders, and zlib-compressed elements (`miCOMPRESSED`). Enough for CARS196's `cars_annos.mat`
//! (`annotations` struct array with `relative_im_path` and `class`, and the `class_names` cell).
//! Sparse, object and function-handle arrays are read as [`MatValue::Unsupported`].

use std::io::Read;
use std::path::Path;

use super::{DataError, DataResult};

const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
const MI_UTF32: u32 = 18;

const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;

/// A decoded MATLAB array. Multi-element arrays are in MATLAB's column-major order.
#[derive(Clone, Debug, PartialEq)]
pub enum MatValue {
    Numeric {
        dims: Vec<usize>,
        data: Vec<f64>,
    },
    Char {
        dims: Vec<usize>,
        text: String,
    },
    Struct {
        dims: Vec<usize>,
        fields: Vec<String>,
        /// `elements[i][f]` = field `fields[f]` of element `i`.
        elements: Vec<Vec<MatValue>>,
    },
    Cell {
        dims: Vec<usize>,
        items: Vec<MatValue>,
    },
    /// An empty `miMATRIX` element (MATLAB's `[]`).
    Empty,
    Unsupported {
        class: u8,
    },
}

impl MatValue {
    /// The struct field `name` of element `index`.
    pub fn field(&self, index: usize, name: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct {
                fields, elements, ..
            } => {
                let f = fields.iter().position(|n| n == name)?;
                elements.get(index)?.get(f)
            }
            _ => None,
        }
    }

    /// The first number of a numeric array.
    pub fn scalar(&self) -> Option<f64> {
        match self {
            MatValue::Numeric { data, .. } => data.first().copied(),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            MatValue::Char { text, .. } => Some(text),
            _ => None,
        }
    }
}

/// A byte cursor that knows the file's byte order.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    little: bool,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| {
            format!(
                "element at byte {} needs {n} bytes but only {} remain (truncated file?)",
                self.pos,
                self.bytes.len() - self.pos
            )
        })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b: [u8; 4] = self.take(4)?.try_into().expect("4 bytes");
        Ok(if self.little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }
}

/// One data element: its type and payload.
struct Element<'a> {
    kind: u32,
    data: &'a [u8],
}

/// Reads a tag and payload, handling the "small data element" form and 8-byte padding.
fn read_element<'a>(c: &mut Cursor<'a>) -> Result<Element<'a>, String> {
    let first = c.u32()?;
    // In either byte order the word reads as (length << 16) | type for a small element.
    let small_len = first >> 16;
    if small_len != 0 {
        // Small element: type in the low 16 bits, length in the high 16, data in the next 4 bytes.
        let kind = first & 0xFFFF;
        let slot = c.take(4)?;
        if small_len > 4 {
            return Err(format!(
                "small data element claims {small_len} bytes (max 4)"
            ));
        }
        return Ok(Element {
            kind,
            data: &slot[..small_len as usize],
        });
    }
    let kind = first;
    let len = c.u32()? as usize;
    let data = c.take(len)?;
    // Compressed elements are not padded; all others are padded to a multiple of 8 bytes.
    if kind != MI_COMPRESSED {
        let pad = (8 - len % 8) % 8;
        let pad = pad.min(c.bytes.len() - c.pos);
        c.take(pad)?;
    }
    Ok(Element { kind, data })
}

/// Decodes a numeric payload of any stored type into f64.
fn numbers(e: &Element, little: bool) -> Result<Vec<f64>, String> {
    macro_rules! conv {
        ($t:ty, $n:expr) => {
            e.data
                .chunks_exact($n)
                .map(|b| {
                    let a: [u8; $n] = b.try_into().expect("chunk size");
                    (if little {
                        <$t>::from_le_bytes(a)
                    } else {
                        <$t>::from_be_bytes(a)
                    }) as f64
                })
                .collect()
        };
    }
    Ok(match e.kind {
        MI_INT8 => e.data.iter().map(|&b| b as i8 as f64).collect(),
        MI_UINT8 | MI_UTF8 => e.data.iter().map(|&b| b as f64).collect(),
        MI_INT16 => conv!(i16, 2),
        MI_UINT16 | MI_UTF16 => conv!(u16, 2),
        MI_INT32 => conv!(i32, 4),
        MI_UINT32 | MI_UTF32 => conv!(u32, 4),
        MI_SINGLE => conv!(f32, 4),
        MI_DOUBLE => conv!(f64, 8),
        MI_INT64 => conv!(i64, 8),
        MI_UINT64 => conv!(u64, 8),
        k => return Err(format!("unexpected data type {k} for numeric data")),
    })
}

/// The largest inflated element read: the annotation files of Cars196 are a few MB, so anything
/// near this is a decompression bomb, refused before it exhausts memory.
const MAX_INFLATED_BYTES: u64 = 1 << 30;

fn inflate(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::ZlibDecoder::new(data)
        .take(MAX_INFLATED_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("cannot inflate a compressed element: {e}"))?;
    if out.len() as u64 > MAX_INFLATED_BYTES {
        return Err(format!(
            "a compressed element unpacks to more than {} MiB, the limit for a MAT file",
            MAX_INFLATED_BYTES >> 20
        ));
    }
    Ok(out)
}

/// Parses a top-level or nested element into (name, value).
fn parse_variable(e: &Element, little: bool) -> Result<(String, MatValue), String> {
    match e.kind {
        MI_COMPRESSED => {
            let raw = inflate(e.data)?;
            let mut c = Cursor {
                bytes: &raw,
                pos: 0,
                little,
            };
            let inner = read_element(&mut c)?;
            parse_variable(&inner, little)
        }
        MI_MATRIX => parse_matrix(e.data, little),
        k => Err(format!("expected a matrix element, found data type {k}")),
    }
}

fn parse_matrix(data: &[u8], little: bool) -> Result<(String, MatValue), String> {
    if data.is_empty() {
        return Ok((String::new(), MatValue::Empty));
    }
    let mut c = Cursor {
        bytes: data,
        pos: 0,
        little,
    };
    let flags = numbers(&read_element(&mut c)?, little)?;
    let class = flags.first().copied().unwrap_or(0.0) as u32 as u8;
    let dims: Vec<usize> = numbers(&read_element(&mut c)?, little)?
        .into_iter()
        .map(|d| d as usize)
        .collect();
    let name_el = read_element(&mut c)?;
    let name = String::from_utf8_lossy(name_el.data).into_owned();
    let count: usize = dims.iter().product();
    let value = match class {
        MX_STRUCT => {
            let name_len = numbers(&read_element(&mut c)?, little)?
                .first()
                .copied()
                .unwrap_or(0.0) as usize;
            let names_el = read_element(&mut c)?;
            let fields: Vec<String> = if name_len == 0 {
                Vec::new()
            } else {
                names_el
                    .data
                    .chunks(name_len)
                    .map(|n| {
                        let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
                        String::from_utf8_lossy(&n[..end]).into_owned()
                    })
                    .collect()
            };
            let mut elements = Vec::with_capacity(count);
            for _ in 0..count {
                let mut row = Vec::with_capacity(fields.len());
                for _ in 0..fields.len() {
                    row.push(parse_variable(&read_element(&mut c)?, little)?.1);
                }
                elements.push(row);
            }
            MatValue::Struct {
                dims,
                fields,
                elements,
            }
        }
        MX_CELL => {
            let mut items = Vec::with_capacity(count);
            for _ in 0..count {
                items.push(parse_variable(&read_element(&mut c)?, little)?.1);
            }
            MatValue::Cell { dims, items }
        }
        MX_CHAR => {
            let el = if c.at_end() {
                None
            } else {
                Some(read_element(&mut c)?)
            };
            let text = match el {
                None => String::new(),
                Some(el) if el.kind == MI_UTF8 || el.kind == MI_UINT8 || el.kind == MI_INT8 => {
                    String::from_utf8_lossy(el.data).into_owned()
                }
                Some(el) => {
                    let units: Vec<u16> = numbers(&el, little)?
                        .into_iter()
                        .map(|u| u as u16)
                        .collect();
                    String::from_utf16_lossy(&units)
                }
            };
            // Multi-row char arrays are column-major; only single-row strings are used here.
            MatValue::Char { dims, text }
        }
        6..=15 => {
            let data = if c.at_end() {
                Vec::new()
            } else {
                numbers(&read_element(&mut c)?, little)?
            };
            MatValue::Numeric { dims, data }
        }
        other => MatValue::Unsupported { class: other },
    };
    Ok((name, value))
}

/// Reads every variable of a MAT v5 file.
pub fn read_mat(path: &Path) -> DataResult<Vec<(String, MatValue)>> {
    let bytes = crate::files::read_regular(path).map_err(|e| DataError::io(path, e))?;
    parse_mat(&bytes).map_err(|d| DataError::bad_file(path, format!("MAT v5: {d}")))
}

/// Parses the bytes of a MAT v5 file.
pub fn parse_mat(bytes: &[u8]) -> Result<Vec<(String, MatValue)>, String> {
    if bytes.len() < 128 {
        return Err("shorter than the 128-byte MAT header".into());
    }
    let little =
        match &bytes[126..128] {
            b"IM" => true,
            b"MI" => false,
            _ => return Err(
                "no MAT v5 endian marker; is this a MAT v7.3 (HDF5) or v4 file? save it with -v7"
                    .into(),
            ),
        };
    let mut c = Cursor {
        bytes,
        pos: 128,
        little,
    };
    let mut vars = Vec::new();
    while !c.at_end() {
        let e = read_element(&mut c)?;
        vars.push(parse_variable(&e, little)?);
    }
    Ok(vars)
}

fn find_var<'a>(vars: &'a [(String, MatValue)], name: &str) -> Option<&'a MatValue> {
    vars.iter().find(|(n, _)| n == name).map(|(_, v)| v)
}

/// CARS196's `annotations`: (relative_im_path, class) for every image, in file order.
pub fn read_cars_annotations(path: &Path) -> DataResult<Vec<(String, u64)>> {
    let vars = read_mat(path)?;
    let annos = find_var(&vars, "annotations")
        .ok_or_else(|| DataError::bad_file(path, "no variable named 'annotations'"))?;
    let count = match annos {
        MatValue::Struct { elements, .. } => elements.len(),
        _ => {
            return Err(DataError::bad_file(
                path,
                "'annotations' is not a struct array",
            ))
        }
    };
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let rel = annos.field(i, "relative_im_path").and_then(MatValue::text);
        let class = annos.field(i, "class").and_then(MatValue::scalar);
        match (rel, class) {
            (Some(rel), Some(class)) if class >= 0.0 => out.push((rel.to_string(), class as u64)),
            _ => {
                return Err(DataError::bad_file(
                    path,
                    format!("annotations({}) lacks relative_im_path or class", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// CARS196's `class_names` cell array, if present.
pub fn read_cars_class_names(path: &Path) -> Option<Vec<String>> {
    let vars = read_mat(path).ok()?;
    match find_var(&vars, "class_names")? {
        MatValue::Cell { items, .. } => {
            items.iter().map(|v| v.text().map(str::to_string)).collect()
        }
        _ => None,
    }
}
