//! Where weights come from: one interface over a Hugging Face safetensors checkpoint (one file,
//! or several with `model.safetensors.index.json`) and a GGUF file. A source hands out each
//! tensor under its Hugging Face name, in its stored format (f32, f16, bf16 or a ggml block
//! type) as a byte range of the memory map; the GGUF side maps llama.cpp's names and undoes its
//! conversions (see `models::gguf`). What becomes of the bytes (dequantized to f32 and
//! trained, or kept packed on the GPU as a frozen base) is the loader's choice
//! (`models::Model::load_with`).

pub mod gguf;

use crate::error::{Error, Result};
use kernels_ref::quant::GgmlType;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use gguf::{GgufFile, MetaValue};

/// The format frozen base weights are kept in on the device (`--base-dtype`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    /// As stored in the file (a quantized GGUF stays quantized; f16 and bf16 stay 16-bit).
    #[default]
    Native,
    /// 16-bit floats (halves an f32 checkpoint; a quantized tensor is dequantized to f32).
    F16,
    /// Everything dequantized to f32.
    F32,
}

/// One tensor as stored: row-major shape, storage type and bytes.
pub struct Stored<'a> {
    pub shape: Vec<usize>,
    pub ty: GgmlType,
    pub bytes: Cow<'a, [u8]>,
}

impl Stored<'_> {
    /// The values as f32 (the CPU reference's dequantization).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.shape.iter().product()];
        kernels_ref::quant::dequantize(self.ty, &self.bytes, &mut out);
        out
    }
}

/// A safetensors checkpoint: one file, or the shards listed by `model.safetensors.index.json`.
pub struct Safetensors {
    files: Vec<crate::models::SafetensorsFile>,
    /// tensor name -> index into `files`
    index: BTreeMap<String, usize>,
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Safetensors {
    /// `dir/model.safetensors`, else the shards named by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Safetensors> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        if !single.exists() && index_path.exists() {
            return Self::open_sharded(dir, &index_path);
        }
        let file = crate::models::SafetensorsFile::open(&single)?;
        let index = file.names().into_iter().map(|n| (n, 0)).collect();
        Ok(Safetensors { files: vec![file], index })
    }

    fn open_sharded(dir: &Path, index_path: &Path) -> Result<Safetensors> {
        let bad = |detail: String| Error::Checkpoint { path: index_path.to_path_buf(), detail };
        let text = std::fs::read_to_string(index_path)
            .map_err(|e| Error::Io { path: index_path.to_path_buf(), cause: e })?;
        let idx: ShardIndex = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a readable safetensors index (expected a weight_map): {e}")))?;
        let mut shards: Vec<String> = idx.weight_map.values().cloned().collect();
        shards.sort();
        shards.dedup();
        if shards.is_empty() {
            return Err(bad("the weight_map is empty".into()));
        }
        let mut files = Vec::new();
        for s in &shards {
            if s.contains('/') || s.contains('\\') || s.starts_with('.') {
                return Err(bad(format!("shard {s:?} is not a file name in the model directory")));
            }
            files.push(crate::models::SafetensorsFile::open(&dir.join(s))?);
        }
        let mut index = BTreeMap::new();
        for (name, shard) in &idx.weight_map {
            let i = shards.binary_search(shard).expect("every shard is listed");
            if !files[i].names().iter().any(|n| n == name) {
                return Err(bad(format!("the index puts tensor {name} in {shard}, which does not hold it")));
            }
            index.insert(name.clone(), i);
        }
        Ok(Safetensors { files, index })
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].path())
    }

    pub fn get(&self, name: &str) -> Result<Option<Stored<'_>>> {
        match self.index.get(name) {
            None => Ok(None),
            Some(&i) => self.files[i].stored(name),
        }
    }

    /// Any file's path (for messages).
    pub fn path(&self) -> &Path {
        self.files[0].path()
    }
}

/// Where a model's weights are read from.
pub enum Source {
    Safetensors(Safetensors),
    Gguf(GgufFile),
}

/// Drop the pages of `map` under `bytes` (a slice of it) from this process's resident set:
/// a streamed weight is read once per pass, and its pages, left mapped, would count in the
/// process's memory until the kernel reclaims them. They stay in the page cache, so the next
/// read is a copy, not a disk read. Bytes outside `map` (a converted copy) are left alone.
pub fn release_pages(map: &memmap2::Mmap, bytes: &[u8]) {
    let (start, base) = (bytes.as_ptr() as usize, map.as_ptr() as usize);
    if bytes.is_empty() || start < base || start + bytes.len() > base + map.len() {
        return;
    }
    // whole pages inside the slice only (a neighbour's bytes may share the edge pages)
    let page = 4096;
    let first = (start - base).next_multiple_of(page);
    let end = (start - base + bytes.len()) / page * page;
    #[cfg(unix)]
    if end > first {
        // SAFETY: the map is read-only and shared with the file; DONTNEED only drops this
        // process's page-table entries, and later reads fault the same bytes back in.
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, end - first) };
    }
}

impl Source {
    /// See [`release_pages`].
    pub fn release_pages(&self, bytes: &[u8]) {
        match self {
            Source::Safetensors(s) => s.files.iter().for_each(|f| f.release_pages(bytes)),
            Source::Gguf(g) => g.release_pages(bytes),
        }
    }

    pub fn path(&self) -> PathBuf {
        match self {
            Source::Safetensors(s) => s.path().to_path_buf(),
            Source::Gguf(g) => g.path().to_path_buf(),
        }
    }
}

/// Whether `path` names a GGUF file (by its extension, or its first bytes for other names).
pub fn is_gguf(path: &Path) -> bool {
    if path.is_dir() {
        return false;
    }
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"GGUF"
}
