//! The default captions model as `balie-transcoder models fetch` provisions
//! it (the test command runs that first; the folder is `$BALIE_MODELS`, by
//! default `~/.cache/balie/models`): the Hugging Face Whisper layout, every
//! tensor the runtime loads, with the shapes of Whisper base.

use balie_transcoder::captions::models::{default_dir, is_provisioned, sha256, MODEL_SHA256};

#[test]
fn the_provisioned_model_has_the_hugging_face_whisper_layout() {
    let dir = default_dir();
    assert!(
        is_provisioned(&dir),
        "{} does not hold the checked model: run `cargo run -p balie-transcoder -- models fetch` \
         (the test command does)",
        dir.display()
    );
    let bytes = std::fs::read(dir.join("model.safetensors")).expect("model");
    assert_eq!(sha256(&bytes), MODEL_SHA256);
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let shape = |name: &str| -> Vec<usize> {
        st.tensor(name)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .shape()
            .to_vec()
    };
    // 97 encoder tensors (6 layers of 15, convolutions, positions, norm)
    // and 148 decoder ones (6 layers of 24, embeddings, positions, norm).
    assert_eq!(st.len(), 245, "{:?}", st.names());
    assert_eq!(shape("model.encoder.conv1.weight"), [512, 80, 3]);
    assert_eq!(shape("model.encoder.embed_positions.weight"), [1500, 512]);
    assert_eq!(
        shape("model.encoder.layers.5.self_attn.q_proj.weight"),
        [512, 512]
    );
    assert_eq!(
        shape("model.encoder.layers.5.self_attn.k_proj.weight"),
        [512, 512]
    );
    assert!(st
        .tensor("model.encoder.layers.5.self_attn.k_proj.bias")
        .is_err());
    assert_eq!(shape("model.decoder.embed_tokens.weight"), [51865, 512]);
    assert_eq!(shape("model.decoder.embed_positions.weight"), [448, 512]);
    assert_eq!(
        shape("model.decoder.layers.0.encoder_attn.v_proj.bias"),
        [512]
    );
    assert_eq!(shape("model.decoder.layers.3.fc1.weight"), [2048, 512]);
    assert_eq!(shape("model.decoder.layer_norm.weight"), [512]);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config"))
            .expect("json");
    for (key, want) in [
        ("d_model", 512),
        ("encoder_layers", 6),
        ("decoder_layers", 6),
        ("encoder_attention_heads", 8),
        ("decoder_attention_heads", 8),
        ("num_mel_bins", 80),
        ("vocab_size", 51865),
        ("max_source_positions", 1500),
        ("max_target_positions", 448),
    ] {
        assert_eq!(config[key], want, "{key}");
    }
    assert!(config["suppress_tokens"]
        .as_array()
        .is_some_and(|a| a.len() > 50));
    let tok: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).expect("tokenizer"))
            .expect("json");
    assert!(tok["model"]["vocab"]
        .as_object()
        .is_some_and(|v| v.len() > 50_000));
}
