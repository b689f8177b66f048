//! Command-line options. clap checks each value and names the option in its error
//! (`invalid value '0' for '--queue <N>': 0 is not in 1..=1000000`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;

/// The service's settings.
///
/// ```
/// use clap::Parser;
/// let cfg = flowline_siem::Config::try_parse_from(["flowline-siem", "--queue", "8"]).unwrap();
/// assert_eq!(cfg.queue, 8);
/// let err = flowline_siem::Config::try_parse_from(["flowline-siem", "--queue", "0"]).unwrap_err();
/// assert!(err.to_string().contains("--queue"));
/// ```
#[derive(Debug, Clone, Parser)]
#[command(
    name = "flowline-siem",
    version,
    about = "A toy SIEM on flowline: POST events, watch them live over a websocket",
    // The long help is the options' own text: the struct's doc (with its code example) is
    // for the library's readers, not the command line.
    long_about = None
)]
pub struct Config {
    /// Address to listen on (port 0: any free port; the address is printed at start).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The SQLite file (created if missing).
    #[arg(long, default_value = "siem.db", value_name = "PATH")]
    pub db: PathBuf,
    /// The SMS/email gateway's base URL; without it, a fake one is started on a free port.
    #[arg(long, value_name = "URL", value_parser = parse_http_url)]
    pub notifier_url: Option<String>,
    /// How long the fake notifier takes per notification, in milliseconds.
    #[arg(long, default_value_t = 20, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub notifier_delay_ms: u64,
    /// Events of this severity (0 to 10) or more raise an alert.
    #[arg(long, default_value_t = 8, value_name = "SEVERITY", value_parser = clap::value_parser!(u8).range(0..=10))]
    pub alert_threshold: u8,
    /// Events accepted but not yet taken by the pipeline; when full, `POST /events` answers 429.
    #[arg(long, default_value_t = 8192, value_name = "N", value_parser = parse_count)]
    pub queue: usize,
    /// Events written per transaction at most (a transaction takes whatever has arrived while
    /// the one before was committed, up to this).
    #[arg(long, default_value_t = 512, value_name = "N", value_parser = parse_count)]
    pub batch: usize,
    /// Events a websocket client may be behind before it is cut off (at least `--batch`:
    /// a stored batch is broadcast at once).
    #[arg(long, default_value_t = 4096, value_name = "N", value_parser = parse_count)]
    pub ws_buffer: usize,
    /// How long one write to a websocket client may take before it is cut off, in milliseconds.
    #[arg(long, default_value_t = 2_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub ws_write_timeout_ms: u64,
    /// Notifications per second at most.
    #[arg(long, default_value_t = 50, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub alert_rate: u64,
    /// Alerts waiting for the notifier at most; more stay pending in the database.
    #[arg(long, default_value_t = 1024, value_name = "N", value_parser = parse_count)]
    pub alert_queue: usize,
    /// How long the notifier's breaker stays open before a probe, in milliseconds.
    #[arg(long, default_value_t = 1_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub breaker_cooldown_ms: u64,
    /// Demo accounts `key-1` ... `key-N` created at start.
    #[arg(long, default_value_t = 10, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub accounts: u32,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 16 * 1024, value_name = "BYTES", value_parser = parse_count)]
    pub body_limit: usize,
    /// The token that lets a viewer see every account's events on the page, `GET /ws`,
    /// `/api/...` (as `?token=` or `authorization: Bearer`) and `GET /metrics`. Without it one
    /// is drawn at random and printed at start. An account's API key (`?key=`) shows that
    /// account's events only.
    #[arg(long, value_name = "TOKEN", value_parser = parse_token)]
    pub viewer_token: Option<String>,
    /// A correlation rule (repeat for more): `name=N [kind=K] by=account|source
    /// [distinct=account|source] count=C within=DURATION severity=S`, e.g. `name=brute_force
    /// kind=login_failed by=account count=5 within=1m severity=8`. Given rules replace the two
    /// defaults (that one, and `name=address_on_many_accounts by=source distinct=account
    /// count=10 within=5m severity=8`).
    #[arg(long = "rule", value_name = "RULE", value_parser = crate::rules::Rule::parse)]
    pub rules: Vec<crate::rules::Rule>,
    /// How far out of order (by their own time) events may come and still count for the
    /// rules, in milliseconds; later ones are counted late. A rule's windows close this long
    /// after their end.
    #[arg(long, default_value_t = 2_000, value_name = "MS", value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub rule_lateness_ms: u64,
    /// No correlation rules unless given with `--rule`.
    #[arg(long)]
    pub no_default_rules: bool,
    /// Serve the naive version instead (each request looks up, alerts, inserts and
    /// broadcasts inline): the benchmark's baseline.
    #[arg(long)]
    pub naive: bool,
}

impl Config {
    /// The defaults, as with no option given.
    ///
    /// ```
    /// assert_eq!(flowline_siem::Config::defaults().alert_threshold, 8);
    /// ```
    pub fn defaults() -> Config {
        Config::parse_from(["flowline-siem"])
    }

    /// Parses options as on the command line (without the program name), for a service
    /// started from code.
    ///
    /// ```
    /// let cfg = flowline_siem::Config::from_args(["--naive", "--queue", "16"]).unwrap();
    /// assert!(cfg.naive && cfg.queue == 16);
    /// assert!(flowline_siem::Config::from_args(["--queue", "x"]).unwrap_err().contains("--queue"));
    /// ```
    pub fn from_args<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("flowline-siem").chain(args))
            .map_err(|e| e.to_string())
    }
}

fn parse_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n} is not in 1..=1000000")),
        Err(e) => Err(format!("not a count: {e}")),
    }
}

fn parse_token(s: &str) -> Result<String, String> {
    if (16..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(s.to_string())
    } else {
        Err("must be 16 to 128 printable ASCII characters, no spaces".into())
    }
}

fn parse_http_url(s: &str) -> Result<String, String> {
    match s.strip_prefix("http://") {
        Some(rest) if !rest.is_empty() && !rest.starts_with('/') => Ok(s.to_string()),
        _ => Err("must be an http:// URL with a host, such as http://127.0.0.1:9000".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(args: &[&str]) -> String {
        let mut all = vec!["flowline-siem"];
        all.extend_from_slice(args);
        Config::try_parse_from(all).unwrap_err().to_string()
    }

    #[test]
    fn bad_values_name_the_option_and_value() {
        for (args, opt, value) in [
            (&["--queue", "0"][..], "--queue", "0"),
            (&["--queue=-3"][..], "--queue", "-3"),
            (
                &["--batch", "99999999999999999999"][..],
                "--batch",
                "99999999999999999999",
            ),
            (&["--alert-threshold", "11"][..], "--alert-threshold", "11"),
            (&["--listen", "nowhere"][..], "--listen", "nowhere"),
            (
                &["--notifier-url", "ftp://x"][..],
                "--notifier-url",
                "ftp://x",
            ),
            (&["--alert-rate", "0"][..], "--alert-rate", "0"),
            (&["--viewer-token", "short"][..], "--viewer-token", "short"),
            (&["--rule", "name=x count=0"][..], "--rule", "count `0`"),
        ] {
            let e = err(args);
            assert!(e.contains(opt) && e.contains(value), "{args:?}: {e}");
        }
    }
}
