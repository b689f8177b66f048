//! The progress bar in a real terminal: tmux runs a pipeline with `.progress()` at 80 and at
//! 160 columns, and the pane is read with `capture-pane` while it runs and after it ended.
//! Every line of the bar must fit the width (wrapped lines are joined back, `-J`, so a bar
//! that wrapped shows as too long), the bar must be on one line only (a bar that wrapped redraws below a
//! stale copy of itself), failures and retries must show, and a run whose total is unknown
//! gets a spinner without ETA.
//!
//! The child is this test binary itself, re-run inside tmux with `FLOWLINE_BAR_CHILD` set.
//! Each tmux server has its own socket (`tmux -L`), killed at the end. `scripts/test`
//! installs tmux when it is missing; without it the test fails and says so.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use flowline::ProgressOptions;
use flowline::prelude::*;

const ENV: &str = "FLOWLINE_BAR_CHILD";
/// Printed by the shell when the child has ended, with its exit status.
const EXIT: &str = "FLOWLINE-BAR-EXIT";
const ITEMS: u64 = 2_000;

/// The child's entry: does nothing unless run by `the_bar_fits_the_terminal`. `known`: the
/// source's total is known (a bar with ETA); `unknown`: it is not (a spinner).
#[test]
fn bar_child_entry() {
    let Ok(mode) = std::env::var(ENV) else { return };
    // Ends the test harness's `test bar_child_entry ... ` line, so the bar starts a line.
    println!("child starts");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async move {
        let source = if mode == "known" {
            Pipeline::from_iter(0..ITEMS)
        } else {
            let mut next = 0u64;
            Pipeline::from_fn(move || {
                next += 1;
                async move { (next <= ITEMS).then_some(next - 1) }
            })
        };
        source
            .map_async("look-up-the-customer-in-the-eu-region", |x| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                x
            })
            .workers(8)
            .try_map_async("charge-the-card-through-the-payment-gateway", |x| {
                let attempt = flowline::attempt();
                async move {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    // 1 in 10 fail once (retried), 1 in 50 fail for good.
                    if x % 50 == 0 || (x % 10 == 1 && attempt == 1) {
                        Err(format!("declined {x}"))
                    } else {
                        Ok(x)
                    }
                }
            })
            .workers(8)
            .retry(Retry::constant(Duration::from_millis(1)).max_attempts(2))
            .filter(|x| x % 3 != 0)
            .map(|x| x * 2)
            .progress_with(ProgressOptions::new().every(Duration::from_millis(50)))
            .run()
            .await
            .unwrap()
    });
    println!(
        "child delivered {} failed {}",
        report.delivered(),
        report.failures
    );
}

struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-u", "-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux runs (scripts/test installs it)")
    }

    /// The pane's text, wrapped lines joined (`-J`), history included.
    fn capture(&self) -> String {
        let out = self.cmd(&["capture-pane", "-p", "-J", "-S", "-", "-t", "bar"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]);
    }
}

/// Runs the child at `width` columns; returns every capture taken (the last after it ended).
fn run_in_tmux(width: u16, mode: &str) -> Vec<String> {
    let tmux = Tmux {
        socket: format!("flowline-bar-{}-{width}-{mode}", std::process::id()),
    };
    let exe = std::env::current_exe().unwrap();
    let shell = format!(
        "env {ENV}={mode} '{}' --exact bar_child_entry --nocapture --test-threads 1; \
         echo {EXIT} $?; sleep 600",
        exe.display()
    );
    let width_s = width.to_string();
    let out = tmux.cmd(&[
        "new-session",
        "-d",
        "-s",
        "bar",
        "-x",
        &width_s,
        "-y",
        "24",
        &shell,
    ]);
    assert!(
        out.status.success(),
        "tmux: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let started = Instant::now();
    let mut captures = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(40));
        let text = tmux.capture();
        let ended = text.contains(EXIT);
        captures.push(text);
        if ended {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the child did not end: {}",
            captures.last().unwrap()
        );
    }
    captures
}

/// The lines of a capture that are the bar (its rate is the one `/s` on screen).
fn bar_lines(capture: &str) -> Vec<&str> {
    capture.lines().filter(|l| l.contains("/s")).collect()
}

fn check(width: u16, mode: &str) {
    let captures = run_in_tmux(width, mode);
    let last = captures.last().unwrap();
    assert!(last.contains(&format!("{EXIT} 0")), "child failed:\n{last}");
    let mut seen_running = false;
    for c in &captures {
        for l in c.lines() {
            let w = usize::from(width);
            // The test harness's own lines (`test result: ...`) may wrap: only the bar's count.
            let of_the_bar = l.contains("/s") || l.contains('›');
            if !of_the_bar || l.chars().count() <= w {
                continue;
            }
            // indicatif fills the bar's row with spaces to the right edge, so that what is
            // printed next starts a row of its own; tmux counts that as a wrapped line and
            // `-J` joins the two. Anything else that is longer is the bar itself wrapping.
            let row: String = l.chars().take(w).collect();
            let rest: String = l.chars().skip(w).collect();
            let bar_went_on = ["›", "/s", " · ", " | ", "retries"]
                .iter()
                .any(|piece| rest.contains(piece));
            assert!(
                row.ends_with(' ') && !bar_went_on,
                "a line wider than {width} columns ({} chars):\n{l}\n--- pane:\n{c}",
                l.chars().count()
            );
        }
        let bars = bar_lines(c);
        assert!(bars.len() <= 1, "stale copies of the bar:\n{c}");
        if let Some(bar) = bars.first() {
            seen_running |= !c.contains("child delivered");
            match mode {
                "unknown" => {
                    assert!(bar.contains(" done "), "{bar}");
                    assert!(!bar.contains("eta") && !bar.contains('['), "{bar}");
                }
                _ => assert!(bar.contains('[') && bar.contains("/2.00k "), "{bar}"),
            }
        }
    }
    assert!(
        seen_running,
        "no capture showed the bar while the run went on"
    );
    let fin = bar_lines(last);
    assert_eq!(fin.len(), 1, "the final bar stays, once:\n{last}");
    // 2000 items: 40 fail for good (x % 50 == 0, tried twice), 200 pass on their second
    // attempt (x % 10 == 1): 240 retries.
    assert!(fin[0].contains(" · 40 failed · 240 retries"), "{}", fin[0]);
    // Stages are elided, not wrapped: at 80 columns some are left out (all of them beside
    // a bar); at 160 the one that failed items is kept first.
    if width == 80 {
        assert!(fin[0].contains('…') || mode == "known", "{}", fin[0]);
    } else {
        assert!(fin[0].contains(" 1.96k (40 failed)"), "{}", fin[0]);
    }
    assert!(last.contains("child delivered 1307 failed 40"), "{last}");
}

#[test]
fn the_bar_fits_the_terminal() {
    for width in [80, 160] {
        for mode in ["unknown", "known"] {
            check(width, mode);
        }
    }
}
