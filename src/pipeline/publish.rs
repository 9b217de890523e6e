//! The publishing tasks: the judging task (thresholds, incidents, the judge-state changelog
//! and file, events published and their holds released once acknowledged) and the dead-letter
//! publisher.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::changelog::Changelog;
use crate::decode;
use crate::detect::{Judge, JudgeState, Judgement};
use crate::infer::Inferred;
use crate::schema::{AnomalyEvent, Severity};
use crate::sink::Sink;
use crate::source::OffsetLedger;
use crate::telemetry::{self, Stats};

use super::MAX_IN_FLIGHT;
use super::ingest::{Ended, Ending, PendingLetter};

/// Places the cells ingest stopped holding among the windows the judging task takes. Windows
/// keep their order through inference, and ingest sends an `Ended` before the window it
/// counts, so its cells are due just before window number `after` (counted from 0) is judged:
/// the windows they emitted before are judged with their state, and a window of a cell that
/// came back starts afresh, as on any other instance.
pub(super) struct Endings {
    input: mpsc::UnboundedReceiver<Ended>,
    pending: std::collections::VecDeque<Ended>,
    judged: u64,
}

impl Endings {
    pub(super) fn new(input: mpsc::UnboundedReceiver<Ended>) -> Self {
        Self {
            input,
            pending: std::collections::VecDeque::new(),
            judged: 0,
        }
    }

    /// Takes in what ingest has sent; everything due within a batch was sent before the
    /// batch's windows, so once per batch received is enough.
    fn receive(&mut self) {
        while let Ok(ended) = self.input.try_recv() {
            self.pending.push_back(ended);
        }
    }

    /// The cells due now: every window sent before them has been judged.
    fn due(&mut self) -> Vec<(Arc<str>, Ending)> {
        let mut due = Vec::new();
        while let Some(ended) = self.pending.pop_front_if(|e| e.after <= self.judged) {
            due.extend(ended.cells);
        }
        due
    }

    /// The cells due before the next window, which this counts as judged.
    fn before_window(&mut self) -> Vec<(Arc<str>, Ending)> {
        let due = self.due();
        self.judged += 1;
        due
    }
}

/// What a published event comes back with.
struct Published {
    /// The holds to release.
    holds: Vec<(i32, i64)>,
    severity: Severity,
    /// Window close → acknowledged (none for an event without a window of readings).
    latency: Option<f64>,
    /// The cell, for an event of an incident.
    incident_of: Option<Arc<str>>,
    result: Result<(), crate::sink::SinkError>,
}

async fn publish(
    sink: Arc<Sink>,
    (cell, event): (Arc<str>, AnomalyEvent),
    holds: Vec<(i32, i64)>,
    closed_at: Option<std::time::Instant>,
) -> Published {
    let result = sink.publish_event(&event).await;
    Published {
        holds,
        severity: event.severity,
        latency: closed_at.map(|at| at.elapsed().as_secs_f64()),
        incident_of: event.incident.is_some().then_some(cell),
        result,
    }
}

/// What the judging task judges with: the judge, the cells that ended, and the state changelog.
pub(super) struct Judging {
    pub(super) judge: Judge,
    pub(super) endings: Endings,
    /// With `[detect.changelog]`.
    pub(super) changelog: Option<Changelog>,
}

