//! Live captions end to end: balie-sfu and a real balie-transcoder worker
//! (Whisper base, the default model) on loopback; str0m clients publish
//! Opus of espeak-ng speech and a LibriVox reading; the others receive the
//! captions over the data channel, with the speaker's name. Needs the
//! default model (the test command provisions it), espeak-ng and Debian's
//! pocketsphinx-testdata.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use balie_offload::tls::make_dev_certs;
use balie_sfu::config::CaptionsConfig;
use balie_sfu::token::Role;
use balie_transcoder::captions::audio::{encode_opus, read_pcm};
use balie_transcoder::captions::mel::SAMPLE_RATE;
use balie_transcoder::captions::speech::{speak, wer, words};
use balie_transcoder::captions::{models, whisper::Whisper};
use balie_transcoder::server::CaptionsSetup;
use common::worker::{offload_config, TestWorker};
use common::{run_until, Client, Join, TestServer};
use serde_json::{json, Value};
use str0m::media::MediaKind;

/// Whisper takes the CPU: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn model() -> Arc<Whisper> {
    static MODEL: OnceLock<Arc<Whisper>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = models::default_dir();
            assert!(
                models::is_provisioned(&dir),
                "run `cargo run -p balie-transcoder -- models fetch` (the test command does)"
            );
            Arc::new(Whisper::load(&dir).expect("model loads"))
        })
        .clone()
}

fn captions_worker(dir: &Path, listen: SocketAddr) -> TestWorker {
    TestWorker::start_with(
        dir,
        listen,
        Some(CaptionsSetup {
            whisper: model(),
            max_sessions: 4,
        }),
    )
}

/// balie-sfu with captions on `workers`, in `language`. No video layers
/// (the synthetic video would only keep the worker busy).
fn server(dir: &Path, workers: &[&TestWorker], extra: &[SocketAddr], language: &str) -> TestServer {
    let mut offload = offload_config(dir, workers);
    offload.workers.extend(extra.iter().map(|a| a.to_string()));
    TestServer::start(|c| {
        c.offload = offload;
        c.rooms.adaptive_layers = false;
        c.media.shards = 1;
        c.captions = CaptionsConfig {
            enabled: true,
            language: language.into(),
            on_at_start: false,
        };
    })
}

/// Speech as 20 ms Opus packets with `lead` seconds of silence before it
/// and two after; and the seconds from the start to the end of the speech.
fn opus(pcm: &[f32], lead: f64) -> (Arc<Vec<Vec<u8>>>, f64) {
    let mut all = vec![0f32; (lead * SAMPLE_RATE as f64) as usize];
    all.extend_from_slice(pcm);
    let end = all.len() as f64 / SAMPLE_RATE as f64;
    all.extend(vec![0f32; 2 * SAMPLE_RATE]);
    (Arc::new(encode_opus(&all).expect("opus")), end)
}

fn silence() -> Arc<Vec<Vec<u8>>> {
    Arc::new(encode_opus(&vec![0f32; SAMPLE_RATE]).expect("opus"))
}

fn join(srv: &TestServer, room: &str, name: &str, role: Role) -> Client {
    let mut c = Client::join(srv, room, name, role, Join::Api);
    c.play(silence());
    c
}

fn open_channels(clients: &mut [&mut Client]) {
    assert!(
        run_until(clients, Duration::from_secs(10), |cs| cs
            .iter()
            .all(|c| c.connected && c.channel.is_some())),
        "connected with channels"
    );
}

fn finals_of(c: &Client, name: &str) -> Vec<String> {
    captions_of(c, name, true)
        .iter()
        .filter_map(|m| m["text"].as_str())
        .flat_map(words)
        .collect()
}

fn captions_of<'a>(c: &'a Client, name: &str, finals: bool) -> Vec<&'a Value> {
    c.messages_of("caption")
        .into_iter()
        .filter(|m| m["name"] == format!("Name of {name}") && (!finals || m["final"] == true))
        .collect()
}

fn state(c: &Client) -> Option<(bool, bool)> {
    c.messages_of("captions-state")
        .last()
        .map(|m| (m["on"] == true, m["available"] == true))
}

/// Switch captions on (as official `o`) and wait until everyone is told.
fn switch_on(o: usize, clients: &mut [&mut Client]) {
    clients[o].send_json(&json!({"type": "captions", "on": true}));
    assert!(
        run_until(clients, Duration::from_secs(5), |cs| cs
            .iter()
            .all(|c| state(c) == Some((true, true)))),
        "everyone told captions are on"
    );
    let notice = clients[0].messages_of("captions-state");
    let notice = notice
        .last()
        .and_then(|m| m["notice"].as_str())
        .unwrap_or("");
    eprintln!("notice: {notice}");
}

