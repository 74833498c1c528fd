//! How a `run` result travels to the agent: the output once, in a message every standard client
//! accepts.
//!
//! Guarantees:
//! - The output travels once. `structuredContent` holds the result; the text block holds a
//!   one-line summary of it, except for clients on 2025-03-26 (which predates structured content),
//!   whose text block holds the result as JSON.
//! - The whole JSON-RPC message, with its SSE framing, fits in [`MAX_MESSAGE_BYTES`] (1 MiB, the
//!   official Python SDK's limit per SSE event and the strictest among standard clients), whatever
//!   the output holds. Output that would not fit is cut at a character boundary (the start of each
//!   stream is kept, the longer stream gives way first) and `truncated` is set.
//! - The redaction counts describe the output returned: each is the number of `[REDACTED:NAME]`
//!   labels in it, never more than the redactors reported (output dropped at a cap, by the runner
//!   or here, no longer counts; a label the command printed itself cannot raise a count).

use std::collections::BTreeMap;

use rmcp::model::{CallToolResult, ContentBlock, ProtocolVersion};
use serde_json::Value;

use crate::runs::RunResult;

/// Largest JSON-RPC message (with its SSE framing) a `run` answer may take.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

/// Room for the JSON-RPC envelope (`{"jsonrpc":"2.0","id":…,"result":…}`, without the id) and
/// SSE framing (`data: `, `id: …`, blank line) around the result.
const FRAMING_BYTES: usize = 4096;

/// What the text block of the answer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextForm {
    /// A one-line summary; the result is in `structuredContent`.
    Summary,
    /// The result as JSON, for clients that predate structured content.
    Json,
}

impl TextForm {
    /// The form for a session's negotiated protocol version: JSON for versions before 2025-06-18
    /// (or an unknown one), the summary from 2025-06-18 on.
    pub fn for_version(version: Option<&ProtocolVersion>) -> Self {
        match version.map(ProtocolVersion::as_str) {
            None | Some("2024-11-05" | "2025-03-26") => TextForm::Json,
            Some(_) => TextForm::Summary,
        }
    }
}

/// The answer to a `run` call whose JSON-RPC id serialises to `id_bytes` bytes.
pub fn to_call_tool_result(
    mut result: RunResult,
    form: TextForm,
    id_bytes: usize,
) -> CallToolResult {
    let budget = MAX_MESSAGE_BYTES
        .saturating_sub(FRAMING_BYTES)
        .saturating_sub(id_bytes);
    let reported = recount(&result.redactions, &result.stdout, &result.stderr);
    result.redactions = reported.clone();
    let whole = render(&result, form);
    if serialized_len(&whole) <= budget {
        return whole;
    }
    let stdout = std::mem::take(&mut result.stdout);
    let stderr = std::mem::take(&mut result.stderr);
    result.truncated = true;
    // The summary's byte counts grow by a few digits once output is back in: leave room for them.
    let mut room = budget.saturating_sub(serialized_len(&render(&result, form)) + 32);
    loop {
        let (keep_out, keep_err) = split(&stdout, &stderr, room, form);
        result.stdout = stdout[..keep_out].to_owned();
        result.stderr = stderr[..keep_err].to_owned();
        result.redactions = recount(&reported, &result.stdout, &result.stderr);
        let reply = render(&result, form);
        let size = serialized_len(&reply);
        if size <= budget || room == 0 {
            return reply;
        }
        // Still over (more digits than allowed for, or an escaping the cost model does not
        // know): take the difference off and measure again.
        room = room.saturating_sub(size - budget);
    }
}

fn render(result: &RunResult, form: TextForm) -> CallToolResult {
    let value = serde_json::to_value(result).unwrap_or(Value::Null);
    let text = match form {
        TextForm::Summary => summary(result),
        TextForm::Json => value.to_string(),
    };
    let mut reply = CallToolResult::success(vec![ContentBlock::text(text)]);
    reply.structured_content = Some(value);
    reply
}

/// One line saying what happened; the output itself is in `structuredContent`.
fn summary(result: &RunResult) -> String {
    let ended = match (result.exit_code, result.signal) {
        _ if result.cancelled => {
            "was stopped because its grant was revoked or ran out of time".to_owned()
        }
        _ if result.timed_out => "timed out and was killed".to_owned(),
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => "ended".to_owned(),
    };
    let redacted = if result.redactions.is_empty() {
        String::new()
    } else {
        let names: Vec<String> = result
            .redactions
            .iter()
            .map(|(name, n)| format!("{name} ×{n}"))
            .collect();
        format!("; redacted {}", names.join(", "))
    };
    let truncated = if result.truncated { " (truncated)" } else { "" };
    format!(
        "The command {ended} after {} ms: stdout {} bytes, stderr {} bytes{truncated}{redacted}; {} runs left on the grant. The output is in the structured result (stdout, stderr).",
        result.duration_ms,
        result.stdout.len(),
        result.stderr.len(),
        result.uses_left,
    )
}

/// Byte lengths of the prefixes of `out` and `err` to keep so that their encoded size fits in
/// `room`: each stream gets half, and a stream needing less leaves the rest to the other.
fn split(out: &str, err: &str, room: usize, form: TextForm) -> (usize, usize) {
    let (need_out, need_err) = (encoded_len(out, form), encoded_len(err, form));
    let half = room / 2;
    let (room_out, room_err) = if need_out <= half {
        (need_out, room - need_out)
    } else if need_err <= room - half {
        (room - need_err, need_err)
    } else {
        (half, room - half)
    };
    (
        prefix_within(out, room_out, form),
        prefix_within(err, room_err, form),
    )
}

fn prefix_within(s: &str, room: usize, form: TextForm) -> usize {
    let mut used = 0;
    for (at, c) in s.char_indices() {
        used += encoded_char_len(c, form);
        if used > room {
            return at;
        }
    }
    s.len()
}

fn encoded_len(s: &str, form: TextForm) -> usize {
    s.chars().map(|c| encoded_char_len(c, form)).sum()
}

/// Bytes one character of output takes in the answer: escaped once in `structuredContent`, and
/// for [`TextForm::Json`] escaped twice more in the text block (JSON in a JSON string).
fn encoded_char_len(c: char, form: TextForm) -> usize {
    let (once, twice) = match c {
        '"' | '\\' => (2, 4),
        '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => (2, 3),
        c if u32::from(c) < 0x20 => (6, 7),
        c => (c.len_utf8(), c.len_utf8()),
    };
    match form {
        TextForm::Summary => once,
        TextForm::Json => once + twice,
    }
}

/// The redaction counts of the returned output: the `[REDACTED:NAME]` labels it holds, never more
/// than were reported.
fn recount(reported: &BTreeMap<String, u64>, stdout: &str, stderr: &str) -> BTreeMap<String, u64> {
    reported
        .iter()
        .filter_map(|(name, &count)| {
            let label = format!("[REDACTED:{name}]");
            let found = (stdout.matches(&label).count() + stderr.matches(&label).count()) as u64;
            let kept = found.min(count);
            (kept > 0).then(|| (name.clone(), kept))
        })
        .collect()
}

/// Bytes `value` takes as compact JSON.
pub fn serialized_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    match serde_json::to_writer(&mut count, value) {
        Ok(()) => count.0,
        Err(_) => usize::MAX,
    }
}

#[cfg(test)]
mod tests;
