//! CTranslate2's `model.bin` (the format the default Whisper weights ship
//! in) and its conversion to the Hugging Face Whisper layout
//! (`model.safetensors` + `config.json`), which the captions runtime loads
//! and operators can replace with larger models.
//!
//! The file: u32 version (6), the spec name, u32 revision, u32 variable
//! count; per variable its name, u8 rank, u32 dimensions, u8 dtype (0 f32,
//! 1 i8, 2 i16, 3 i32, 4 f16), u32 byte count and the bytes; then u32
//! alias count and (alias, target) pairs. Strings are a u16 length
//! (including a terminating NUL) and the bytes. Every length is checked
//! against what is left before it is used: a cut or damaged file is an
//! error, never a panic.

use std::borrow::Cow;
use std::collections::BTreeMap;

/// Why a `model.bin` could not be read or converted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Ct2Error {
    #[error("model.bin ends early (at byte {0}): the download is incomplete or damaged")]
    Truncated(usize),
    #[error("model.bin: {0}")]
    Format(String),
    #[error("model.bin lacks {0}: not a Whisper model in the expected layout")]
    Missing(String),
}

/// Element types of CTranslate2 variables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    I8,
    I16,
    I32,
    F16,
}

impl Dtype {
    fn from_code(c: u8) -> Option<Dtype> {
        Some(match c {
            0 => Dtype::F32,
            1 => Dtype::I8,
            2 => Dtype::I16,
            3 => Dtype::I32,
            4 => Dtype::F16,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::I8 => 1,
            Dtype::I16 | Dtype::F16 => 2,
            Dtype::F32 | Dtype::I32 => 4,
        }
    }
}

/// One variable, borrowing its bytes from the file.
#[derive(Debug, Clone)]
pub struct Var<'a> {
    pub shape: Vec<usize>,
    pub dtype: Dtype,
    pub data: &'a [u8],
}

/// A parsed `model.bin`.
#[derive(Debug)]
pub struct Ct2Model<'a> {
    pub spec: String,
    pub vars: BTreeMap<String, Var<'a>>,
    pub aliases: Vec<(String, String)>,
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Ct2Error> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or(Ct2Error::Truncated(self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Ct2Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Ct2Error> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, Ct2Error> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn string(&mut self) -> Result<String, Ct2Error> {
        let n = usize::from(self.u16()?);
        let s = self.take(n)?;
        let s = s.strip_suffix(&[0]).unwrap_or(s);
        String::from_utf8(s.to_vec())
            .map_err(|_| Ct2Error::Format(format!("a name at byte {} is not UTF-8", self.at)))
    }
}

/// The most variables and dimensions a model may declare (a damaged count
/// must not make us allocate gigabytes).
const MAX_VARS: u32 = 100_000;
const MAX_RANK: u8 = 8;

/// Parse a `model.bin`.
pub fn parse(bytes: &[u8]) -> Result<Ct2Model<'_>, Ct2Error> {
    let mut r = Reader { b: bytes, at: 0 };
    let version = r.u32()?;
    if !(5..=6).contains(&version) {
        return Err(Ct2Error::Format(format!(
            "format version {version}, expected 5 or 6"
        )));
    }
    let spec = r.string()?;
    let _revision = r.u32()?;
    let count = r.u32()?;
    if count > MAX_VARS {
        return Err(Ct2Error::Format(format!("{count} variables")));
    }
    let mut vars = BTreeMap::new();
    for _ in 0..count {
        let name = r.string()?;
        let rank = r.u8()?;
        if rank > MAX_RANK {
            return Err(Ct2Error::Format(format!("{name}: rank {rank}")));
        }
        let shape = (0..rank)
            .map(|_| r.u32().map(|d| d as usize))
            .collect::<Result<Vec<_>, _>>()?;
        let code = r.u8()?;
        let dtype = Dtype::from_code(code)
            .ok_or_else(|| Ct2Error::Format(format!("{name}: data type {code}")))?;
        let len = r.u32()? as usize;
        let elements = shape
            .iter()
            .try_fold(1usize, |a, d| a.checked_mul(*d))
            .ok_or_else(|| Ct2Error::Format(format!("{name}: shape {shape:?}")))?;
        if elements.checked_mul(dtype.size()) != Some(len) {
            return Err(Ct2Error::Format(format!(
                "{name}: {len} bytes for shape {shape:?} of {dtype:?}"
            )));
        }
        let data = r.take(len)?;
        vars.insert(name, Var { shape, dtype, data });
    }
    // The alias table closes the file (a cut before it is a cut file).
    let n = r.u32()?;
    if n > MAX_VARS {
        return Err(Ct2Error::Format(format!("{n} aliases")));
    }
    let mut aliases = Vec::new();
    for _ in 0..n {
        aliases.push((r.string()?, r.string()?));
    }
    if r.at != bytes.len() {
        return Err(Ct2Error::Format(format!(
            "{} bytes after the last alias",
            bytes.len() - r.at
        )));
    }
    Ok(Ct2Model {
        spec,
        vars,
        aliases,
    })
}

