//! Correlation rules: patterns over events in a window of event time that raise an alert of
//! their own, such as "5 `login_failed` for one account within 1 minute" or "the same source
//! address on 10 accounts within 5 minutes".
//!
//! A rule is given as `--rule 'name=... [kind=...] by=account|source [distinct=account|source]
//! count=N within=DURATION severity=S'`: events (of `kind`, when given) are grouped by `by`;
//! the rule matches when a group has `count` events (or `count` different values of
//! `distinct`) within `within` of each other, by the events' own time.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowline::prelude::*;
use flowline::{BatchSink, Outage};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::event::{Account, Event, now_ms};
use crate::store::{self, Db, Writes};
use crate::ws::{Hub, Msg};

/// What events are grouped by, or counted distinct by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Field {
    /// The account the event was posted for.
    Account,
    /// The source address the event names (events without one are not grouped).
    Source,
}

impl Field {
    fn parse(s: &str) -> Option<Field> {
        match s {
            "account" => Some(Field::Account),
            "source" => Some(Field::Source),
            _ => None,
        }
    }
}

/// One rule.
#[derive(Debug, Clone, Serialize)]
pub struct Rule {
    /// Its name (in alerts, `/metrics` and the page).
    pub name: String,
    /// Only events of this kind count, when given.
    pub kind: Option<String>,
    /// Events are grouped by this.
    pub by: Field,
    /// When given, the rule counts different values of this in a group, not events.
    pub distinct: Option<Field>,
    /// How many it takes.
    pub count: u64,
    /// Within how long, in event time.
    #[serde(serialize_with = "as_secs")]
    pub within: Duration,
    /// The severity of the alert it raises (0 to 10).
    pub severity: u8,
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `60s`, `5m`, `1h`, `500ms`.
fn parse_duration(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = n.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    (!d.is_zero() && d <= Duration::from_secs(24 * 3600)).then_some(d)
}

/// The example rules, on unless `--rule` gives others (or `--no-default-rules`).
pub const DEFAULT_RULES: [&str; 2] = [
    "name=brute_force kind=login_failed by=account count=5 within=1m severity=8",
    "name=address_on_many_accounts by=source distinct=account count=10 within=5m severity=8",
];

impl Rule {
    /// Parses a rule; every problem is named at once.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let mut problems = Vec::new();
        let (mut name, mut kind, mut by, mut distinct, mut count, mut within, mut severity) =
            (None, None, None, None, None, None, None);
        for part in text.split_whitespace() {
            let Some((k, v)) = part.split_once('=') else {
                problems.push(format!("`{part}` is not key=value"));
                continue;
            };
            match k {
                "name"
                    if !v.is_empty()
                        && v.len() <= 64
                        && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                {
                    name = Some(v.to_string())
                }
                "name" => problems.push(format!(
                    "name `{v}`: letters, digits and _ only, at most 64"
                )),
                "kind" if !v.is_empty() && v.len() <= crate::event::MAX_KIND_LEN => {
                    kind = Some(v.to_string())
                }
                "kind" => problems.push(format!("kind `{v}`: 1 to 64 bytes")),
                "by" => match Field::parse(v) {
                    Some(f) => by = Some(f),
                    None => problems.push(format!("by `{v}`: must be account or source")),
                },
                "distinct" => match Field::parse(v) {
                    Some(f) => distinct = Some(f),
                    None => problems.push(format!("distinct `{v}`: must be account or source")),
                },
                "count" => match v.parse::<u64>() {
                    Ok(n) if (1..=1_000_000).contains(&n) => count = Some(n),
                    _ => problems.push(format!("count `{v}`: must be 1 to 1000000")),
                },
                "within" => match parse_duration(v) {
                    Some(d) => within = Some(d),
                    None => problems.push(format!(
                        "within `{v}`: a duration such as 500ms, 60s, 5m, 1h (above 0, at most 24h)"
                    )),
                },
                "severity" => match v.parse::<u8>() {
                    Ok(n) if n <= crate::event::MAX_SEVERITY => severity = Some(n),
                    _ => problems.push(format!("severity `{v}`: must be 0 to 10")),
                },
                _ => problems.push(format!(
                    "unknown key `{k}` (name, kind, by, distinct, count, within, severity)"
                )),
            }
        }
        for (missing, what) in [
            (name.is_none(), "name"),
            (by.is_none(), "by"),
            (count.is_none(), "count"),
            (within.is_none(), "within"),
            (severity.is_none(), "severity"),
        ] {
            if missing && !problems.iter().any(|p| p.starts_with(what)) {
                problems.push(format!("{what} is missing"));
            }
        }
        if by.is_some() && by == distinct {
            problems.push("distinct must differ from by".into());
        }
        if !problems.is_empty() {
            return Err(format!("rule `{text}`: {}", problems.join("; ")));
        }
        Ok(Rule {
            name: name.unwrap_or_default(),
            kind,
            by: by.unwrap_or(Field::Account),
            distinct,
            count: count.unwrap_or(1),
            within: within.unwrap_or(Duration::from_secs(60)),
            severity: severity.unwrap_or(0),
        })
    }
}

