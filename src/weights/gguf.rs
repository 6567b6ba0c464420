//! A reader of GGUF files (the format of llama.cpp, ollama and QVAC), versions 2 and 3, over a
//! memory map: header, metadata, tensor infos and the aligned data section. Nothing is copied
//! but the metadata; tensor data are byte ranges of the map.
//!
//! Layout (little-endian): `GGUF`, version (u32), tensor count (u64), metadata count (u64);
//! metadata entries `key (string), type (u32), value`; tensor infos `name (string), n_dims (u32),
//! ne[n_dims] (u64, innermost first), type (u32), offset (u64, from the data section)`; the data
//! section starts at the next multiple of `general.alignment` (default 32). A string is a u64
//! length and UTF-8 bytes; an array is an element type (u32), a count (u64) and the elements.
//!
//! Every count and length is checked against the bytes left before anything is allocated, so
//! a truncated or random file gives an error naming the file and the entry, never a panic.

use crate::error::{Error, Result};
use kernels_ref::quant::GgmlType;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// An unsigned integer of any width (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            _ => self.as_i64().and_then(|v| u64::try_from(v).ok()),
        }
    }
    /// A signed integer of any width (a u64 above i64::MAX gives None).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }
    /// A number of any type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(v) => Some(v),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// One tensor of the file.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's order: innermost (contiguous) dimension first. The row-major shape is its reverse.
    pub ne: Vec<usize>,
    pub ty: GgmlType,
    /// Byte range in the file (already checked to lie inside it).
    pub start: usize,
    pub len: usize,
}

impl TensorInfo {
    /// Row-major shape (outermost first), as Hugging Face and the models name it.
    pub fn shape(&self) -> Vec<usize> {
        self.ne.iter().rev().copied().collect()
    }
    pub fn numel(&self) -> usize {
        self.ne.iter().product()
    }
}

pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    version: u32,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: std::collections::HashMap<String, usize>,
}