/// A tensor of the converted model: its bytes are a slice (or rows) of
/// the source's.
#[derive(Debug, Clone)]
pub struct Tensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Cow<'a, [u8]>,
}

impl Tensor<'_> {
    fn safetensors_dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            Dtype::F32 => safetensors::Dtype::F32,
            Dtype::I8 => safetensors::Dtype::I8,
            Dtype::I16 => safetensors::Dtype::I16,
            Dtype::I32 => safetensors::Dtype::I32,
            Dtype::F16 => safetensors::Dtype::F16,
        }
    }
}

impl safetensors::View for &Tensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.safetensors_dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The model in the Hugging Face layout: tensors by name, and `config.json`.
pub struct HfWhisper<'a> {
    pub tensors: BTreeMap<String, Tensor<'a>>,
    pub config: serde_json::Value,
}

impl<'a> Ct2Model<'a> {
    fn var(&self, name: &str) -> Result<&Var<'a>, Ct2Error> {
        self.vars
            .get(name)
            .ok_or_else(|| Ct2Error::Missing(name.to_string()))
    }

    fn whole(&self, name: &str) -> Result<Tensor<'a>, Ct2Error> {
        let v = self.var(name)?;
        Ok(Tensor {
            dtype: v.dtype,
            shape: v.shape.clone(),
            data: Cow::Borrowed(v.data),
        })
    }

    /// Rows `from..to` (first dimension) of a variable.
    fn rows(&self, name: &str, from: usize, to: usize) -> Result<Tensor<'a>, Ct2Error> {
        let v = self.var(name)?;
        let total = *v
            .shape
            .first()
            .ok_or_else(|| Ct2Error::Missing(name.into()))?;
        if from >= to || to > total {
            return Err(Ct2Error::Format(format!(
                "{name}: rows {from}..{to} of {total}"
            )));
        }
        let row = v.data.len() / total;
        let mut shape = v.shape.clone();
        shape[0] = to - from;
        Ok(Tensor {
            dtype: v.dtype,
            shape,
            data: Cow::Borrowed(&v.data[from * row..to * row]),
        })
    }

    /// Check that rows `from..to` of a bias are zero: Whisper's k
    /// projections have none, and a converter that dropped real values
    /// would change the model.
    fn zero_rows(&self, name: &str, from: usize, to: usize) -> Result<(), Ct2Error> {
        let r = self.rows(name, from, to)?;
        let zero = match r.dtype {
            // +0 and -0.
            Dtype::F16 => r.data.chunks(2).all(|c| c[0] == 0 && c[1] & 0x7f == 0),
            Dtype::F32 => r
                .data
                .chunks(4)
                .all(|c| c[..3] == [0, 0, 0] && c[3] & 0x7f == 0),
            _ => r.data.iter().all(|b| *b == 0),
        };
        if zero {
            Ok(())
        } else {
            Err(Ct2Error::Format(format!(
                "{name}: the k bias rows {from}..{to} are not zero"
            )))
        }
    }

    /// A scalar integer variable (num_heads).
    fn int(&self, name: &str) -> Result<i64, Ct2Error> {
        let v = self.var(name)?;
        Ok(match (v.dtype, v.data) {
            (Dtype::I8, [a]) => i64::from(*a as i8),
            (Dtype::I16, [a, b]) => i64::from(i16::from_le_bytes([*a, *b])),
            (Dtype::I32, [a, b, c, d]) => i64::from(i32::from_le_bytes([*a, *b, *c, *d])),
            _ => return Err(Ct2Error::Format(format!("{name} is not an integer"))),
        })
    }

    fn layers(&self, side: &str) -> usize {
        (0..)
            .take_while(|i| {
                self.vars
                    .contains_key(&format!("{side}/layer_{i}/ffn/linear_0/weight"))
            })
            .count()
    }

    /// Convert to the Hugging Face `WhisperForConditionalGeneration`
    /// layout. CTranslate2 fuses the self-attention projections (q, k, v
    /// rows in that order) and the cross-attention k and v; Whisper's k
    /// projections have no bias, so those bias rows (zeros) are dropped.
    /// `suppress` and `begin_suppress` come from CTranslate2's own config.
    pub fn to_hf(
        &self,
        suppress: &[i64],
        begin_suppress: &[i64],
    ) -> Result<HfWhisper<'a>, Ct2Error> {
        if self.spec != "WhisperSpec" {
            return Err(Ct2Error::Format(format!(
                "a {} model, not Whisper",
                self.spec
            )));
        }
        let mut t = BTreeMap::new();
        let d = self.var("encoder/conv1/weight")?.shape[0];
        let mels = self
            .var("encoder/conv1/weight")?
            .shape
            .get(1)
            .copied()
            .unwrap_or(0);
        let (enc_layers, dec_layers) = (self.layers("encoder"), self.layers("decoder"));
        if enc_layers == 0 || dec_layers == 0 {
            return Err(Ct2Error::Missing("encoder or decoder layers".into()));
        }
        let ln = |t: &mut BTreeMap<String, Tensor<'a>>,
                  to: String,
                  from: &str|
         -> Result<(), Ct2Error> {
            t.insert(
                format!("{to}.weight"),
                self.whole(&format!("{from}/gamma"))?,
            );
            t.insert(format!("{to}.bias"), self.whole(&format!("{from}/beta"))?);
            Ok(())
        };
        let lin = |t: &mut BTreeMap<String, Tensor<'a>>,
                   to: String,
                   from: &str|
         -> Result<(), Ct2Error> {
            t.insert(
                format!("{to}.weight"),
                self.whole(&format!("{from}/weight"))?,
            );
            t.insert(format!("{to}.bias"), self.whole(&format!("{from}/bias"))?);
            Ok(())
        };
        // Fused q|k|v (self-attention): k has no bias.
        let qkv =
            |t: &mut BTreeMap<String, Tensor<'a>>, to: &str, from: &str| -> Result<(), Ct2Error> {
                let (w, b) = (
                    format!("{from}/linear_0/weight"),
                    format!("{from}/linear_0/bias"),
                );
                t.insert(format!("{to}.q_proj.weight"), self.rows(&w, 0, d)?);
                t.insert(format!("{to}.q_proj.bias"), self.rows(&b, 0, d)?);
                self.zero_rows(&b, d, 2 * d)?;
                t.insert(format!("{to}.k_proj.weight"), self.rows(&w, d, 2 * d)?);
                t.insert(format!("{to}.v_proj.weight"), self.rows(&w, 2 * d, 3 * d)?);
                t.insert(format!("{to}.v_proj.bias"), self.rows(&b, 2 * d, 3 * d)?);
                lin(t, format!("{to}.out_proj"), &format!("{from}/linear_1"))
            };
        for c in ["conv1", "conv2"] {
            lin(
                &mut t,
                format!("model.encoder.{c}"),
                &format!("encoder/{c}"),
            )?;
        }
        t.insert(
            "model.encoder.embed_positions.weight".into(),
            self.whole("encoder/position_encodings/encodings")?,
        );
        // What encoder and decoder layers share: self-attention, its norm,
        // the feed-forward block and its norm.
        let layer =
            |t: &mut BTreeMap<String, Tensor<'a>>, to: &str, from: &str| -> Result<(), Ct2Error> {
                qkv(
                    t,
                    &format!("{to}.self_attn"),
                    &format!("{from}/self_attention"),
                )?;
                ln(
                    t,
                    format!("{to}.self_attn_layer_norm"),
                    &format!("{from}/self_attention/layer_norm"),
                )?;
                lin(t, format!("{to}.fc1"), &format!("{from}/ffn/linear_0"))?;
                lin(t, format!("{to}.fc2"), &format!("{from}/ffn/linear_1"))?;
                ln(
                    t,
                    format!("{to}.final_layer_norm"),
                    &format!("{from}/ffn/layer_norm"),
                )
            };
        for i in 0..enc_layers {
            layer(
                &mut t,
                &format!("model.encoder.layers.{i}"),
                &format!("encoder/layer_{i}"),
            )?;
        }
        ln(
            &mut t,
            "model.encoder.layer_norm".into(),
            "encoder/layer_norm",
        )?;
        t.insert(
            "model.decoder.embed_tokens.weight".into(),
            self.whole("decoder/embeddings/weight")?,
        );
        t.insert(
            "model.decoder.embed_positions.weight".into(),
            self.whole("decoder/position_encodings/encodings")?,
        );
        for i in 0..dec_layers {
            let (to, from) = (
                format!("model.decoder.layers.{i}"),
                format!("decoder/layer_{i}"),
            );
            layer(&mut t, &to, &from)?;
            // Cross-attention: q, then fused k|v (k without bias), out.
            let x = format!("{from}/attention");
            lin(
                &mut t,
                format!("{to}.encoder_attn.q_proj"),
                &format!("{x}/linear_0"),
            )?;
            let (w, b) = (format!("{x}/linear_1/weight"), format!("{x}/linear_1/bias"));
            self.zero_rows(&b, 0, d)?;
            t.insert(
                format!("{to}.encoder_attn.k_proj.weight"),
                self.rows(&w, 0, d)?,
            );
            t.insert(
                format!("{to}.encoder_attn.v_proj.weight"),
                self.rows(&w, d, 2 * d)?,
            );
            t.insert(
                format!("{to}.encoder_attn.v_proj.bias"),
                self.rows(&b, d, 2 * d)?,
            );
            lin(
                &mut t,
                format!("{to}.encoder_attn.out_proj"),
                &format!("{x}/linear_2"),
            )?;
            ln(
                &mut t,
                format!("{to}.encoder_attn_layer_norm"),
                &format!("{x}/layer_norm"),
            )?;
        }
        ln(
            &mut t,
            "model.decoder.layer_norm".into(),
            "decoder/layer_norm",
        )?;
        let vocab = self.var("decoder/embeddings/weight")?.shape[0];
        let ffn = self.var("encoder/layer_0/ffn/linear_0/weight")?.shape[0];
        let config = serde_json::json!({
            "architectures": ["WhisperForConditionalGeneration"],
            "model_type": "whisper",
            "activation_function": "gelu",
            "d_model": d,
            "num_mel_bins": mels,
            "encoder_layers": enc_layers,
            "decoder_layers": dec_layers,
            "encoder_attention_heads": self.int("encoder/num_heads")?,
            "decoder_attention_heads": self.int("decoder/num_heads")?,
            "encoder_ffn_dim": ffn,
            "decoder_ffn_dim": ffn,
            "vocab_size": vocab,
            "max_source_positions": self.var("encoder/position_encodings/encodings")?.shape[0],
            "max_target_positions": self.var("decoder/position_encodings/encodings")?.shape[0],
            "scale_embedding": false,
            "tie_word_embeddings": true,
            "bos_token_id": 50257,
            "eos_token_id": 50257,
            "pad_token_id": 50257,
            "decoder_start_token_id": 50258,
            "suppress_tokens": suppress,
            "begin_suppress_tokens": begin_suppress,
            "torch_dtype": "float16",
        });
        Ok(HfWhisper { tensors: t, config })
    }
}