/// Audio frames received (Opus from the others' clips).
fn audio_frames(c: &Client) -> u64 {
    c.received
        .values()
        .filter(|r| r.kind == Some(MediaKind::Audio))
        .map(|r| r.frames)
        .sum()
}

/// "passport" (or "passports": where a stream starts moves Whisper's
/// windows, and base hears either).
fn said_passport(words: &[String]) -> bool {
    words.iter().any(|w| w.starts_with("passport"))
}

const LIBRIVOX: &str = "/usr/share/pocketsphinx/test/data/librivox";

#[test]
fn two_english_speakers_are_captioned_by_name_and_silence_gives_no_captions() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let worker = captions_worker(dir.path(), "127.0.0.1:0".parse().expect("addr"));
    let srv = server(dir.path(), &[&worker], &[], "en");
    let mut olga = join(&srv, "captions-en", "olga", Role::Official);
    let mut ivo = join(&srv, "captions-en", "ivo", Role::Interpreter);
    let mut sam = join(&srv, "captions-en", "sam", Role::Interpreter);
    open_channels(&mut [&mut olga, &mut ivo, &mut sam]);
    switch_on(0, &mut [&mut olga, &mut ivo, &mut sam]);
    assert!(run_until(
        &mut [&mut olga, &mut ivo, &mut sam],
        Duration::from_secs(5),
        |_| worker.metrics.caption_sessions.get() == 3
    ));

    // Olga reads from Sense and Sensibility (LibriVox); Ivo speaks an
    // espeak-ng sentence; Sam stays silent.
    let mut reading = Vec::new();
    for id in ["0870", "0920"] {
        let path = format!("{LIBRIVOX}/sense_and_sensibility_01_austen_64kb-{id}.wav");
        reading.extend(read_pcm(Path::new(&path)).expect("pocketsphinx-testdata"));
        reading.extend(vec![0f32; SAMPLE_RATE]);
    }
    let (book, book_end) = opus(&reading, 0.5);
    let sentence =
        speak("en", "Please bring your passport to the counter on Monday.").expect("espeak-ng");
    let (said, said_end) = opus(&sentence, 1.0);
    let started = Instant::now();
    olga.play(book);
    ivo.play(said);
    run_until(
        &mut [&mut olga, &mut ivo, &mut sam],
        Duration::from_secs_f64(book_end + 20.0),
        |cs| {
            // The reading's last words are final (unless Whisper missed
            // them: then the time limit ends the wait).
            finals_of(cs[1], "olga").contains(&"respectable".to_string())
                && finals_of(cs[0], "ivo").contains(&"monday".to_string())
        },
    );
    eprintln!(
        "all captions {:.1} s after the reading started ({book_end:.1} s of audio; the sentence {said_end:.1} s)",
        started.elapsed().as_secs_f64()
    );
    for m in ivo.messages_of("caption") {
        eprintln!("  to ivo: {} {} {}", m["name"], m["final"], m["text"]);
    }

    // Ivo's words under Ivo's name, at Olga's and Sam's.
    for at in [&olga, &sam] {
        let heard = finals_of(at, "ivo");
        for w in ["passport", "counter", "monday"] {
            assert!(heard.contains(&w.to_string()), "{w} in {heard:?}");
        }
        assert!(!heard.contains(&"dashwood".to_string()), "{heard:?}");
    }
    // Olga's reading under Olga's name, under 15% word errors.
    let reference = words(
        "and mister john dashwood had then leisure to consider how much there might be prudently \
         in his power to do for them had he married a more amiable woman he might have been made \
         still more respectable than he was",
    );
    let heard = finals_of(&ivo, "olga");
    let e = wer(&reference, &heard);
    eprintln!(
        "LibriVox through the SFU: WER {:.1}% ({heard:?})",
        e * 100.0
    );
    assert!(e < 0.15, "WER {e}");
    assert!(!heard.contains(&"passport".to_string()));
    // Partials came too (before the finals they lead to).
    assert!(captions_of(&ivo, "olga", false).len() > captions_of(&ivo, "olga", true).len());
    // Silence: nothing from Sam.
    assert!(captions_of(&olga, "sam", false).is_empty());
    assert!(srv.metric("balie_captions_total", &["final"]) >= 3.0);
    assert_eq!(srv.metric("balie_caption_tracks", &[]), 3.0);
    // End of speech to final text at the worker.
    let m = worker.metrics.render();
    let line = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (sum, count) = (
        line("balie_transcoder_caption_latency_seconds_sum"),
        line("balie_transcoder_caption_latency_seconds_count"),
    );
    eprintln!(
        "end of speech to final at the worker: mean {:.2} s over {count} finals",
        sum / count.max(1.0)
    );
    assert!(count >= 3.0);
}

