//! JSON in and out: transfers, actions, outcomes, and the `--tasks` input.

use serde_json::{Map, Value as J, json};
use waybill::{
    Action, CancelReason, FailReason, Kind, Outcome, Request, ResumeFrom, Task, TaskRef, TaskState,
    Transfer,
};

use crate::time;

pub fn kind(k: Kind) -> &'static str {
    match k {
        Kind::Upload => "upload",
        Kind::Download => "download",
    }
}

pub fn outcome(o: &Outcome) -> J {
    match o {
        Outcome::Succeeded { status } => json!({"result": "succeeded", "status": status}),
        Outcome::Failed { reason, error } => {
            let reason = match reason {
                FailReason::Permanent => "permanent",
                FailReason::GaveUp => "gave-up",
                FailReason::Expired => "expired",
            };
            json!({"result": "failed", "reason": reason, "error": error})
        }
        Outcome::Cancelled => json!({"result": "cancelled"}),
    }
}

fn request(r: &Request) -> J {
    let headers: Vec<J> = r
        .headers
        .iter()
        .map(|h| json!({"name": h.name, "value": h.value, "secret": h.secret}))
        .collect();
    json!({"method": r.method, "url": r.url, "headers": headers})
}

fn task_ref(t: &TaskRef) -> J {
    json!({"session": t.session, "task_id": t.task_id})
}

/// A transfer, with the fields `docs/CLI.md` lists.
pub fn transfer(t: &Transfer) -> J {
    let (m, s) = (&t.manifest, &t.state);
    let (sent, received) = match m.kind {
        Kind::Upload => (s.bytes_done, 0),
        Kind::Download => (0, s.bytes_done),
    };
    let expected = s.bytes_total.or(match m.kind {
        Kind::Upload => Some(m.payload.len()),
        Kind::Download => None,
    });
    json!({
        "id": t.id().to_string(),
        "kind": kind(m.kind),
        "phase": s.phase.to_string(),
        "group": m.group,
        "session": m.session,
        "url": t.request().url,
        "failures": s.failures,
        "max_attempts": m.retry.max_attempts,
        "next_attempt": s.next_attempt.map(time::format),
        "task": s.binding.as_ref().map(|b| json!({"session": b.session, "task_id": b.task_id, "tag": b.tag})),
        "sent": sent,
        "received": received,
        "expected": expected,
        "outcome": s.outcome.as_ref().map(outcome),
        "created": time::format(m.created),
        "deadline": m.deadline.map(time::format),
        "request": request(t.request()),
        "last_error": s.last_error,
        "partial_len": s.partial_len,
    })
}

/// One action of a plan: `action`, `transfer` and `task` where there are ones, then its own
/// fields.
pub fn action(a: &Action) -> J {
    let mut o = Map::new();
    o.insert("action".into(), J::from(a.name()));
    if let Some(id) = a.transfer() {
        o.insert("transfer".into(), J::from(id.to_string()));
    }
    if let Some(t) = a.task() {
        o.insert("task".into(), task_ref(t));
    }
    let mut put = |k: &str, v: J| {
        o.insert(k.into(), v);
    };
    match a {
        Action::Adopt {
            tag,
            bytes_done,
            bytes_total,
            ..
        } => {
            put("tag", json!(tag));
            put("done", json!(bytes_done));
            put("expected", json!(bytes_total));
        }
        Action::Cancel { reason, .. } => put(
            "reason",
            J::from(match reason {
                CancelReason::NoRecord => "no-record",
                CancelReason::Ambiguous => "ambiguous",
            }),
        ),
        Action::Recreate {
            request: r,
            attempt,
            not_before,
            failure,
            ..
        }
        | Action::Resume {
            request: r,
            attempt,
            not_before,
            failure,
            ..
        } => {
            put("attempt", json!(attempt));
            put("not_before", json!(not_before.map(time::format)));
            put("request", request(r));
            put("failure", json!(failure));
            if let Action::Resume { from, .. } = a {
                put(
                    "from",
                    match from {
                        ResumeFrom::ResumeData => json!({"resume_data": true}),
                        ResumeFrom::Partial { len } => json!({"partial": len}),
                    },
                );
            }
        }
        Action::Deliver {
            outcome: out,
            claim,
            ..
        } => {
            put("outcome", outcome(out));
            put("claim", json!(claim));
        }
        Action::GiveUp { error, .. } => put("error", json!(error)),
        Action::Purge { .. } | Action::Expire { .. } | Action::Quarantine { .. } => {}
        _ => {}
    }
    J::Object(o)
}

/// Reads the `--tasks` document: an array of task objects.
pub fn tasks(text: &str) -> Result<Vec<Task>, String> {
    let doc: J =
        serde_json::from_str(text).map_err(|e| format!("the task list is not JSON: {e}"))?;
    let items = doc
        .as_array()
        .ok_or("the task list must be a JSON array of task objects")?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| task(v).map_err(|e| format!("task {} of the list: {e}", i + 1)))
        .collect()
}

fn task(v: &J) -> Result<Task, String> {
    let o = v.as_object().ok_or("not an object")?;
    const KNOWN: [&str; 10] = [
        "session", "task_id", "url", "tag", "state", "status", "error", "sent", "received",
        "expected",
    ];
    if let Some(k) = o.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown field {k:?}"));
    }
    let string = |k: &str| -> Result<Option<String>, String> {
        match o.get(k) {
            None | Some(J::Null) => Ok(None),
            Some(J::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("{k:?} must be a string")),
        }
    };
    let number = |k: &str| -> Result<Option<u64>, String> {
        match o.get(k) {
            None | Some(J::Null) => Ok(None),
            Some(n) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{k:?} must be a non-negative integer")),
        }
    };
    let session = string("session")?.ok_or("\"session\" is missing")?;
    let task_id = number("task_id")?.ok_or("\"task_id\" is missing")?;
    let url = string("url")?.ok_or("\"url\" is missing")?;
    let state = match string("state")?.as_deref() {
        Some("running") | None => TaskState::Running,
        Some("suspended") => TaskState::Suspended,
        Some("cancelling") => TaskState::Cancelling,
        Some("completed") => TaskState::Completed,
        Some(other) => {
            return Err(format!(
                "unknown state {other:?} (running, suspended, cancelling or completed)"
            ));
        }
    };
    let status = number("status")?
        .map(|s| u16::try_from(s).map_err(|_| format!("status {s} is not an HTTP status")))
        .transpose()?;
    let mut t = Task::running(session, task_id, url);
    t.tag = string("tag")?;
    t.state = state;
    t.status = status;
    t.error = string("error")?;
    // One counter per task: an upload's bytes are mostly sent, a download's mostly received.
    t.bytes_done = number("sent")?
        .unwrap_or(0)
        .max(number("received")?.unwrap_or(0));
    t.bytes_total = number("expected")?;
    Ok(t)
}
