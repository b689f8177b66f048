//! Correlation rules: patterns over events in a window of event time that raise an alert of
//! their own, such as "5 `login_failed` for one account within 1 minute" or "the same source
//! address on 10 accounts within 5 minutes".
//!
//! A rule is given as `--rule 'name=... [kind=...] by=account|source [distinct=account|source]
//! count=N within=DURATION severity=S'`: events (of `kind`, when given) are grouped by `by`;
//! the rule matches when a group has `count` events (or `count` different values of
//! `distinct`) within `within` of each other, by the events' own time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flowline::prelude::*;
use flowline::{BatchSink, Fold, Outage, Sliding, Windowed};
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

/// Panes (per group and step) a rule's window stage holds at most; past it a new group's
/// event fails (counted in the stage's report and `siem_rule_refused_total`), the open ones
/// go on.
const MAX_OPEN: usize = 200_000;

/// A rule's windows slide by a twelfth of their size (or a tenth, or not at all, when the
/// size does not divide so): "N within W" is checked on windows of W that start every
/// W/12, so a burst is seen within W/12 of its end, plus the lateness.
fn step_of(within: Duration) -> Duration {
    let ns = within.as_nanos();
    for parts in [12u128, 10, 6, 4, 2] {
        if ns % parts == 0 {
            return Duration::from_nanos((ns / parts) as u64);
        }
    }
    within
}

/// What a window of a rule holds: how many events, their different values of `distinct`,
/// the span of their times, and the latest account.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    n: u64,
    distinct: std::collections::HashSet<String>,
    first_ms: i64,
    last_ms: i64,
    account: Option<Arc<Account>>,
}

impl Tally {
    fn add(&mut self, e: &Event, distinct: Option<Field>) {
        if self.n == 0 || e.time_ms < self.first_ms {
            self.first_ms = e.time_ms;
        }
        self.last_ms = self.last_ms.max(e.time_ms);
        self.n += 1;
        if let Some(f) = distinct
            && let Some(v) = value(e, f)
        {
            self.distinct.insert(v);
        }
        if e.account.is_some() {
            self.account = e.account.clone();
        }
    }

    fn merge(&mut self, other: &Tally) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 || other.first_ms < self.first_ms {
            self.first_ms = other.first_ms;
        }
        self.last_ms = self.last_ms.max(other.last_ms);
        self.n += other.n;
        self.distinct.extend(other.distinct.iter().cloned());
        if other.account.is_some() {
            self.account = other.account.clone();
        }
    }
}

/// An event's value of `f`: the account id, or the source address (none without one).
fn value(e: &Event, f: Field) -> Option<String> {
    match f {
        Field::Account => Some(e.account_id().to_string()),
        Field::Source => e.source.clone(),
    }
}

/// A rule matched in a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// The group's value (account id or source address).
    pub group: String,
    /// The latest account among the window's events.
    pub account: Option<Arc<Account>>,
    /// The first and last event times of the window's events.
    pub first_ms: i64,
    /// The last.
    pub last_ms: i64,
    /// How many it counted (events, or different values).
    pub counted: u64,
}