/// Most nesting of arrays inside arrays (real files use none; a random file must not recurse deep).
const MAX_DEPTH: usize = 4;

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> std::result::Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "{} needs {n} bytes at offset {} but the file ends at {}: it is truncated",
                what(),
                self.pos,
                self.bytes.len()
            ));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn left(&self) -> usize {
        self.bytes.len() - self.pos
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> std::result::Result<u64, String> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    /// A count of items of at least `min_size` bytes each, that must fit in the bytes left.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> std::result::Result<usize, String> {
        let n = self.u64(what)?;
        match usize::try_from(n) {
            Ok(n) if n.saturating_mul(min_size.max(1)) <= self.left() => Ok(n),
            _ => Err(format!(
                "{} claims {n} entries but only {} bytes are left: the file is corrupt or truncated",
                what(),
                self.left()
            )),
        }
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> std::result::Result<String, String> {
        let n = self.count(1, what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{} is not valid UTF-8", what()))
    }
    fn value(
        &mut self,
        ty: u32,
        depth: usize,
        what: &dyn Fn() -> String,
    ) -> std::result::Result<MetaValue, String> {
        Ok(match ty {
            0 => MetaValue::U8(self.take(1, what)?[0]),
            1 => MetaValue::I8(self.take(1, what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2"))),
            3 => MetaValue::I16(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2"))),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(self.u32(what)? as i32),
            6 => MetaValue::F32(f32::from_bits(self.u32(what)?)),
            7 => match self.take(1, what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(format!("{} is a bool stored as {b}, not 0 or 1", what())),
            },
            8 => MetaValue::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{} nests arrays more than {MAX_DEPTH} deep", what()));
                }
                let elem = self.u32(what)?;
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8..=12 => 8,
                    t => return Err(format!("{} is an array of unknown value type {t}", what())),
                };
                let n = self.count(min, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1, what)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(self.u64(what)? as i64),
            12 => MetaValue::F64(f64::from_bits(self.u64(what)?)),
            t => return Err(format!("{} has unknown value type {t}", what())),
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?;
        // SAFETY: opened read-only and not modified by this process while mapped; a concurrent
        // writer elsewhere is a user error we cannot rule out, as with any mmap.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::Io { path: path.into(), cause: e })?;
        Self::parse(path, map)
    }

    fn parse(path: &Path, map: memmap2::Mmap) -> Result<GgufFile> {
        let fail = |detail: String| Error::Checkpoint { path: path.to_path_buf(), detail };
        let (version, metadata, tensors) = Self::parse_bytes(&map).map_err(fail)?;
        let mut by_name = std::collections::HashMap::new();
        for (i, t) in tensors.iter().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    detail: format!("tensor {} appears twice: the file is corrupt", t.name),
                });
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), map, version, metadata, tensors, by_name })
    }

    #[allow(clippy::type_complexity)]
    fn parse_bytes(
        bytes: &[u8],
    ) -> std::result::Result<(u32, BTreeMap<String, MetaValue>, Vec<TensorInfo>), String> {
        let mut c = Cursor { bytes, pos: 0 };
        let magic = c.take(4, &|| "the GGUF magic".into()).map_err(|_| {
            format!("not a GGUF file: only {} bytes (a GGUF file starts with the bytes GGUF)", bytes.len())
        })?;
        if magic != b"GGUF" {
            return Err(format!("not a GGUF file: it starts with {magic:02x?}, not the bytes \"GGUF\""));
        }
        let version = c.u32(&|| "the version".into())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(
                    "GGUF version 1 is not supported (re-convert the model with a current llama.cpp)".into()
                )
            }
            v if v.swap_bytes() <= 3 => {
                return Err("this is a big-endian GGUF file; only little-endian files are supported".into())
            }
            v => return Err(format!("GGUF version {v} is not supported (versions 2 and 3 are)")),
        }
        let n_tensors = c.count(24, &|| "the tensor count".into())?;
        let n_meta = c.count(12, &|| "the metadata count".into())?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_meta {
            let key = c.string(&|| format!("metadata entry {i}'s key"))?;
            let what = || format!("metadata {key:?}");
            let ty = c.u32(&what)?;
            let value = c.value(ty, 0, &what)?;
            metadata.insert(key, value);
        }
        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a as usize,
                _ => return Err(format!("general.alignment is {v:?}; it must be a power of two")),
            },
        };
        let mut infos = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor info {i}'s name"))?;
            let what = || format!("tensor {name}");
            let n_dims = c.u32(&what)? as usize;
            if n_dims == 0 || n_dims > 4 {
                return Err(format!("tensor {name} has {n_dims} dimensions (1 to 4 are valid)"));
            }
            let mut ne = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&what)?;
                ne.push(
                    usize::try_from(d).ok().filter(|&d| d <= 1 << 40).ok_or_else(|| {
                        format!("tensor {name} has a dimension of {d}: the file is corrupt")
                    })?,
                );
            }
            let ty_id = c.u32(&what)?;
            let ty = GgmlType::from_id(ty_id).ok_or_else(|| {
                format!(
                    "tensor {name} has ggml type {ty_id}, which pockettune cannot read (it reads {})",
                    GgmlType::ALL.map(|t| t.name()).join(", ")
                )
            })?;
            let offset = c.u64(&what)?;
            infos.push((name, ne, ty, offset));
        }
        let data_start = c.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(n_tensors);
        for (name, ne, ty, offset) in infos {
            let numel = ne.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let len = numel.filter(|n| n % ty.block_elems() == 0).and_then(|n| ty.bytes_for(n));
            let Some(len) = len else {
                return Err(format!(
                    "tensor {name} ({ne:?} {}) is not a whole number of {}-element blocks",
                    ty.name(),
                    ty.block_elems()
                ));
            };
            if offset % alignment as u64 != 0 {
                return Err(format!(
                    "tensor {name} starts at data offset {offset}, not a multiple of {alignment}"
                ));
            }
            let start = usize::try_from(offset).ok().and_then(|o| o.checked_add(data_start));
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() => {
                    tensors.push(TensorInfo { name, ne, ty, start, len })
                }
                _ => {
                    return Err(format!(
                        "tensor {name} ({len} bytes at data offset {offset}) runs past the end of the \
                         file ({} bytes): the file is truncated",
                        bytes.len()
                    ))
                }
            }
        }
        Ok((version, metadata, tensors))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn version(&self) -> u32 {
        self.version
    }
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.keys().map(String::as_str)
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    /// The stored bytes of a tensor.
    /// See [`crate::weights::release_pages`].
    pub fn release_pages(&self, bytes: &[u8]) {
        super::release_pages(&self.map, bytes);
    }
    pub fn data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[t.start..t.start + t.len]
    }
    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.get("general.architecture").and_then(MetaValue::as_str).ok_or_else(|| Error::Checkpoint {
            path: self.path.clone(),
            detail: "no general.architecture in the metadata: not a model file?".into(),
        })
    }
}