/// The rules in force, with their match counts.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<(Rule, AtomicU64)>,
}

impl RuleSet {
    /// The rules given.
    pub fn new(rules: Vec<Rule>) -> RuleSet {
        RuleSet {
            rules: rules.into_iter().map(|r| (r, AtomicU64::new(0))).collect(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Counts a match of rule `i`.
    pub fn matched(&self, i: usize) {
        if let Some((r, n)) = self.rules.get(i) {
            n.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("siem_rule_matches_total", "rule" => r.name.clone()).increment(1);
        }
    }

    /// The rules and their matches so far, for `/api/rules`.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        self.rules
            .iter()
            .map(|(r, n)| {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["matches"] = n.load(Ordering::Relaxed).into();
                v
            })
            .collect()
    }

    /// Shared.
    pub fn shared(self) -> Arc<RuleSet> {
        Arc::new(self)
    }
}

/// Groups a rule tracks at most; past it, a new group is not tracked (counted in
/// `siem_rule_groups_refused_total`) until expired ones are swept.
const MAX_GROUPS: usize = 100_000;

/// What one group of one rule holds: its last events' (time, distinct value), at most
/// `count` of them, and until when it is quiet after a match.
#[derive(Debug, Default)]
struct Group {
    seen: VecDeque<(i64, String)>,
    quiet_until: i64,
    newest: i64,
}

/// A rule matched: the event it raises.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// The rule's index in its set.
    pub rule: usize,
    /// The group's value (account id or source address).
    pub group: String,
    /// The account of the event that completed the match.
    pub account: Option<Arc<Account>>,
    /// The first and last event times of the match.
    pub first_ms: i64,
    /// The last.
    pub last_ms: i64,
}

/// The rules' state over the events seen so far: for each rule and group, a window of event
/// time `within` long ending at the group's newest event.
pub struct Matcher {
    rules: Arc<RuleSet>,
    groups: Vec<HashMap<String, Group>>,
}

impl Matcher {
    /// No events seen yet.
    pub fn new(rules: Arc<RuleSet>) -> Matcher {
        let groups = rules.rules.iter().map(|_| HashMap::new()).collect();
        Matcher { rules, groups }
    }

    /// Takes one event; the matches it completes. A group that matched is quiet (raises
    /// nothing) for `within` after the match and starts over then, so a flood raises one
    /// alert a window, not one per event.
    pub fn push(&mut self, e: &Event) -> Vec<Match> {
        let mut out = Vec::new();
        for (i, (rule, _)) in self.rules.rules.iter().enumerate() {
            if rule.kind.as_deref().is_some_and(|k| k != e.kind) {
                continue;
            }
            let value = |f: Field| match f {
                Field::Account => Some(e.account_id().to_string()),
                Field::Source => e.source.clone(),
            };
            let Some(key) = value(rule.by) else { continue };
            let distinct = match rule.distinct {
                Some(f) => match value(f) {
                    Some(v) => v,
                    None => continue,
                },
                None => String::new(),
            };
            let within = rule.within.as_millis() as i64;
            let groups = &mut self.groups[i];
            if !groups.contains_key(&key) && groups.len() >= MAX_GROUPS {
                // Sweep the groups with nothing left in their window and not quiet.
                let t = e.time_ms;
                groups.retain(|_, g| g.newest > t - within || g.quiet_until > t);
                if groups.len() >= MAX_GROUPS {
                    metrics::counter!("siem_rule_groups_refused_total", "rule" => rule.name.clone())
                        .increment(1);
                    continue;
                }
            }
            let g = groups.entry(key.clone()).or_default();
            if e.time_ms < g.quiet_until {
                continue;
            }
            g.newest = g.newest.max(e.time_ms);
            // Keep the window: events within `within` of the newest, in time order (an
            // out-of-order one lands in its place; one older than the window is not kept).
            let cutoff = g.newest - within;
            if e.time_ms <= cutoff {
                continue;
            }
            if rule.distinct.is_some() {
                // One entry per value, at its latest time.
                if let Some(pos) = g.seen.iter().position(|(_, v)| *v == distinct) {
                    if g.seen[pos].0 >= e.time_ms {
                        continue;
                    }
                    g.seen.remove(pos);
                }
            }
            let pos = g.seen.partition_point(|(t, _)| *t <= e.time_ms);
            g.seen.insert(pos, (e.time_ms, distinct));
            while g.seen.front().is_some_and(|(t, _)| *t <= cutoff) {
                g.seen.pop_front();
            }
            // Only the latest `count` matter: a match needs `count` within the window.
            while g.seen.len() as u64 > rule.count {
                g.seen.pop_front();
            }
            if g.seen.len() as u64 == rule.count {
                let first_ms = g.seen.front().map_or(e.time_ms, |(t, _)| *t);
                let last_ms = g.newest;
                g.seen.clear();
                g.quiet_until = last_ms + within;
                out.push(Match {
                    rule: i,
                    group: key,
                    account: e.account.clone(),
                    first_ms,
                    last_ms,
                });
            }
        }
        out
    }