/// Scores inferred windows, publishes events, and releases each window's holds once its event
/// is acknowledged (or at once when it has none). Cells ingest stopped holding lose their
/// judge state when revoked (written to the changelog first, if there is one); when silent, an
/// open incident of theirs is closed.
pub(super) async fn publish_events(
    mut input: mpsc::Receiver<Vec<Inferred>>,
    judging: Judging,
    sink: Arc<Sink>,
    ledger: Arc<Mutex<OffsetLedger>>,
    stats: Arc<Stats>,
    failed: CancellationToken,
) -> anyhow::Result<Judge> {
    let Judging {
        mut judge,
        mut endings,
        mut changelog,
    } = judging;
    // Without a changelog the ticker's branch is disabled; its period does not matter.
    let write_every = changelog
        .as_ref()
        .map_or(Duration::from_secs(3600), |c| c.interval);
    let start = tokio::time::Instant::now() + write_every;
    let mut write_ticker = tokio::time::interval_at(start, write_every);
    write_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight = FuturesUnordered::new();
    let release = |holds: &[(i32, i64)]| {
        let mut ledger = ledger.lock().expect("ledger lock");
        for &(p, o) in holds {
            ledger.release(p, o);
        }
    };
    let end = |judge: &mut Judge,
               mut changelog: Option<&mut Changelog>,
               cells: Vec<(Arc<str>, Ending)>|
     -> Vec<(Arc<str>, AnomalyEvent)> {
        let mut closes = Vec::new();
        for (cell, ending) in cells {
            match ending {
                Ending::Revoked => {
                    if let Some(changelog) = changelog.as_deref_mut() {
                        changelog.write_cell(judge, &cell);
                    }
                    judge.forget(&cell);
                    tracing::debug!(cell = %cell, "Forgot a revoked cell's thresholds, baselines and incident.");
                }
                Ending::Silent { at_ms } => {
                    if let Some(close) = judge.expire(&cell, at_ms) {
                        tracing::debug!(cell = %cell, at_ms, "Closed the incident of a silent cell.");
                        if let Some(changelog) = changelog.as_deref_mut() {
                            changelog.changed(&cell);
                        }
                        closes.push((cell, close));
                    }
                }
            }
        }
        closes
    };
    // An event of an incident is followed until acknowledged, so that the changelog saves the
    // incident only when its events are out.
    let sent = |changelog: Option<&mut Changelog>, (cell, event): &(Arc<str>, AnomalyEvent)| {
        if let Some(changelog) = changelog
            && event.incident.is_some()
        {
            changelog.transition_sent(cell);
        }
    };
    // An event came back: a failure stops the run; an acknowledgement releases its holds.
    let settle = |changelog: Option<&mut Changelog>, published: Published| -> anyhow::Result<()> {
        if let Err(error) = published.result {
            failed.cancel();
            return Err(error.into());
        }
        if let (Some(changelog), Some(cell)) = (changelog, &published.incident_of) {
            changelog.transition_acknowledged(cell);
        }
        telemetry::event_published(&stats, published.severity, published.latency);
        release(&published.holds);
        Ok(())
    };
    loop {
        tokio::select! {
            batch = input.recv(), if in_flight.len() < MAX_IN_FLIGHT => {
                let Some(batch) = batch else { break };
                endings.receive();
                for Inferred { window, reconstruction, model } in batch {
                    for close in end(&mut judge, changelog.as_mut(), endings.before_window()) {
                        sent(changelog.as_mut(), &close);
                        in_flight.push(publish(Arc::clone(&sink), close, Vec::new(), None));
                    }
                    // Each window is judged by the model that scored it.
                    judge = judge.for_contract(&model);
                    if let Some(changelog) = changelog.as_mut()
                        && let Some(close) = changelog.before_window(&mut judge, &window)
                    {
                        let close = (Arc::clone(&window.cell), close);
                        sent(Some(changelog), &close);
                        in_flight.push(publish(Arc::clone(&sink), close, Vec::new(), None));
                    }
                    let Judgement { score, event, .. } = judge.judge(&window, &reconstruction);
                    telemetry::window_scored(&stats, score.score, window.closed_at.elapsed().as_secs_f64());
                    match event {
                        None => release(&window.holds),
                        Some(event) => {
                            let event = (window.cell, event);
                            sent(changelog.as_mut(), &event);
                            in_flight.push(publish(
                                Arc::clone(&sink),
                                event,
                                window.holds,
                                Some(window.closed_at),
                            ));
                        }
                    }
                }
                telemetry::cells_judged(judge.cell_count());
            }
            // Cells that ended after the last window sent: nothing is left to judge before them.
            Some(ended) = endings.input.recv() => {
                endings.pending.push_back(ended);
                for close in end(&mut judge, changelog.as_mut(), endings.due()) {
                    sent(changelog.as_mut(), &close);
                    in_flight.push(publish(Arc::clone(&sink), close, Vec::new(), None));
                }
                telemetry::cells_judged(judge.cell_count());
            }
            _ = write_ticker.tick(), if changelog.is_some() => {
                if let Some(changelog) = changelog.as_mut() {
                    changelog.write_due(&judge);
                }
            }
            Some(published) = in_flight.next() => settle(changelog.as_mut(), published)?,
        }
    }
    while let Some(published) = in_flight.next().await {
        settle(changelog.as_mut(), published)?;
    }
    if let Some(mut changelog) = changelog {
        changelog.write_final(&judge).await?;
    }
    Ok(judge)
}