/// Builds GGUF files in memory: for tests, and for writing LoRA adapters (`export --format
/// gguf-lora`).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, Vec<usize>, GgmlType, Vec<u8>)>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn meta(&mut self, key: &str, value: MetaValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }
    /// A tensor of row-major `shape` (written in ggml's innermost-first order) and stored bytes.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push((name.to_string(), shape.to_vec(), ty, bytes));
        self
    }
    /// GGUF's encoding of a value (little-endian; strings and arrays length-prefixed with a
    /// u64); also used by `models::write_random_gguf`, which writes piece by piece.
    pub(crate) fn put_value(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.push(*x),
            MetaValue::I8(x) => out.push(*x as u8),
            MetaValue::U16(x) => out.extend(x.to_le_bytes()),
            MetaValue::I16(x) => out.extend(x.to_le_bytes()),
            MetaValue::U32(x) => out.extend(x.to_le_bytes()),
            MetaValue::I32(x) => out.extend(x.to_le_bytes()),
            MetaValue::U64(x) => out.extend(x.to_le_bytes()),
            MetaValue::I64(x) => out.extend(x.to_le_bytes()),
            MetaValue::F32(x) => out.extend(x.to_le_bytes()),
            MetaValue::F64(x) => out.extend(x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(u8::from(*x)),
            MetaValue::Str(s) => {
                out.extend((s.len() as u64).to_le_bytes());
                out.extend(s.as_bytes());
            }
            MetaValue::Array(items) => {
                let elem = items.first().map_or(4, Self::type_id);
                out.extend(elem.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for i in items {
                    Self::put_value(out, i);
                }
            }
        }
    }
    /// GGUF's value type ids.
    pub(crate) fn type_id(v: &MetaValue) -> u32 {
        match v {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::Str(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }
    /// The file's bytes (version 3, alignment 32).
    pub fn to_bytes(&self) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            Self::put_value(&mut out, &MetaValue::Str(k.clone()));
            out.extend(Self::type_id(v).to_le_bytes());
            Self::put_value(&mut out, v);
        }
        let mut offset = 0usize;
        for (name, shape, ty, bytes) in &self.tensors {
            Self::put_value(&mut out, &MetaValue::Str(name.clone()));
            out.extend((shape.len() as u32).to_le_bytes());
            for d in shape.iter().rev() {
                out.extend((*d as u64).to_le_bytes());
            }
            out.extend(ty.id().to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += bytes.len().div_ceil(ALIGN) * ALIGN;
        }
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        for (_, _, _, bytes) in &self.tensors {
            out.extend(bytes);
            out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        }
        out
    }
    /// Write the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::checkpoint::write_atomic(path, &self.to_bytes())
    }
}

impl GgufFile {
    /// Parse bytes already in memory (tests and fuzzing), as if read from `path`.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<GgufFile> {
        let mut map = memmap2::MmapMut::map_anon(bytes.len().max(1))
            .map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?;
        map[..bytes.len()].copy_from_slice(bytes);
        let map = map.make_read_only().map_err(|e| Error::Io { path: path.to_path_buf(), cause: e })?;
        // an anonymous map is at least one byte; parse only what was given
        if bytes.is_empty() {
            return Err(Error::Checkpoint {
                path: path.into(),
                detail: "not a GGUF file: it is empty".into(),
            });
        }
        Self::parse(path, map)
    }
}