    /// The event a match raises: stored, shown and alerted like a posted one. Its id names
    /// the rule, the group and the match's first time, so a match stored twice is one row.
    pub fn event_of(&self, m: &Match) -> Event {
        let rule = &self.rules.rules[m.rule].0;
        let what = match rule.distinct {
            Some(f) => format!("{} different {}s", rule.count, field_name(f)),
            None => format!(
                "{} {}",
                rule.count,
                rule.kind.as_deref().unwrap_or("events")
            ),
        };
        let received_ms = now_ms();
        Event {
            id: format!("rule:{}:{}:{}", rule.name, m.group, m.first_ms),
            api_key: String::new(),
            // A group by account is that account's; a group by source spans accounts and
            // is shown to the viewer token only.
            account: match rule.by {
                Field::Account => m.account.clone(),
                Field::Source => None,
            },
            kind: format!("rule:{}", rule.name),
            severity: rule.severity,
            message: format!(
                "{what} for {} {} within {}s",
                field_name(rule.by),
                m.group,
                rule.within.as_secs_f64()
            ),
            received_ms,
            time_ms: m.last_ms,
            source: match rule.by {
                Field::Source => Some(m.group.clone()),
                Field::Account => None,
            },
            status: "stored",
            alert: true,
            rule: Some(rule.name.clone()),
        }
    }
}

fn field_name(f: Field) -> &'static str {
    match f {
        Field::Account => "account",
        Field::Source => "source",
    }
}

/// The rules' pipeline: stored events in, each match's event stored (with its pending alert),
/// broadcast, and the outbox woken.
pub fn start(
    rules: Arc<RuleSet>,
    events: mpsc::Receiver<Event>,
    db: Db,
    writes: Writes,
    hub: Hub,
    outbox: Arc<Notify>,
) -> Handle {
    let mut matcher = Matcher::new(rules.clone());
    Pipeline::from_channel(events)
        .flat_map(move |e: Event| {
            let found = matcher.push(&e);
            found
                .into_iter()
                .map(|m| {
                    rules.matched(m.rule);
                    matcher.event_of(&m)
                })
                .collect::<Vec<_>>()
        })
        .into_sink(Matches {
            db,
            writes,
            hub,
            outbox,
        })
        .name("siem_rules")
        .spawn()
}

/// Stores and shows the matches' events.
struct Matches {
    db: Db,
    writes: Writes,
    hub: Hub,
    outbox: Arc<Notify>,
}

impl BatchSink<Event> for Matches {
    type Output = ();

