//! A Whisper model of base's shapes with seeded random weights, in the
//! Hugging Face layout: for checking the GPU path's arithmetic against the
//! CPU's on a node that cannot hold the real model (the GPU check's bundle
//! must stay small; 145 MB of weights do not fit). Same shapes, same
//! kernels, same work per window; the text is nonsense, and a random model
//! rarely ends a window early (no end-of-text), so it decodes up to the
//! token cap: more tokens per window than real speech gives, a pessimistic
//! load for throughput.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// Whisper base's configuration (multilingual).
pub const BASE_CONFIG: &str = r#"{
  "d_model": 512,
  "num_mel_bins": 80,
  "encoder_layers": 6,
  "decoder_layers": 6,
  "encoder_attention_heads": 8,
  "decoder_attention_heads": 8,
  "encoder_ffn_dim": 2048,
  "decoder_ffn_dim": 2048,
  "vocab_size": 51865,
  "max_source_positions": 1500,
  "max_target_positions": 448,
  "suppress_tokens": []
}"#;

/// SplitMix64, then Box-Muller: seeded normal samples without a crate.
struct Normal(u64);

impl Normal {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f32 {
        let (u, v) = (self.uniform(), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    }

    fn tensor(&mut self, dims: &[usize], mean: f32, std: f32) -> candle_core::Result<Tensor> {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| mean + std * self.sample()).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(DType::F16)
    }
}

/// Write base's shapes with random weights (seeded) into `dir`:
/// `config.json`, `model.safetensors` (f16, about 145 MB) and a copy of
/// `tokenizer` (the real one: the token ids must be Whisper's).
pub fn write(dir: &Path, tokenizer: &Path, seed: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::copy(tokenizer, dir.join("tokenizer.json"))
        .map_err(|e| format!("{}: {e}", tokenizer.display()))?;
    std::fs::write(dir.join("config.json"), BASE_CONFIG)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let tensors = weights(seed).map_err(|e| format!("random weights: {e}"))?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(|e| format!("{}: {e}", dir.display()))
}

type Tensors = HashMap<String, Tensor>;

/// A linear layer (or convolution: `inp` its input channels and kernel)
/// initialised as PyTorch does in spirit: weights of variance 1 / fan-in.
fn lin(
    t: &mut Tensors,
    r: &mut Normal,
    name: &str,
    out: usize,
    inp: &[usize],
    bias: bool,
) -> candle_core::Result<()> {
    let mut dims = vec![out];
    dims.extend_from_slice(inp);
    let fan_in: usize = inp.iter().product();
    let std = (fan_in as f32).powf(-0.5);
    t.insert(format!("{name}.weight"), r.tensor(&dims, 0.0, std)?);
    if bias {
        t.insert(format!("{name}.bias"), r.tensor(&[out], 0.0, 0.02)?);
    }
    Ok(())
}

fn norm(t: &mut Tensors, r: &mut Normal, name: &str, d: usize) -> candle_core::Result<()> {
    t.insert(format!("{name}.weight"), r.tensor(&[d], 1.0, 0.02)?);
    t.insert(format!("{name}.bias"), r.tensor(&[d], 0.0, 0.02)?);
    Ok(())
}

/// An attention's projections (the key one has no bias, as in Whisper).
fn attn(t: &mut Tensors, r: &mut Normal, p: &str, d: usize) -> candle_core::Result<()> {
    for (name, bias) in [
        ("q_proj", true),
        ("k_proj", false),
        ("v_proj", true),
        ("out_proj", true),
    ] {
        lin(t, r, &format!("{p}.{name}"), d, &[d], bias)?;
    }
    Ok(())
}

fn weights(seed: u64) -> candle_core::Result<Tensors> {
    let (d, mels, ffn, vocab, layers) = (512, 80, 2048, 51865, 6);
    let mut r = Normal(seed);
    let mut t = HashMap::new();
    let (t, r) = (&mut t, &mut r);
    let e = "model.encoder";
    lin(t, r, &format!("{e}.conv1"), d, &[mels, 3], true)?;
    lin(t, r, &format!("{e}.conv2"), d, &[d, 3], true)?;
    t.insert(
        format!("{e}.embed_positions.weight"),
        r.tensor(&[1500, d], 0.0, 0.1)?,
    );
    for i in 0..layers {
        let p = format!("{e}.layers.{i}");
        attn(t, r, &format!("{p}.self_attn"), d)?;
        norm(t, r, &format!("{p}.self_attn_layer_norm"), d)?;
        lin(t, r, &format!("{p}.fc1"), ffn, &[d], true)?;
        lin(t, r, &format!("{p}.fc2"), d, &[ffn], true)?;
        norm(t, r, &format!("{p}.final_layer_norm"), d)?;
    }
    norm(t, r, &format!("{e}.layer_norm"), d)?;
    let dv = "model.decoder";
    t.insert(
        format!("{dv}.embed_tokens.weight"),
        r.tensor(&[vocab, d], 0.0, (d as f32).powf(-0.5))?,
    );
    t.insert(
        format!("{dv}.embed_positions.weight"),
        r.tensor(&[448, d], 0.0, 0.1)?,
    );
    for i in 0..layers {
        let p = format!("{dv}.layers.{i}");
        attn(t, r, &format!("{p}.self_attn"), d)?;
        norm(t, r, &format!("{p}.self_attn_layer_norm"), d)?;
        attn(t, r, &format!("{p}.encoder_attn"), d)?;
        norm(t, r, &format!("{p}.encoder_attn_layer_norm"), d)?;
        lin(t, r, &format!("{p}.fc1"), ffn, &[d], true)?;
        lin(t, r, &format!("{p}.fc2"), d, &[ffn], true)?;
        norm(t, r, &format!("{p}.final_layer_norm"), d)?;
    }
    norm(t, r, &format!("{dv}.layer_norm"), d)?;
    Ok(std::mem::take(t))
}

#[cfg(test)]
mod tests {
    use super::Normal;

    #[test]
    fn the_samples_are_seeded_and_standard_normal() {
        let a: Vec<f32> = {
            let mut r = Normal(7);
            (0..20_000).map(|_| r.sample()).collect()
        };
        let mut r = Normal(7);
        assert!(
            a.iter().all(|x| *x == r.sample()),
            "same seed, same samples"
        );
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / a.len() as f32;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