/// The stages of `rule` over `events`: the events it looks at, grouped by `by`, in sliding
/// windows of `within` by their own time (`lateness` out of order allowed; a quiet input
/// closes its windows after a second); a window that holds `count` (events, or different
/// values of `distinct`) is a match. A group that matched is quiet for one window's length
/// after the matched window, so a flood raises one alert a window, not one per step.
pub fn matches(rule: &Rule, events: Pipeline<Event>, lateness: Duration) -> Pipeline<Match> {
    let (kind, by, distinct, count) = (rule.kind.clone(), rule.by, rule.distinct, rule.count);
    let mut quiet: HashMap<String, Duration> = HashMap::new();
    events
        .filter(move |e: &Event| {
            kind.as_deref().is_none_or(|k| k == e.kind)
                && value(e, by).is_some()
                && distinct.is_none_or(|f| value(e, f).is_some())
        })
        .window(Sliding::new(rule.within, step_of(rule.within)))
        .name(&format!("rule_{}", rule.name))
        .key_by(move |e: &Event| value(e, by).unwrap_or_default())
        .event_time(|e: &Event| Duration::from_millis(e.time_ms.max(0) as u64))
        .allowed_lateness(lateness)
        .idle_timeout(Duration::from_secs(1))
        .max_open(MAX_OPEN)
        .aggregate(
            Fold::new(Tally::default(), move |t: &mut Tally, e: Event| {
                t.add(&e, distinct)
            })
            .merge(|a: &mut Tally, b: &Tally| a.merge(b)),
        )
        .filter_map(move |w: Windowed<String, Tally>| {
            let counted = match distinct {
                Some(_) => w.value.distinct.len() as u64,
                None => w.value.n,
            };
            if counted < count {
                return None;
            }
            if quiet.get(&w.key).is_some_and(|until| w.start < *until) {
                return None;
            }
            if quiet.len() >= MAX_OPEN {
                // Groups whose quiet time is over are forgotten (windows come out in time
                // order, so one that ended before this window started will not be asked
                // about again).
                quiet.retain(|_, until| *until > w.start);
            }
            quiet.insert(w.key.clone(), w.end + (w.end - w.start));
            Some(Match {
                group: w.key,
                account: w.value.account,
                first_ms: w.value.first_ms,
                last_ms: w.value.last_ms,
                counted,
            })
        })
}

