//! `GET /v1/usage?from=DAY&to=DAY&key=ID`: turns and tokens by API key and
//! backend over a window of UTC days, read from the store, so every host
//! sharing it answers the same ([`crate::usage`]).
//!
//! An admin key may ask for any key, and without `key` gets every
//! configured key; another key gets its own usage only. `from` and `to`
//! (`YYYY-MM-DD`, both included) default to today, and a window spans at
//! most 366 days. This host's own counts are stored first, so its latest
//! turns are in the answer; another host's follow within its
//! `server.usage_flush_secs`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::{json, Value};
use warp::http::StatusCode;
use warp::reply::{Reply, Response};
use warp::Filter;

use super::admin::{no_store, refusal, unavailable, with_caller};
use super::auth::{Caller, ADMIN_ONLY};
use super::error_reply;
use crate::protocol::now_ms;
use crate::state::{self, HostState};
use crate::usage::{self, Counts, DayUsage};

/// The longest window, in days.
const MOST_DAYS: i64 = 366;

/// The route.
pub fn route(
    host: Arc<HostState>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone {
    warp::path!("v1" / "usage")
        .and(warp::get())
        .and(with_caller(host))
        .and(warp::query::<HashMap<String, String>>())
        .then(
            |host: Arc<HostState>, caller, query: HashMap<String, String>| async move {
                let caller: Caller = match caller {
                    Ok(caller) => caller,
                    Err(refused) => return refusal(&refused),
                };
                match answer(&host, &caller, &query).await {
                    Ok(body) => warp::reply::json(&body).into_response(),
                    Err(refused) => *refused,
                }
            },
        )
}

/// A refusal; boxed, as a response is large beside the answer.
type Refused = Box<Response>;

fn bad_request(code: &str, message: &str) -> Refused {
    Box::new(error_reply(StatusCode::BAD_REQUEST, code, message))
}

async fn answer(
    host: &HostState,
    caller: &Caller,
    query: &HashMap<String, String>,
) -> Result<Value, Refused> {
    let today = i64::try_from(now_ms() / 86_400_000).unwrap_or(0);
    let day = |name: &str| match query.get(name) {
        None => Ok(today),
        Some(text) => usage::parse_day(text).ok_or_else(|| {
            bad_request(
                "bad_day",
                &format!("`{name}` must be a date, YYYY-MM-DD (UTC), not `{text}`"),
            )
        }),
    };
    let (from, to) = (day("from")?, day("to")?);
    if from > to {
        return Err(bad_request("bad_window", "`from` is after `to`"));
    }
    if to - from >= MOST_DAYS {
        return Err(bad_request(
            "bad_window",
            &format!("a window spans at most {MOST_DAYS} days"),
        ));
    }
    let active = host.active.load_full();
    let keys: Vec<String> = match (caller, query.get("key")) {
        (Caller::Key { admin: false, id }, asked) => {
            if asked.is_some_and(|asked| asked != id) {
                return Err(Box::new(refusal(&ADMIN_ONLY)));
            }
            vec![id.clone()]
        }
        (_, Some(asked)) => vec![asked.clone()],
        (Caller::Open, None) => vec![caller.id().to_owned()],
        (Caller::Key { .. }, None) => active
            .config
            .auth
            .keys
            .iter()
            .map(|k| k.id.clone())
            .collect(),
    };
    let Some(store) = active.store() else {
        return Err(Box::new(no_store()));
    };
    state::flush_usage(host).await;
    let limit = active.config.server.turn_settings().store_timeout;
    let mut reports = Vec::with_capacity(keys.len());
    for key in keys {
        let days = usage::read(store, &key, from, to, limit)
            .await
            .map_err(|err| Box::new(unavailable(caller, "GET /v1/usage", None, &err)))?;
        reports.push(report(&key, &days));
    }
    Ok(json!({
        "from": usage::format_day(from),
        "to": usage::format_day(to),
        "keys": reports,
    }))
}

/// One key's usage over its days: totals by backend, the grand total and
/// each day's.
fn report(key: &str, days: &[DayUsage]) -> Value {
    let mut backends: BTreeMap<&str, Counts> = BTreeMap::new();
    let mut total = Counts::default();
    for day in days {
        for (backend, counts) in &day.backends {
            backends.entry(backend).or_default().add(counts);
            total.add(counts);
        }
    }
    let days: Vec<Value> = days
        .iter()
        .map(|day| json!({ "day": day.day, "backends": day.backends }))
        .collect();
    json!({ "key": key, "total": total, "backends": backends, "days": days })
}
