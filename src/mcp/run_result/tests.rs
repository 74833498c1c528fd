use super::*;
use crate::config::DEFAULT_MAX_OUTPUT_BYTES;
use rmcp::model::{RequestId, ServerJsonRpcMessage, ServerResult};

fn result(stdout: String, stderr: String, redactions: &[(&str, u64)]) -> RunResult {
    RunResult {
        exit_code: Some(0),
        signal: None,
        stdout,
        stderr,
        redactions: redactions
            .iter()
            .map(|(n, c)| ((*n).to_owned(), *c))
            .collect(),
        truncated: false,
        timed_out: false,
        cancelled: false,
        duration_ms: 1234,
        uses_left: 7,
    }
}

/// The bytes the official Python SDK counts for the SSE event carrying this answer: every line of
/// the event (`data: …` and `id: …`), as rmcp frames it.
fn sse_event_bytes(reply: &CallToolResult, id: RequestId) -> usize {
    let message = ServerJsonRpcMessage::response(ServerResult::CallToolResult(reply.clone()), id);
    let data = serde_json::to_string(&message).unwrap();
    assert!(!data.contains('\n'), "one data line");
    "data: ".len() + data.len() + "id: 4294967295/4294967295".len()
}

fn structured(reply: &CallToolResult) -> RunResult {
    serde_json::from_value(reply.structured_content.clone().unwrap()).unwrap()
}

fn text(reply: &CallToolResult) -> String {
    reply.content[0].as_text().unwrap().text.clone()
}

/// Output of `len` bytes that costs the most to encode for `form`.
fn worst(len: usize, c: char) -> String {
    std::iter::repeat_n(c, len).collect()
}

#[test]
fn output_at_the_default_cap_always_fits_one_message_and_says_it_was_cut() {
    let ids = [
        RequestId::Number(i64::MAX),
        RequestId::String("x".repeat(20_000).into()),
    ];
    for form in [TextForm::Summary, TextForm::Json] {
        for c in ['"', '\n', '\u{1}', '😀', 'a'] {
            for id in &ids {
                let id_bytes = serde_json::to_string(id).unwrap().len();
                let out = worst(DEFAULT_MAX_OUTPUT_BYTES / c.len_utf8(), c);
                let err = worst(DEFAULT_MAX_OUTPUT_BYTES / c.len_utf8(), c);
                let reply =
                    to_call_tool_result(result(out.clone(), err.clone(), &[]), form, id_bytes);
                let size = sse_event_bytes(&reply, id.clone());
                assert!(size <= MAX_MESSAGE_BYTES, "{form:?} {c:?}: {size}");
                let got = structured(&reply);
                assert!(out.starts_with(&got.stdout) && err.starts_with(&got.stderr));
                let whole = got.stdout.len() == out.len() && got.stderr.len() == err.len();
                assert_eq!(got.truncated, !whole, "{form:?} {c:?}");
                // Cut only as far as needed: nearly the whole budget is used.
                if !whole {
                    assert!(
                        size > MAX_MESSAGE_BYTES - 8192 - id_bytes,
                        "{form:?} {c:?}: {size}"
                    );
                }
            }
        }
    }
}

#[test]
fn plain_text_at_the_default_cap_arrives_whole() {
    let line = "2024-05-01T12:00:00Z INFO request served in 3 ms path=/api/v1/items\n";
    let text: String = line.repeat(DEFAULT_MAX_OUTPUT_BYTES / line.len());
    let reply = to_call_tool_result(
        result(text.clone(), text.clone(), &[]),
        TextForm::Summary,
        1,
    );
    let got = structured(&reply);
    assert!(!got.truncated);
    assert_eq!((got.stdout, got.stderr), (text.clone(), text));
}

#[test]
fn a_result_that_fits_is_sent_once_with_a_summary() {
    let reply = to_call_tool_result(
        result(
            "hello-output [REDACTED:API_KEY]\n".into(),
            "warn-output [REDACTED:API_KEY]".into(),
            &[("API_KEY", 2)],
        ),
        TextForm::Summary,
        1,
    );
    let got = structured(&reply);
    assert_eq!(got.stdout, "hello-output [REDACTED:API_KEY]\n");
    assert_eq!(got.redactions["API_KEY"], 2);
    assert!(!got.truncated);
    let summary = text(&reply);
    assert!(!summary.contains("hello-output") && !summary.contains("warn-output"));
    assert!(summary.contains("exited with code 0"), "{summary}");
    assert!(
        summary.contains("stdout 32 bytes, stderr 30 bytes"),
        "{summary}"
    );
    assert!(summary.contains("API_KEY ×2"), "{summary}");
    assert_eq!(reply.is_error, Some(false));
}

#[test]
fn clients_before_structured_content_get_the_result_as_json_text() {
    for version in [None, Some(ProtocolVersion::V_2025_03_26)] {
        assert_eq!(TextForm::for_version(version.as_ref()), TextForm::Json);
    }
    for version in [ProtocolVersion::V_2025_06_18, ProtocolVersion::V_2025_11_25] {
        assert_eq!(TextForm::for_version(Some(&version)), TextForm::Summary);
    }
    let reply = to_call_tool_result(result("out".into(), String::new(), &[]), TextForm::Json, 1);
    let from_text: Value = serde_json::from_str(&text(&reply)).unwrap();
    assert_eq!(Some(from_text), reply.structured_content);
}

#[test]
fn redaction_counts_describe_the_output_returned() {
    let filler = worst(1_100_000, 'x');
    let stdout = format!("[REDACTED:A] {filler} [REDACTED:A] [REDACTED:B]");
    let reply = to_call_tool_result(
        result(
            stdout,
            "[REDACTED:C]".into(),
            &[("A", 2), ("B", 1), ("C", 1)],
        ),
        TextForm::Summary,
        1,
    );
    let got = structured(&reply);
    assert!(got.truncated);
    assert_eq!(
        got.redactions,
        BTreeMap::from([("A".to_owned(), 1), ("C".to_owned(), 1)])
    );
    // Output the runner dropped at its cap no longer counts, even when nothing is cut here; a
    // label the command printed itself never raises a count above what was reported.
    let reply = to_call_tool_result(
        result(
            "[REDACTED:A] [REDACTED:A]".into(),
            String::new(),
            &[("A", 1), ("B", 5)],
        ),
        TextForm::Summary,
        1,
    );
    assert_eq!(
        structured(&reply).redactions,
        BTreeMap::from([("A".to_owned(), 1)])
    );
}

#[test]
fn the_longer_stream_gives_way_first() {
    let reply = to_call_tool_result(
        result(worst(2_000_000, 'o'), "short stderr".into(), &[]),
        TextForm::Summary,
        1,
    );
    let got = structured(&reply);
    assert_eq!(got.stderr, "short stderr");
    assert!(got.stdout.len() > 1_000_000, "{}", got.stdout.len());
}