/// The event a match raises: stored, shown and alerted like a posted one. Its id names the
/// rule, the group and the match's first time, so a match stored twice is one row.
pub fn event_of(rule: &Rule, m: &Match) -> Event {
    let what = match rule.distinct {
        Some(f) => format!("{} different {}s", m.counted, field_name(f)),
        None => format!("{} {}", m.counted, rule.kind.as_deref().unwrap_or("events")),
    };
    let received_ms = now_ms();
    Event {
        id: format!("rule:{}:{}:{}", rule.name, m.group, m.first_ms),
        api_key: String::new(),
        // A group by account is that account's; a group by source spans accounts and is
        // shown to the viewer token only.
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

fn field_name(f: Field) -> &'static str {
    match f {
        Field::Account => "account",
        Field::Source => "source",
    }
}

/// The rules' pipelines, one per rule: stored events in (from `events`, one sender per
/// rule), each match's event stored (with its pending alert), broadcast, and the outbox
/// woken.
pub struct Running {
    /// Where the events pipeline sends each stored event, per rule.
    pub inputs: Vec<mpsc::Sender<Event>>,
    /// The pipelines.
    pub handles: Vec<Handle>,
}

/// Starts a pipeline per rule.
pub fn start(
    rules: Arc<RuleSet>,
    queue: usize,
    lateness: Duration,
    db: Db,
    writes: Writes,
    hub: Hub,
    outbox: Arc<Notify>,
) -> Running {
    let mut inputs = Vec::new();
    let mut handles = Vec::new();
    for (i, (rule, _)) in rules.rules.iter().enumerate() {
        let (tx, rx) = mpsc::channel(queue);
        inputs.push(tx);
        let (set, rule2) = (rules.clone(), rule.clone());
        handles.push(
            matches(rule, Pipeline::from_channel(rx), lateness)
                .map(move |m| {
                    set.matched(i);
                    event_of(&rule2, &m)
                })
                .into_sink(Matches {
                    db: db.clone(),
                    writes: writes.clone(),
                    hub: hub.clone(),
                    outbox: outbox.clone(),
                })
                .name(format!("siem_rule_{}", rule.name))
                .spawn(),
        );
    }
    Running { inputs, handles }
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
            format!(r#"{{"id":"e{account}-{time_ms}","kind":"{kind}","severity":1}}"#).as_bytes(),
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

    /// The matches of `rule` over `events` (in this order), and the window stage's late
    /// count.
    async fn run(rule: &str, events: Vec<Event>, lateness: Duration) -> (Vec<Match>, u64) {
        let rule = Rule::parse(rule).unwrap();
        let (out, report) = matches(&rule, Pipeline::from_iter(events), lateness)
            .collect_with_report()
            .await
            .unwrap();
        let late = report.stage(&format!("rule_{}", rule.name)).unwrap().late;
        (out, late)
    }

    /// A minute boundary, so that the panes (5 s) line up with the test's times.
    const T0: i64 = 1_700_000_040_000;

    #[tokio::test(start_paused = true)]
    async fn five_failures_within_a_minute_match_once_and_four_do_not() {
        let ev = |a, t| event(a, "login_failed", T0 + t, None);
        let mut events = vec![
            // Account 1: five within 4 s, then five more in the same minute (quiet).
            ev(1, 0),
            ev(1, 1_000),
            ev(1, 2_000),
            ev(1, 3_000),
            ev(1, 4_000),
            ev(1, 10_000),
            ev(1, 11_000),
            ev(1, 12_000),
            ev(1, 13_000),
            ev(1, 14_000),
            // Account 2: four in the minute, the fifth 65 s after the first: apart.
            ev(2, 0),
            ev(2, 1_000),
            ev(2, 2_000),
            ev(2, 3_000),
            ev(2, 65_000),
            // Another kind does not count.
            event(3, "login_ok", T0, None),
            event(3, "login_ok", T0 + 1, None),
            event(3, "login_ok", T0 + 2, None),
            event(3, "login_ok", T0 + 3, None),
            event(3, "login_ok", T0 + 4, None),
        ];
        // In time order (out of order is the next test's).
        events.sort_by_key(|e| e.time_ms);
        let (got, late) = run(DEFAULT_RULES[0], events, Duration::ZERO).await;
        assert_eq!(late, 0);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].group, "1");
        assert!(got[0].counted >= 5);
        assert_eq!(got[0].first_ms, T0);
        let e = event_of(&Rule::parse(DEFAULT_RULES[0]).unwrap(), &got[0]);
        assert_eq!(
            (e.severity, e.alert, e.rule.as_deref()),
            (8, true, Some("brute_force"))
        );
        assert_eq!(e.account_id(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn out_of_order_within_the_lateness_count_and_later_ones_are_late() {
        let ev = |t| event(3, "login_failed", T0 + t, None);
        // Newest first within 10 s of lateness: all five land, one match.
        let (got, late) = run(
            DEFAULT_RULES[0],
            vec![ev(9_000), ev(8_000), ev(7_000), ev(6_000), ev(5_000)],
            Duration::from_secs(10),
        )
        .await;
        assert_eq!((got.len(), late), (1, 0), "{got:?}");
        // Without lateness, after an event two minutes on, the old ones are late: counted,
        // not matched.
        let (got, late) = run(
            DEFAULT_RULES[0],
            vec![
                ev(120_000),
                ev(1_000),
                ev(2_000),
                ev(3_000),
                ev(4_000),
                ev(4_500),
            ],
            Duration::ZERO,
        )
        .await;
        assert_eq!((got.len(), late), (0, 5), "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_address_on_ten_accounts_matches_repeats_do_not_count() {
        let mut events = Vec::new();
        for a in 1..=9 {
            for rep in 0..3 {
                events.push(event(
                    a,
                    "login_failed",
                    T0 + a * 1000 + rep,
                    Some("10.0.0.9"),
                ));
            }
        }
        // Without a source, or from another address: not counted for 10.0.0.9.
        events.push(event(10, "x", T0 + 20_000, None));
        events.push(event(10, "x", T0 + 20_000, Some("10.0.0.8")));
        let (got, _) = run(DEFAULT_RULES[1], events.clone(), Duration::ZERO).await;
        assert!(got.is_empty(), "{got:?}");
        events.push(event(10, "x", T0 + 20_001, Some("10.0.0.9")));
        let (got, _) = run(DEFAULT_RULES[1], events, Duration::ZERO).await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].group.as_str(), got[0].counted), ("10.0.0.9", 10));
        let e = event_of(&Rule::parse(DEFAULT_RULES[1]).unwrap(), &got[0]);
        assert_eq!((e.account_id(), e.source.as_deref()), (0, Some("10.0.0.9")));
        assert!(e.id.starts_with("rule:address_on_many_accounts:10.0.0.9:"));
    }

    #[test]
    fn windows_slide_by_a_divisor_of_their_size() {
        assert_eq!(step_of(Duration::from_secs(60)), Duration::from_secs(5));
        assert_eq!(step_of(Duration::from_secs(300)), Duration::from_secs(25));
        assert_eq!(step_of(Duration::from_nanos(7)), Duration::from_nanos(7));
    }
}