#[test]
fn dutch_speech_with_the_language_forced_gives_dutch_text() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let worker = captions_worker(dir.path(), "127.0.0.1:0".parse().expect("addr"));
    let srv = server(dir.path(), &[&worker], &[], "nl");
    let mut olga = join(&srv, "captions-nl", "olga", Role::Official);
    let mut cor = join(&srv, "captions-nl", "cor", Role::Interpreter);
    open_channels(&mut [&mut olga, &mut cor]);
    switch_on(0, &mut [&mut olga, &mut cor]);
    let notice = cor.messages_of("captions-state");
    let notice = notice.last().and_then(|m| m["notice"].as_str());
    assert!(notice.is_some_and(|n| n.contains("Er wordt niets opgenomen")));
    let sentence = speak(
        "nl",
        "Goedemorgen, ik wil graag een nieuw paspoort aanvragen bij de gemeente.",
    )
    .expect("espeak-ng");
    let (said, end) = opus(&sentence, 1.0);
    cor.play(said);
    // The words this deterministic pipeline reliably gets from espeak's
    // Dutch (see transcoder/tests/transcribe.rs).
    let want = ["ik", "nieuw", "aanvragen"];
    let done = run_until(
        &mut [&mut olga, &mut cor],
        Duration::from_secs_f64(end + 12.0),
        |cs| {
            let heard = finals_of(cs[0], "cor");
            want.iter().all(|w| heard.contains(&w.to_string()))
        },
    );
    let heard = finals_of(&olga, "cor");
    eprintln!("nl: {heard:?}");
    assert!(done, "{want:?} in {heard:?}");
}

#[test]
fn a_killed_worker_gives_the_notice_the_call_goes_on_and_a_new_worker_brings_captions_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    make_dev_certs(dir.path(), &["localhost".into()]).expect("certs");
    let mut first = captions_worker(dir.path(), "127.0.0.1:0".parse().expect("addr"));
    // The second worker's address is in the config from the start; it
    // comes up later.
    let spare = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port");
    let srv = server(dir.path(), &[&first], &[spare], "en");
    let mut olga = join(&srv, "captions-kill", "olga", Role::Official);
    let mut ivo = join(&srv, "captions-kill", "ivo", Role::Interpreter);
    open_channels(&mut [&mut olga, &mut ivo]);
    switch_on(0, &mut [&mut olga, &mut ivo]);
    let sentence = speak("en", "Your new passport will be ready next week.").expect("espeak-ng");
    let (said, end) = opus(&sentence, 0.5);
    ivo.play(said.clone());
    assert!(
        run_until(
            &mut [&mut olga, &mut ivo],
            Duration::from_secs_f64(end + 10.0),
            |cs| said_passport(&finals_of(cs[0], "ivo"))
        ),
        "captions before the kill"
    );

    first.kill();
    let killed = Instant::now();
    let audio_before = audio_frames(&olga);
    assert!(
        run_until(&mut [&mut olga, &mut ivo], Duration::from_secs(4), |cs| cs
            .iter()
            .all(|c| state(c) == Some((true, false)))),
        "everyone told captions are unavailable"
    );
    eprintln!(
        "captions unavailable notice {:?} after the kill",
        killed.elapsed()
    );
    let notice = olga.messages_of("captions-state");
    let notice = notice
        .last()
        .and_then(|m| m["notice"].as_str())
        .unwrap_or("");
    assert!(notice.contains("call goes on"), "{notice}");
    // The call goes on: audio keeps flowing.
    common::run_for(&mut [&mut olga, &mut ivo], Duration::from_secs(1));
    let audio_after = audio_frames(&olga);
    assert!(
        audio_after >= audio_before + 60,
        "{audio_before} -> {audio_after}"
    );
    assert!(srv.metric("balie_captions_unavailable_total", &[]) >= 1.0);

    // A new worker: captions come back.
    let _second = captions_worker(dir.path(), spare);
    let up = Instant::now();
    assert!(
        run_until(&mut [&mut olga, &mut ivo], Duration::from_secs(10), |cs| cs
            .iter()
            .all(|c| state(c) == Some((true, true)))),
        "captions available again"
    );
    eprintln!(
        "captions back {:?} after the new worker started",
        up.elapsed()
    );
    let before = finals_of(&olga, "ivo").len();
    ivo.play(said);
    let again = run_until(
        &mut [&mut olga, &mut ivo],
        Duration::from_secs_f64(end + 10.0),
        |cs| said_passport(&finals_of(cs[0], "ivo")[before..]),
    );
    let after: Vec<String> = finals_of(&olga, "ivo")[before..].to_vec();
    assert!(again, "captions from the new worker: {after:?}");
}
