//! A custom operator and a custom sink, written with the public API only, as in a crate of
//! your own: readings from sensors go through a rate-of-change operator (per sensor, the
//! change per second since its previous reading) and end in a batched writer, one of whose
//! batches fails. The report shows where every reading ended.
//!
//! Run with `cargo run --example custom_operator`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flowline::prelude::*;

#[derive(Debug, Clone, Copy)]
struct Reading {
    sensor: u32,
    /// Milliseconds since the start.
    at_ms: u64,
    value: f64,
}

#[derive(Debug, Clone, Copy)]
struct Rate {
    sensor: u32,
    per_second: f64,
}

/// Per sensor, the change per second since the sensor's previous reading. A sensor's first
/// reading has nothing to compare with: it emits nothing (counted as dropped). A reading
/// that is not a number, or that goes back in time, fails (dead-lettered with the reason).
#[derive(Default)]
struct RateOfChange {
    last: HashMap<u32, (u64, f64)>,
}

impl Operator<Reading> for RateOfChange {
    type Output = Rate;

    fn push(&mut self, r: Reading, out: &mut Out<'_, Rate>) -> Result<Step, BoxError> {
        if r.value.is_nan() {
            return Err(format!("sensor {}: not a number at {} ms", r.sensor, r.at_ms).into());
        }
        if let Some(&(at, value)) = self.last.get(&r.sensor) {
            if r.at_ms <= at {
                return Err(format!(
                    "sensor {}: reading at {} ms is not after {at} ms",
                    r.sensor, r.at_ms
                )
                .into());
            }
            let seconds = (r.at_ms - at) as f64 / 1000.0;
            out.push(Rate {
                sensor: r.sensor,
                per_second: (r.value - value) / seconds,
            });
        }
        self.last.insert(r.sensor, (r.at_ms, r.value));
        Ok(Step::Continue)
    }

    fn name(&self) -> &'static str {
        "rate_of_change"
    }
}

/// A batched writer (standing in for one multi-row INSERT per batch). Its third batch fails,
/// as a database might when a constraint is violated: that batch's rows are dead-lettered.
struct TableWriter {
    table: Arc<Mutex<Vec<Rate>>>,
    batches: u32,
}

impl BatchSink<Rate> for TableWriter {
    type Output = u32;

    async fn write(&mut self, batch: Vec<Rate>) -> Result<(), BoxError> {
        self.batches += 1;
        tokio::task::yield_now().await; // the round trip to the database
        if self.batches == 3 {
            return Err(format!("batch {}: deadlock detected, rolled back", self.batches).into());
        }
        self.table.lock().unwrap().extend(batch);
        Ok(())
    }

    fn finish(self) -> u32 {
        self.batches
    }

    fn name(&self) -> &'static str {
        "table"
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    // 4 sensors, one reading each per 100 ms; sensor 2 sends a NaN now and then.
    let readings = (0..2_000u64).map(|i| Reading {
        sensor: (i % 4) as u32,
        at_ms: (i / 4) * 100,
        value: if i % 4 == 2 && i % 97 == 0 {
            f64::NAN
        } else {
            (i as f64 / 10.0).sin() * 100.0
        },
    });
    let table = Arc::new(Mutex::new(Vec::new()));
    let (batches, report) = Pipeline::from_iter(readings)
        .via(RateOfChange::default())
        .map_async("enrich", |rate| async move { rate })
        .workers(4)
        .into_sink(TableWriter {
            table: table.clone(),
            batches: 0,
        })
        .await?;
    println!("{report}");

    let op = report.stage("rate_of_change").expect("operator stage");
    let sink = report.stage("table").expect("sink stage");
    let rows = table.lock().unwrap().len() as u64;
    if let Some(steepest) = table
        .lock()
        .unwrap()
        .iter()
        .max_by(|a, b| a.per_second.abs().total_cmp(&b.per_second.abs()))
    {
        println!(
            "steepest change: sensor {} at {:.1}/s",
            steepest.sensor, steepest.per_second
        );
    }
    println!(
        "{batches} batches, {rows} rows written, {} rates failed with their batch",
        sink.failed
    );

    // Every reading is accounted for: 4 first readings dropped, the NaNs failed, the rest
    // passed on; every rate ends written or failed with its batch.
    assert_eq!(op.received, 2_000);
    assert_eq!(op.dropped, 4);
    assert_eq!(
        op.failed,
        (0..2_000u64).filter(|i| i % 4 == 2 && i % 97 == 0).count() as u64
    );
    assert_eq!(op.passed + op.dropped + op.failed, op.received);
    assert_eq!(sink.passed, rows);
    assert!(sink.failed > 0, "the third batch failed");
    assert_eq!(sink.passed + sink.failed, sink.received);
    assert_eq!(report.failures, op.failed + sink.failed);
    assert!(report.is_balanced());
    Ok(())
}