/// Takes over the judge state saved at `path` by the last graceful stop, if any and if it
/// fits (see [`Judge::restore`]); otherwise the judge learns from nothing, as without a file.
pub(super) fn restore_judge_state(judge: &mut Judge, path: &std::path::Path) {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!(path = %path.display(), "No judge state saved yet; the judge learns from nothing.");
            return;
        }
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "Cannot read the judge state; the judge learns from nothing.");
            return;
        }
    };
    let state = match serde_json::from_slice::<JudgeState>(&bytes) {
        Ok(state) => state,
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "The judge state is not readable; the judge learns from nothing.");
            return;
        }
    };
    let restored = judge.restore(state, decode::wall_clock_ms());
    for (part, result) in restored.parts() {
        match result {
            Ok(0) => {}
            Ok(cells) => tracing::info!(path = %path.display(), cells, "Restored the {part}."),
            Err(why) => {
                tracing::warn!(path = %path.display(), "The saved {part} were not used: {why}.")
            }
        }
    }
}

/// Saves the judge's state at `path`, through a file beside it renamed into place, so that a
/// stop during the write leaves the last whole state. A failure is logged, not fatal: the
/// events and offsets are already safe.
pub(super) fn save_judge_state(judge: &Judge, path: &std::path::Path) {
    let state = judge.state(decode::wall_clock_ms());
    let cells = state.divergence.len();
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let written = serde_json::to_vec(&state)
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&part, json))
        .and_then(|()| std::fs::rename(&part, path));
    match written {
        Ok(()) => tracing::info!(path = %path.display(), cells, "Saved the judge state."),
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "Could not save the judge state; the next start learns from nothing.")
        }
    }
}

/// Publishes dead letters and releases their holds once acknowledged.
pub(super) async fn publish_dead_letters(
    mut input: mpsc::Receiver<PendingLetter>,
    sink: Arc<Sink>,
    ledger: Arc<Mutex<OffsetLedger>>,
    failed: CancellationToken,
) -> anyhow::Result<()> {
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            letter = input.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match letter {
                Some(PendingLetter { id, letter }) => {
                    let sink = Arc::clone(&sink);
                    in_flight.push(async move {
                        let result = sink.publish_dead_letter(&letter).await;
                        (id, letter.offset, result)
                    });
                }
                None => open = false,
            },
            Some((id, offset, result)) = in_flight.next() => {
                if let Err(error) = result {
                    failed.cancel();
                    return Err(error.into());
                }
                ledger.lock().expect("ledger lock").release(id, offset);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Judges `windows` windows, returning before which window (by number) each cell ended.
    fn judge_windows(endings: &mut Endings, windows: u64) -> Vec<(u64, String)> {
        let mut ended = Vec::new();
        endings.receive();
        for _ in 0..windows {
            let number = endings.judged;
            for (cell, _) in endings.before_window() {
                ended.push((number, cell.to_string()));
            }
        }
        ended
    }

    fn ended(after: u64, cells: &[&str]) -> Ended {
        Ended {
            after,
            cells: cells
                .iter()
                .map(|c| (Arc::from(*c), Ending::Revoked))
                .collect(),
        }
    }

    #[test]
    fn cells_end_after_the_windows_sent_before_them() {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut endings = Endings::new(rx);
        // Ingest: a revocation before any window, another after 3 windows, two after 5.
        tx.send(ended(0, &["a"])).unwrap();
        tx.send(ended(3, &["b", "c"])).unwrap();
        tx.send(ended(5, &["d"])).unwrap();
        tx.send(ended(5, &["e"])).unwrap();
        // The first batch holds windows 0..4: "a" goes before window 0, "b" and "c" before 3.
        assert_eq!(
            judge_windows(&mut endings, 4),
            [(0, "a".into()), (3, "b".into()), (3, "c".into())]
        );
        // Window 4 does not reach the revocation after 5; window 5 does, and both of its
        // endings apply before it.
        assert_eq!(judge_windows(&mut endings, 1), []);
        assert_eq!(
            judge_windows(&mut endings, 1),
            [(5, "d".into()), (5, "e".into())]
        );
        assert!(endings.pending.is_empty());
        // Sent after windows yet to come, it waits for them.
        tx.send(ended(8, &["f"])).unwrap();
        assert_eq!(judge_windows(&mut endings, 1), []);
        assert_eq!(endings.pending.len(), 1);
        assert!(endings.due().is_empty(), "window 7 is not judged yet");
        // Sent after the last window judged, it is due at once.
        assert_eq!(judge_windows(&mut endings, 1), []);
        let (cell, ending) = endings.due().pop().expect("due once window 7 is judged");
        assert_eq!((&*cell, ending), ("f", Ending::Revoked));
    }
}