impl HfWhisper<'_> {
    /// The `model.safetensors` bytes.
    pub fn safetensors(&self) -> Result<Vec<u8>, Ct2Error> {
        safetensors::serialize(self.tensors.iter().map(|(k, v)| (k.as_str(), v)), None)
            .map_err(|e| Ct2Error::Format(format!("writing safetensors: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model.bin with the given variables and aliases.
    pub(crate) fn build(vars: &[(&str, &[u32], u8, Vec<u8>)], aliases: &[(&str, &str)]) -> Vec<u8> {
        let s = |b: &mut Vec<u8>, v: &str| {
            b.extend_from_slice(&((v.len() + 1) as u16).to_le_bytes());
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        };
        let mut b = Vec::new();
        b.extend_from_slice(&6u32.to_le_bytes());
        s(&mut b, "WhisperSpec");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(vars.len() as u32).to_le_bytes());
        for (name, shape, dtype, data) in vars {
            s(&mut b, name);
            b.push(shape.len() as u8);
            for d in *shape {
                b.extend_from_slice(&d.to_le_bytes());
            }
            b.push(*dtype);
            b.extend_from_slice(&(data.len() as u32).to_le_bytes());
            b.extend_from_slice(data);
        }
        b.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
        for (a, t) in aliases {
            s(&mut b, a);
            s(&mut b, t);
        }
        b
    }

    #[test]
    fn a_model_parses_and_every_cut_or_flip_is_an_error_not_a_panic() {
        let file = build(
            &[
                ("a/weight", &[2, 3], 4, vec![1; 12]),
                ("a/num_heads", &[], 2, vec![8, 0]),
            ],
            &[("b/weight", "a/weight")],
        );
        let m = parse(&file).expect("parses");
        assert_eq!(m.spec, "WhisperSpec");
        assert_eq!(m.vars["a/weight"].shape, vec![2, 3]);
        assert_eq!(m.vars["a/weight"].dtype, Dtype::F16);
        assert_eq!(m.int("a/num_heads"), Ok(8));
        assert_eq!(m.aliases, vec![("b/weight".into(), "a/weight".into())]);
        for cut in 0..file.len() {
            assert!(parse(&file[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..file.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = file.clone();
                bad[i] ^= bit;
                let _ = parse(&bad); // any result but a panic
            }
        }
        let mut long = file.clone();
        long.push(0);
        assert!(parse(&long).is_err(), "trailing bytes");
    }

    #[test]
    fn a_byte_count_that_does_not_fit_the_shape_is_refused() {
        let file = build(&[("a", &[4], 4, vec![0; 6])], &[]);
        let e = parse(&file).expect_err("refused");
        assert!(e.to_string().contains("6 bytes for shape [4]"), "{e}");
    }

    #[test]
    fn a_k_bias_that_is_not_zero_is_refused() {
        // f16 [3] biases: q 1.0, k -0.0 or 1.0, v 0.
        let ok = build(&[("b", &[3], 4, vec![0x00, 0x3c, 0x00, 0x80, 0, 0])], &[]);
        let bad = build(&[("b", &[3], 4, vec![0x00, 0x3c, 0x00, 0x3c, 0, 0])], &[]);
        assert!(parse(&ok).expect("parses").zero_rows("b", 1, 2).is_ok());
        let e = parse(&bad)
            .expect("parses")
            .zero_rows("b", 1, 2)
            .expect_err("refused");
        assert!(e.to_string().contains("not zero"), "{e}");
    }

    #[test]
    fn rows_of_a_fused_projection_are_cut_out() {
        // A [6, 2] f16 "fused" matrix: rows 2..4 are bytes 8..16.
        let data: Vec<u8> = (0..24).collect();
        let file = build(&[("w", &[6, 2], 4, data)], &[]);
        let m = parse(&file).expect("parses");
        let r = m.rows("w", 2, 4).expect("rows");
        assert_eq!(r.shape, vec![2, 2]);
        assert_eq!(&r.data[..], &(8..16).collect::<Vec<u8>>()[..]);
        assert!(m.rows("w", 4, 7).is_err());
        assert!(matches!(m.rows("nope", 0, 1), Err(Ct2Error::Missing(_))));
    }
}