    fn name(&self) -> &'static str {
        "rule_alert"
    }

    async fn write(&mut self, batch: Vec<Event>) -> Result<(), flowline::BoxError> {
        let batch = Arc::new(batch);
        let new = Outage::default()
            .retry("database", || {
                let (db, writes, batch) = (self.db.clone(), self.writes.clone(), batch.clone());
                async move {
                    writes
                        .run(&db, move |conn| store::insert_batch(conn, &batch))
                        .await
                }
            })
            .await?;
        for (e, new) in batch.iter().zip(new) {
            if new && let Ok(json) = serde_json::to_string(e) {
                let _ = self.hub.send(Msg::new(e.account_id(), json));
            }
        }
        self.outbox.notify_one();
        Ok(())
    }

    fn finish(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rules_parse() {
        let r = Rule::parse(DEFAULT_RULES[0]).unwrap();
        assert_eq!(
            (r.count, r.within, r.severity, r.kind.as_deref()),
            (5, Duration::from_secs(60), 8, Some("login_failed"))
        );
        let r = Rule::parse(DEFAULT_RULES[1]).unwrap();
        assert_eq!((r.by, r.distinct), (Field::Source, Some(Field::Account)));
    }

    #[test]
    fn every_problem_of_a_rule_is_named() {
        let e =
            Rule::parse("name=x! by=ip count=0 within=0s severity=11 colour=red oops").unwrap_err();
        for part in [
            "name `x!`",
            "by `ip`",
            "count `0`",
            "within `0s`",
            "severity `11`",
            "colour",
            "`oops`",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        let e = Rule::parse("name=a by=account").unwrap_err();
        for part in [
            "count is missing",
            "within is missing",
            "severity is missing",
        ] {
            assert!(e.contains(part), "{part}: {e}");
        }
        assert!(
            Rule::parse("name=a by=account distinct=account count=2 within=1m severity=1")
                .unwrap_err()
                .contains("distinct must differ")
        );
        for bad in ["18446744073709551616s", "999999999999h", "1d", "s", "25h"] {
            assert!(parse_duration(bad).is_none(), "{bad}");
        }
    }

    fn event(account: i64, kind: &str, time_ms: i64, source: Option<&str>) -> Event {
        let inc = crate::event::Incoming::parse(
            format!(r#"{{"id":"e{time_ms}","kind":"{kind}","severity":1}}"#).as_bytes(),
        )
        .unwrap();
        let mut e = Event::accepted(inc, String::new());
        e.account = Some(Arc::new(Account {
            id: account,
            name: format!("account {account}"),
            contact: String::new(),
        }));
        e.time_ms = time_ms;
        e.source = source.map(String::from);
        e
    }

    fn matcher(rule: &str) -> Matcher {
        Matcher::new(RuleSet::new(vec![Rule::parse(rule).unwrap()]).shared())
    }

    const T0: i64 = 1_700_000_000_000;

    #[test]
    fn five_failures_within_a_minute_match_once_at_the_boundary() {
        let mut m = matcher(DEFAULT_RULES[0]);
        // Four at T0.., the fifth exactly one minute after the first: the first is then
        // outside (the window is the minute ending at the newest event, its start excluded).
        for i in 0..4 {
            assert!(m.push(&event(1, "login_failed", T0 + i, None)).is_empty());
        }
        assert!(
            m.push(&event(1, "login_failed", T0 + 60_000, None))
                .is_empty()
        );
        // One more, late but inside: T0+1 .. T0+60_000 hold five.
        let got = m.push(&event(1, "login_failed", T0 + 59_999, None));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].first_ms, got[0].last_ms), (T0 + 1, T0 + 60_000));
        // Quiet for the next minute; other kinds and accounts do not count.
        for i in 0..10 {
            assert!(
                m.push(&event(1, "login_failed", T0 + 60_001 + i, None))
                    .is_empty()
            );
            assert!(m.push(&event(2, "login_ok", T0 + i, None)).is_empty());
        }
        let e = m.event_of(&got[0]);
        assert_eq!(
            (e.severity, e.alert, e.rule.as_deref()),
            (8, true, Some("brute_force"))
        );
        assert_eq!(e.account_id(), 1);
    }

    #[test]
    fn out_of_order_failures_within_the_window_count() {
        let mut m = matcher(DEFAULT_RULES[0]);
        for t in [50_000, 10_000, 30_000, 20_000] {
            assert!(m.push(&event(3, "login_failed", T0 + t, None)).is_empty());
        }
        // Older than a minute before the newest (50 s): not counted.
        assert!(
            m.push(&event(3, "login_failed", T0 - 10_001, None))
                .is_empty()
        );
        assert_eq!(
            m.push(&event(3, "login_failed", T0 + 40_000, None)).len(),
            1
        );
    }

    #[test]
    fn one_address_on_ten_accounts_matches_repeats_do_not_count() {
        let mut m = matcher(DEFAULT_RULES[1]);
        for a in 1..=9 {
            for rep in 0..3 {
                let e = event(a, "login_failed", T0 + a * 1000 + rep, Some("10.0.0.9"));
                assert!(m.push(&e).is_empty(), "account {a}");
            }
        }
        // Without a source, or from another address: nothing.
        assert!(m.push(&event(10, "x", T0 + 20_000, None)).is_empty());
        assert!(
            m.push(&event(10, "x", T0 + 20_000, Some("10.0.0.8")))
                .is_empty()
        );
        let got = m.push(&event(10, "x", T0 + 20_000, Some("10.0.0.9")));
        assert_eq!(got.len(), 1);
        let e = m.event_of(&got[0]);
        assert_eq!((e.account_id(), e.source.as_deref()), (0, Some("10.0.0.9")));
        assert!(e.id.starts_with("rule:address_on_many_accounts:10.0.0.9:"));
    }
}
