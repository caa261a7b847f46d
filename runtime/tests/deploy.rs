//! The weights image and linked blobs of `ouroc build`'s executables read
//! back from hostile bytes: every length and offset in them is untrusted,
//! and each bad one is an error naming the problem, never a panic (nor an
//! overflow in a debug build, where these tests run).

use ouroc_runtime::deploy::{
    DATA_ALIGN, Fingerprint, VERSION, WEIGHTS_MAGIC, WeightIndex, WeightsHeader, blob, blob_len, read_weights,
    weights_head,
};

fn fp() -> Fingerprint {
    Fingerprint {
        checkpoint: "c".into(),
        ouroc: VERSION.into(),
        layout: "l".into(),
    }
}

fn entry(id: u32, offset: u64, len: u64) -> WeightIndex {
    WeightIndex {
        id,
        dtype: "f32".into(),
        offset,
        len,
    }
}

/// A head for `entries` and `data_bytes`, then `data` bytes of data.
fn image(entries: Vec<WeightIndex>, data_bytes: u64, data: usize) -> Vec<u8> {
    let mut img = weights_head(&WeightsHeader {
        fingerprint: fp(),
        entries,
        data_bytes,
    });
    img.resize(img.len() + data, 7);
    img
}

/// The magic, then `hlen` as the header length, then `rest`.
fn raw(hlen: u64, rest: &[u8]) -> Vec<u8> {
    let mut img = WEIGHTS_MAGIC.to_vec();
    img.extend_from_slice(&hlen.to_le_bytes());
    img.extend_from_slice(rest);
    img
}

/// `read_weights` refuses `img` with a message naming "w" and containing
/// every needle.
fn refused(img: &[u8], needles: &[&str]) -> String {
    let err = match read_weights(img, &fp(), "w") {
        Ok(e) => panic!("read {} entries from a bad image; expected {needles:?}", e.len()),
        Err(e) => e,
    };
    assert!(
        err.starts_with("w ") || err.starts_with("w:"),
        "the error names the file: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "the error should mention `{n}`: {err}");
    }
    err
}

#[test]
fn a_well_formed_image_reads_back() {
    let img = image(vec![entry(3, 0, 8), entry(5, 64, 4)], 68, 68);
    let e = read_weights(&img, &fp(), "w").unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!((e[0].0.0, e[0].1.len()), (3, 8));
    assert_eq!((e[1].0.0, e[1].1.len()), (5, 4));
}

#[test]
fn header_lengths_near_u64_max_or_past_the_end_are_refused() {
    let json = br#"{"fingerprint":{}}"#;
    // 16 + hlen overflows u64 and usize; u64::MAX - 16 fits exactly.
    for hlen in [u64::MAX, u64::MAX - 15, u64::MAX - 16, 1 << 63, u32::MAX as u64 + 1] {
        let err = refused(&raw(hlen, json), &["header length", "runs past the end"]);
        assert!(err.contains(&hlen.to_string()), "the error names the length: {err}");
    }
    // One byte more than the file holds; the exact length parses (and fails as JSON).
    let n = json.len() as u64;
    refused(&raw(n + 1, json), &["header length", "runs past the end"]);
    refused(&raw(n, json), &["unreadable weights header"]);
    refused(&raw(0, &[]), &["unreadable weights header"]);
}

#[test]
fn data_lengths_that_overflow_or_exceed_the_file_are_refused() {
    // The data starts at DATA_ALIGN (a short header): start + data_bytes overflows.
    for data_bytes in [u64::MAX, u64::MAX - DATA_ALIGN as u64 + 1] {
        let err = refused(&image(vec![], data_bytes, 0), &["data length", "overflows"]);
        assert!(err.contains(&data_bytes.to_string()), "{err}");
    }
    // Fits in u64, not in the file.
    refused(&image(vec![], u64::MAX - DATA_ALIGN as u64, 0), &["truncated"]);
    refused(&image(vec![], 1 << 40, 64), &["truncated", "its header says"]);
    refused(
        &image(vec![], 64, 65),
        &["its header says", "not the file `ouroc build` wrote"],
    );
}

#[test]
fn entries_outside_the_data_or_overflowing_are_refused() {
    // offset + len overflows u64.
    for (offset, len) in [(u64::MAX, 1), (1, u64::MAX), (u64::MAX / 2 + 1, u64::MAX / 2 + 1)] {
        refused(
            &image(vec![entry(0, 0, 4), entry(9, offset, len)], 64, 64),
            &["entry %9", "overflows"],
        );
    }
    // In u64 range, past the data: by an offset, by a length, by one byte.
    for (offset, len) in [(u64::MAX - 10, 4), (0, u64::MAX - 10), (1 << 40, 1), (60, 5), (65, 0)] {
        let err = refused(
            &image(vec![entry(9, offset, len)], 64, 64),
            &["entry %9", "outside the data"],
        );
        assert!(err.contains("(64 bytes)"), "the error gives the data length: {err}");
    }
    // An entry ending exactly at the end of the data is fine.
    assert!(read_weights(&image(vec![entry(9, 60, 4)], 64, 64), &fp(), "w").is_ok());
}

#[test]
fn every_truncation_of_an_image_is_refused() {
    let img = image(vec![entry(3, 0, 8), entry(5, 64, 4)], 68, 68);
    let head = img.len() - 68;
    for n in 0..img.len() {
        let err = read_weights(&img[..n], &fp(), "w").expect_err("a truncated image");
        let named = if n < 16 {
            err.contains("not an ouroc weights file")
        } else {
            err.contains("truncated")
        };
        assert!(named, "{n} of {} bytes ({head} of head): {err}", img.len());
    }
}

#[test]
fn blob_lengths_are_checked_against_the_file() {
    assert_eq!(blob_len(10, 100, "the metadata"), Ok(10));
    assert_eq!(blob_len(100, 100, "the metadata"), Ok(100));
    for len in [101, u64::MAX, u64::MAX - 7] {
        let err = blob_len(len, 100, "the linked metadata").unwrap_err();
        assert!(
            err.contains("corrupt executable")
                && err.contains("the linked metadata")
                && err.contains(&len.to_string())
                && err.contains("100 bytes"),
            "{err}"
        );
    }
    // `blob` writes the length `blob_len` reads back.
    let b = blob(b"hello");
    let len = u64::from_le_bytes(b[..8].try_into().unwrap());
    assert_eq!(blob_len(len, b.len() as u64 - 8, "b"), Ok(5));
}
